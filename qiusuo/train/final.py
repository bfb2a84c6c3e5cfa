"""RUN/final: the finished model of a stage, with its recipe and a summary of its last metrics.

Every stage ends the same way: the model in HF layout under RUN/final with `qiusuo.json` naming
the stage, the parent checkpoint, the resolved config and the mean of the last steps' metrics;
`--register NAME` also imports it into the local model registry. A LoRA run's final/ holds the
merged model (a full checkpoint, as every stage writes) and final/adapter/ the adapter alone in
PEFT's layout (`adapter_config.json` + `adapter_model.safetensors`, base: the parent checkpoint);
`qiusuo.model.lora.merge_adapter(base, adapter, out)` merges an adapter onto a base in one call.
"""

from __future__ import annotations

from pathlib import Path

from qiusuo.model import lora

from .loop import Trainer

ADAPTER_DIR = "adapter"  # RUN/final/adapter: the PEFT adapter of a LoRA run


def save_final(trainer: Trainer, stage: str, parent: str | None = None) -> Path:
    """RUN/final: the model in HF layout with stage, parent, recipe and a metrics summary."""
    from qiusuo.model import save_model

    summary = last_metrics(trainer.run / "metrics.jsonl")
    meta = {"stage": stage, "parent": parent, "recipe": trainer.cfg.to_dict(), "metrics": summary,
            "steps": trainer.step, "run_dir": str(trainer.run)}
    model = trainer.model
    if lora.has_lora(model):
        # The merged model is what every later stage reads (serve, eval, export); the adapter beside it
        # is the small artifact, in PEFT's layout (a subdirectory: transformers, finding an
        # adapter_config.json next to config.json, would load the adapter's base instead).
        with lora.unloaded(model):
            path = save_model(model, trainer.tokenizer, trainer.run / "final", metadata={
                **meta, "lora": {"r": model.lora_spec.r, "adapter": ADAPTER_DIR}})
        lora.save_adapter(model, path / ADAPTER_DIR, base_model_name_or_path=parent)
    else:
        path = save_model(model, trainer.tokenizer, trainer.run / "final", metadata=meta)
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
