"""The OpenAI-compatible server: `create_app(engine, served_model_name=...)` and `qiusuo serve`.

FastAPI routes over an `EngineCoreClient` (the `LLMEngine` stepping on a thread of the API
process or in an engine-core process of its own), with the reasoning split and thinking budget
(both from `qiusuo.engine.reasoning`), Prometheus metrics, Bearer auth and a bounded waiting queue.
Names are imported on first use, so `qiusuo.serve.config` stays light for the CLI's parser.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "create_app": "app", "EngineCoreClient": "core_client", "ServerConfig": "config",
    "ReasoningSplitter": "qiusuo.engine.reasoning", "split_final": "qiusuo.engine.reasoning",
    "ThinkingBudget": "qiusuo.engine.reasoning",
    "ServerThread": "server",
}  # fmt: skip

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = _EXPORTS[name]
        return getattr(importlib.import_module(module if "." in module else f".{module}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
