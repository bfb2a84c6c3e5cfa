"""RUN/final: the finished model of a stage, with its recipe and a summary of its last metrics.

Every stage ends the same way: the model in HF layout under RUN/final with `qiusuo.json` naming
the stage, the parent checkpoint, the resolved config and the mean of the last steps' metrics;
`--register NAME` also imports it into the local model registry.
"""

from __future__ import annotations

from pathlib import Path

from .loop import Trainer


def save_final(trainer: Trainer, stage: str, parent: str | None = None) -> Path:
    """RUN/final: the model in HF layout with stage, parent, recipe and a metrics summary."""
    from qiusuo.model import save_model

    summary = last_metrics(trainer.run / "metrics.jsonl")
    path = save_model(trainer.model, trainer.tokenizer, trainer.run / "final", metadata={
        "stage": stage, "parent": parent, "recipe": trainer.cfg.to_dict(), "metrics": summary,
        "steps": trainer.step, "run_dir": str(trainer.run)})
    if trainer.cfg.register:
        from qiusuo.registry import Registry

        info = Registry().import_dir(path, trainer.cfg.register, source_run=str(trainer.run))
        print(f"registered {path} as {info.ref}")
    return path


def last_metrics(path: Path, window: int = 10) -> dict[str, float]:
    """Mean of the numeric metrics over the last `window` steps of a metrics.jsonl."""
    import json

    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][-window:]
    keys = [k for k in (rows[-1] if rows else {})
            if isinstance(rows[-1][k], (int, float)) and k not in ("step", "time")]
    return {k: round(sum(r.get(k, 0) for r in rows) / len(rows), 6) for k in keys}


__all__ = ["save_final", "last_metrics"]
