"""Fixtures shared by the test modules: tiny checkpoints built once per test run.

`make_checkpoint(preset="tiny-dense", seed=0, metadata=None, **overrides)` returns the directory
of a randomly initialised model with the built-in tokenizer, saved in HF layout. Each distinct
set of arguments is built and saved once per session and shared by every module that asks for
it, so treat the directory as read-only: copy it (or import it into a registry) before changing
anything in it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory) -> Callable[..., Path]:
    built: dict[str, Path] = {}

    def make(preset: str = "tiny-dense", seed: int = 0, metadata: dict[str, Any] | None = None,
             **overrides: Any) -> Path:
        from qiusuo.model import build_model, save_model

        key = json.dumps([preset, seed, metadata, overrides], sort_keys=True)
        if key not in built:
            model, tokenizer = build_model(preset, seed=seed, **overrides)
            built[key] = save_model(model, tokenizer, tmp_path_factory.mktemp(preset) / "ckpt", metadata=metadata)
        return built[key]

    return make
