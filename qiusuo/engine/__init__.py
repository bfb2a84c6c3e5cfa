"""The generation engine: continuous batching over a paged KV cache with prefix sharing.

The one generation path of qiusuo (rollouts, eval, CLI chat, serving). The split follows
nano-vllm with vLLM's names: `SamplingParams`, `Sequence`/`SequenceGroup`, `BlockManager`,
`Scheduler`, `ModelRunner` (over `PagedKVCache`), `LLMEngine`, and the offline `LLM`.
Names other than `EngineConfig` are imported on first use, so the CLI's parser can read
`EngineConfig` without importing torch.
"""

from __future__ import annotations

import importlib

from .config import EngineConfig

_EXPORTS = {
    "LLM": "llm", "LLMEngine": "llm_engine", "SamplingParams": "sampling_params",
    "RequestOutput": "outputs", "CompletionOutput": "outputs", "Logprob": "outputs",
    "StructuredOutputsParams": "guided", "LoRARequest": "lora_request",
}  # fmt: skip

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "StructuredOutputsParams", "RequestOutput",
           "CompletionOutput", "Logprob", "LoRARequest"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
