"""The training part: one loop (loop.py) and the stages on it.

    pretrain.py   Pretrain: a fresh model on a task's corpus            -> `qiusuo pretrain`
    sft.py        SFT on JSONL records (and the step pretrain shares)   -> `qiusuo sft`
    distill.py    Distill: teacher rejection sampling + student SFT     -> `qiusuo distill`
    grpo.py       GRPO with rollouts through the engine                 -> `qiusuo grpo`
    objectives.py advantages, clipped policy loss, KL k3 (pure tensor functions)
    final.py      RUN/final: the finished model, its recipe and metrics summary
    demo.py       the R1-Zero recipe in miniature                       -> `qiusuo demo`

Submodules are imported lazily: `from qiusuo.train import GRPO` loads only what it needs.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "TrainConfig": "config", "PretrainConfig": "config", "SFTConfig": "config", "DistillConfig": "config",
    "GRPOConfig": "config", "Trainer": "loop", "FitResult": "loop", "NonFiniteLossError": "loop",
    "Pretrain": "pretrain", "SFT": "sft", "Distill": "distill", "GRPO": "grpo", "evaluate": "evaluate",
    "DemoConfig": "demo", "run_demo": "demo",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"qiusuo.train.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'qiusuo.train' has no attribute {name!r}")
