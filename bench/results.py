"""Where every benchmark's figures go: `bench/results/<bench>-<date>-<commit>.json`.

A result file holds every repeat's raw values (the bench decides their shape), the medians it
reports, and the run's context: package versions, the git commit (and whether the tree was
dirty), the CPU (`lscpu`), the load average before and after, and the threads used. A peer reading
the file can then tell what ran, where, and under how much noise. `bench/README.md`'s tables are
generated from these files (`python bench/tables.py`), never typed by hand.

    from results import Run                               # bench/ is sys.path[0] for `python bench/x.py`
    run = Run("edge", threads=[1, 2], args=vars(args))   # records the load before
    ...                                                    # measure, run.add(...) raw values
    run.table("Decode tok/s", ["engine", "tok/s"], [["qiusuo", 812.0], ...])  # what README shows
    path = run.save(summary={...})                         # load after, versions; prints the path

A table is data, not text: `bench/tables.py` renders every table of the newest file of each bench
into `bench/README.md` between `<!-- tables:BENCH -->` and `<!-- /tables:BENCH -->`.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PEERS = ("torch", "transformers", "trl", "peft", "llama_cpp_python", "ray", "qiusuo")


def versions() -> dict[str, str | None]:
    """Installed versions of qiusuo and the peers it is measured against (None: not installed)."""
    found: dict[str, str | None] = {}
    for name in PEERS:
        try:
            found[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_commit() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def cpu_info() -> dict[str, Any]:
    """`lscpu`'s fields (model name, flags, caches, ...), or what `platform` knows without it."""
    info: dict[str, Any] = {"machine": platform.machine(), "logical_cpus": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return info
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def alternating(sides: list[str], repeats: int) -> list[tuple[int, str]]:
    """(repeat, side) in the order to run them: forward on even repeats, reversed on odd ones, so a
    burst of outside load, or a warm cache left by the previous side, does not always favour one side."""
    return [(r, side) for r in range(repeats) for side in (sides if r % 2 == 0 else sides[::-1])]


def hwm_mb(pid: int | str = "self") -> float | None:
    """A process's peak resident set size so far in MiB, from /proc/PID/status's VmHWM (None where
    there is no /proc or the process is gone). VmHWM belongs to the address space, which exec
    replaces; getrusage's ru_maxrss does not restart at exec, so a child started by a bench process
    holding a 1.4 GB model reports at least 1.4 GB whatever it uses itself."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peak_rss_mb() -> float:
    """This process's own peak resident set size so far, in MiB (VmHWM; ru_maxrss where /proc is missing)."""
    import resource

    own = hwm_mb()
    return own if own is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Run:
    """One benchmark run: raw records in, one JSON file out."""

    def __init__(self, bench: str, threads: Any = None, args: dict[str, Any] | None = None):
        self.bench = bench
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self.git = git_commit()  # the code that ran: fixed at the start, so saving twice writes one file
        self.data: dict[str, Any] = {
            "bench": bench, "started": self.started.isoformat(timespec="seconds"), "threads": threads,
            "args": args or {}, "load_before": load_average(), "records": [], "tables": [],
        }

    def add(self, **record: Any) -> dict[str, Any]:
        """One raw measurement (one repeat of one configuration), kept as given."""
        self.data["records"].append(record)
        return record

    def table(self, title: str, columns: list[str], rows: list[list[Any]], note: str | None = None) -> None:
        """A table for bench/README.md: a title, column names, rows of values (numbers stay numbers)."""
        if any(len(r) != len(columns) for r in rows):
            raise ValueError(f"table {title!r}: every row needs {len(columns)} values ({', '.join(columns)})")
        self.data["tables"].append({"title": title, "columns": list(columns), "rows": [list(r) for r in rows],
                                    "note": note})

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.data["records"]

    def save(self, summary: dict[str, Any] | None = None, directory: Path | None = None) -> Path:
        """Write the file (medians and context included) and print its path."""
        commit = self.git
        self.data.update(summary=summary or {}, load_after=load_average(), versions=versions(), git=commit,
                         cpu=cpu_info(), python=platform.python_version(),
                         finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        directory = directory or RESULTS
        directory.mkdir(parents=True, exist_ok=True)
        stamp = self.started.strftime("%Y%m%d-%H%M%S")
        path = directory / f"{self.bench}-{stamp}-{(commit['commit'] or 'nogit')[:10]}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, path)
        print(f"results: {path}")
        return path
