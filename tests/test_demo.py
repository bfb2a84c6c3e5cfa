"""`qiusuo demo --quick`: the whole pipeline (pretrain -> eval -> GRPO -> eval -> report) with a tiny budget."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_quick_demo_runs_end_to_end_and_writes_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("QIUSUO_HOME", str(tmp_path / "home"))
    from qiusuo.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--threads", "1", "--no-progress"]) == 0
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    for side in ("before", "after"):
        for key in ("accuracy", "pass1", "format_rate", "length", "empty_think_rate"):
            assert 0 <= report[side][key] <= (1 if key != "length" else 1e9), (side, key)
    assert report["seed"] == 0 and report["wall_seconds"] > 0 and report["cpu_seconds"] > 0
    assert len(report["curves"]) == 3 and "reward_mean" in report["curves"][0]
    assert (tmp_path / "demo" / "grpo_curves.png").stat().st_size > 1000
    assert (tmp_path / "demo" / "grpo" / "final" / "config.json").is_file()
