"""Regenerate bench/README.md's tables from the newest result files of each bench (no typed numbers).

Each bench writes `bench/results/<bench>-<date>-<commit>.json` through `results.Run`; the tables it
declared (`Run.table`) are rendered as Markdown between the README's markers (the newest file, plus
older ones that measured shapes/presets/workloads no newer file covers: SCOPE)

    <!-- tables:engine -->
    ... (replaced on every run) ...
    <!-- /tables:engine -->

with a line naming the source file, its commit, the CPU, the threads and the load average before and
after. A bench with no markers in the README is appended at the end under its own heading, so a new
bench (edge, hostile, ...) shows up without editing this script. A file without tables falls back
to its summary's scalar values.

    python bench/tables.py            # rewrite bench/README.md
    python bench/tables.py --check    # exit 1 if the README is not what the result files give
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
NAME = re.compile(r"^(?P<bench>[a-z0-9_]+(?:-[a-z0-9_]+)*?)-(?P<date>\d{8})-(?P<time>\d{6})-(?P<commit>[0-9a-z]+)\.json$")


# The argument naming what a run of a bench covered (its model shapes, presets, workloads): a newer
# file replaces an older one only where they cover the same things, so a run of one shape does not
# hide the table of another shape measured earlier.
SCOPE = {"edge": "shapes", "engine_real": "shapes", "engine": "presets", "grpo": "workloads", "hostile": "label",
         "kernels": "shape", "grpo_real": "precision"}
# What a result file written before its bench had the SCOPE argument covered.
SCOPE_DEFAULT = {"grpo_real": "fp32"}


def scope(bench: str, data: dict[str, Any]) -> set[str]:
    value = (data.get("args") or {}).get(SCOPE.get(bench, ""), SCOPE_DEFAULT.get(bench))
    return set(value) if isinstance(value, list) else {value} if isinstance(value, str) and value else set()


def shown(results: Path = RESULTS) -> dict[str, list[Path]]:
    """bench name -> the result files its README block shows, newest first: the newest file, and an
    older one only if what it covered (SCOPE) is covered by no newer file shown."""
    found: dict[str, list[tuple[str, Path]]] = {}
    for path in results.glob("*.json"):
        m = NAME.match(path.name)
        if m:
            found.setdefault(m["bench"], []).append((m["date"] + m["time"], path))
    out: dict[str, list[Path]] = {}
    for bench, files in sorted(found.items()):
        covered: set[str] = set()
        for i, (_, path) in enumerate(sorted(files, reverse=True)):
            what = scope(bench, json.loads(path.read_text()))
            if i == 0 or (what and not what & covered):
                out.setdefault(bench, []).append(path)
                covered |= what
            if not what:
                break  # a file that names no scope covers everything older
    return out


def newest(results: Path = RESULTS) -> dict[str, Path]:
    """bench name -> its newest result file (by the start stamp in the name)."""
    return {bench: paths[0] for bench, paths in shown(results).items()}


def fmt(value: Any) -> str:
    """One cell: floats with sensible precision, None as a dash, lists joined, pipes escaped."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        a = abs(value)
        text = f"{value:,.0f}" if a >= 1000 else f"{value:.1f}" if a >= 100 else f"{value:.2f}" if a >= 1 else f"{value:.3g}"
        return text
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    numeric = [all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) for r in rows if r[i] is not None)
               for i in range(len(columns))]
    lines = ["| " + " | ".join(fmt(c) for c in columns) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def context_line(data: dict[str, Any], path: Path) -> str:
    cpu = data.get("cpu") or {}
    git = data.get("git") or {}
    load = lambda key: "/".join(f"{x:.2f}" for x in data[key]) if data.get(key) else "?"  # noqa: E731
    versions = data.get("versions") or {}
    peers = ", ".join(f"{k} {v}" for k, v in versions.items() if v and k != "qiusuo")
    commit = (git.get("commit") or "?")[:10] + (" (dirty tree)" if git.get("dirty") else "")
    return (f"_Source: `results/{path.name}` (commit {commit}, started {data.get('started', '?')}); "
            f"CPU: {cpu.get('Model name', cpu.get('machine', '?'))}, {cpu.get('logical_cpus', '?')} logical CPUs; "
            f"threads {fmt(data.get('threads'))}; load average (1/5/15 min) before {load('load_before')}, "
            f"after {load('load_after')}; {peers}._")


def render(data: dict[str, Any], path: Path) -> str:
    """The Markdown for one result file: its tables (or its summary's scalars), then its context."""
    parts = []
    tables = data.get("tables") or []
    for t in tables:
        parts.append(f"**{t['title']}**\n\n" + markdown_table(t["columns"], t["rows"])
                     + (f"\n\n{t['note']}" if t.get("note") else ""))
    if not tables:
        scalars = [[k, v] for k, v in (data.get("summary") or {}).items()
                   if isinstance(v, (int, float, str, bool)) or v is None]
        parts.append(markdown_table(["figure", "value"], scalars) if scalars else "_(no tables in this file)_")
    parts.append(context_line(data, path))
    return "\n\n".join(parts)


def update(readme: str, blocks: dict[str, str]) -> str:
    """Replace each bench's marked block; append benches the README does not mark yet."""
    for bench, block in blocks.items():
        start, end = f"<!-- tables:{bench} -->", f"<!-- /tables:{bench} -->"
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
        new = f"{start}\n{block}\n{end}"
        if pattern.search(readme):
            readme = pattern.sub(lambda _: new, readme, count=1)
        else:
            readme = readme.rstrip("\n") + f"\n\n## {bench}\n\n{new}\n"
    return readme


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--readme", type=Path, default=README)
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 if the README is out of date")
    args = ap.parse_args(argv)
    files = shown(args.results)
    blocks = {bench: "\n\n".join(render(json.loads(p.read_text()), p) for p in paths) for bench, paths in files.items()}
    old = args.readme.read_text() if args.readme.exists() else "# Benchmarks\n"
    new = update(old, blocks)
    if args.check:
        if new != old:
            print(f"{args.readme} is out of date; run python bench/tables.py", file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(new)
    print(f"{args.readme}: {len(blocks)} bench(es): "
          + ", ".join(f"{b} <- {' + '.join(p.name for p in ps)}" for b, ps in files.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
