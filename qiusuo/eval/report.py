"""Eval reports: `report.json`, a PNG plot (accuracy by difficulty, else by completion length), a table."""

from __future__ import annotations

import json
from pathlib import Path

from .evaluate import EvalResult


def write_report(result: EvalResult, out_dir: str | Path, extra: dict | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {**result.to_dict(), **(extra or {})}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    with (out / "samples.jsonl").open("w") as f:
        for r in result.records:
            f.write(json.dumps(r) + "\n")
    plot_accuracy(result, out / "accuracy.png")
    return out / "report.json"


def plot_accuracy(result: EvalResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, label = (result.by_difficulty, "difficulty") if len(result.by_difficulty) > 1 else (
        result.by_length, "completion length (tokens)")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    keys = list(groups)
    ax.bar(keys, [groups[k]["accuracy"] for k in keys], color="#4c72b0")
    for i, k in enumerate(keys):
        ax.text(i, groups[k]["accuracy"], f"n={groups[k]['count']}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(label)
    ax.set_ylabel("accuracy (per sample)")
    ax.set_title(f"{result.task}: pass@1 {result.metrics['pass@1']:.3f} "
                 f"({result.num_problems} problems x {result.samples}, T={result.temperature})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(result: EvalResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result.task}: {result.num_problems} problems x {result.samples} samples, "
                        f"T={result.temperature}, seed {result.seed}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result.metrics.items():
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    Console().print(table)
    if len(result.by_difficulty) > 1:
        t = Table(title="accuracy by difficulty")
        t.add_column("difficulty")
        t.add_column("accuracy", justify="right")
        t.add_column("samples", justify="right")
        for k, v in result.by_difficulty.items():
            t.add_row(k, f"{v['accuracy']:.3f}", str(v["count"]))
        Console().print(t)
