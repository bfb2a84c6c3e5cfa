"""bench/results.py writes one self-describing file per run; bench/tables.py renders the newest of each
bench into the README between its markers (numbers come from the files, never from the README)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import results  # noqa: E402
import tables  # noqa: E402


def write_run(tmp_path: Path, bench: str, value: float, stamp: str) -> Path:
    run = results.Run(bench, threads=1, args={"repeats": 3})
    run.started = run.started.strptime(stamp, "%Y%m%d-%H%M%S")
    run.add(side="qiusuo", repeat=0, tok_s=value)
    run.table("Decode", ["engine", "tok/s", "ok"], [["qiusuo", value, True], ["peer", None, False]], note="a note")
    return run.save(summary={"ratio": value / 2}, directory=tmp_path)


def test_run_writes_raw_records_context_and_tables(tmp_path):
    path = write_run(tmp_path, "engine", 812.25, "20260102-030405")
    assert path.name.startswith("engine-20260102-030405-") and path.suffix == ".json"
    data = json.loads(path.read_text())
    assert data["records"] == [{"side": "qiusuo", "repeat": 0, "tok_s": 812.25}]
    assert data["summary"] == {"ratio": 406.125}
    assert set(data["versions"]) >= {"torch", "transformers", "trl", "llama_cpp_python", "ray"}
    assert data["versions"]["torch"]  # installed here
    assert len(data["load_before"]) == 3 and len(data["load_after"]) == 3
    assert "commit" in data["git"] and data["cpu"]["logical_cpus"] >= 1
    assert data["tables"][0]["rows"][0] == ["qiusuo", 812.25, True]
    assert not list(tmp_path.glob("*.tmp"))


def test_table_rows_must_match_columns():
    run = results.Run("x")
    with pytest.raises(ValueError, match="every row needs 2 values"):
        run.table("t", ["a", "b"], [[1]])


def test_alternating_reverses_odd_repeats():
    assert results.alternating(["qiusuo", "peer"], 3) == [
        (0, "qiusuo"), (0, "peer"), (1, "peer"), (1, "qiusuo"), (2, "qiusuo"), (2, "peer")]


def test_tables_render_the_newest_file_of_each_bench(tmp_path):
    write_run(tmp_path, "engine", 100.0, "20260101-000000")
    write_run(tmp_path, "engine", 812.25, "20260102-000000")
    write_run(tmp_path, "engine-real", 5.0, "20260101-000000")
    (tmp_path / "notes.json").write_text("{}")  # not a result file name: ignored
    readme = tmp_path / "README.md"
    readme.write_text("# B\n\nintro\n<!-- tables:engine -->\nOLD 999\n<!-- /tables:engine -->\ntail\n")
    assert tables.main(["--results", str(tmp_path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "OLD 999" not in text and "| qiusuo | 812.2 | yes |" in text and "| peer | – | no |" in text
    assert "|---|---:|---|" in text and "a note" in text and "load average" in text
    assert text.index("<!-- tables:engine -->") < text.index("812.2") < text.index("tail")
    assert "## engine-real" in text and "| qiusuo | 5.00 | yes |" in text  # unmarked bench appended
    assert "100.0" not in text  # the older engine file is not shown
    assert tables.main(["--results", str(tmp_path), "--readme", str(readme), "--check"]) == 0
    readme.write_text(text.replace("812.2", "900.0"))  # a hand-typed number is caught
    assert tables.main(["--results", str(tmp_path), "--readme", str(readme), "--check"]) == 1


def test_file_without_tables_falls_back_to_summary(tmp_path):
    run = results.Run("grpo")
    run.save(summary={"speedup": 1.5, "nested": {"x": 1}}, directory=tmp_path)
    readme = tmp_path / "README.md"
    tables.main(["--results", str(tmp_path), "--readme", str(readme)])
    assert "| speedup | 1.50 |" in readme.read_text() and "nested" not in readme.read_text()


def test_an_older_file_of_another_shape_stays_shown(tmp_path):
    def edge_run(shapes, value, stamp):
        run = results.Run("edge", args={"shapes": shapes})
        run.started = run.started.strptime(stamp, "%Y%m%d-%H%M%S")
        run.table(f"edge {shapes[0]}", ["side", "tok/s"], [["qiusuo", value]])
        return run.save(directory=tmp_path)

    old_small = edge_run(["smollm2-135m"], 11.5, "20260101-000000")
    edge_run(["qwen2.5-0.5b"], 22.5, "20260101-010000")  # superseded below
    new_small = edge_run(["smollm2-135m"], 33.5, "20260101-020000")
    qwen = edge_run(["qwen2.5-0.5b"], 44.5, "20260101-030000")
    assert tables.shown(tmp_path)["edge"] == [qwen, new_small]
    assert old_small not in tables.shown(tmp_path)["edge"]
    readme = tmp_path / "README.md"
    tables.main(["--results", str(tmp_path), "--readme", str(readme)])
    text = readme.read_text()
    assert "44.5" in text and "33.5" in text and "22.5" not in text and "11.5" not in text
