"""Fixtures and hooks shared by the test modules: tiny checkpoints built once per test run, and the
full-suite hint printed when the browser test was skipped.

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

# --- the full-suite hint (issue 21) ------------------------------------------------------------------------
# Printed after pytest's summary when the dashboard's browser test was skipped for want of Chromium;
# tools/troubleshooting.py quotes it in README's Troubleshooting section.
CHROMIUM_HINT = ("hint: the dashboard's browser test was skipped because Chromium is not installed; "
                 "for the full suite: apt-get install chromium (Debian/Ubuntu), then make test")


def chromium_was_skipped(skipped_reports) -> bool:
    return any("chromium" in str(getattr(r, "longrepr", "")).lower() for r in skipped_reports)


def pytest_terminal_summary(terminalreporter):
    if chromium_was_skipped(terminalreporter.stats.get("skipped", [])):
        terminalreporter.write_line(CHROMIUM_HINT, yellow=True)
