"""`EngineConfig`: the engine's knobs (KV budget, block size, batching limits), validated; and
`SpeculativeConfig`, its speculative-decoding part (vLLM's `speculative_config`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SPECULATIVE_METHODS = ("mtp",)


@dataclass
class SpeculativeConfig:
    """MTP self-speculative decoding (spec_decode.py): the model's own MTP layer drafts
    `num_speculative_tokens` tokens per step and the main model verifies them in one forward."""

    method: str = "mtp"  # the draft source; "mtp" (vLLM also names it "deepseek_mtp")
    num_speculative_tokens: int = 1  # draft tokens per step (k); DeepSeek-V3 reports k = 1

    def __post_init__(self):
        if self.method == "deepseek_mtp":
            self.method = "mtp"
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config method={self.method!r}: only 'mtp' (the model's own MTP "
                             "layer as the draft) is implemented")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
            raise ValueError(f"speculative_config num_speculative_tokens={k!r}: must be an integer in [1, 16]")

    @classmethod
    def from_value(cls, value: "SpeculativeConfig | dict[str, Any] | None") -> "SpeculativeConfig | None":
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict like {{'method': 'mtp', "
                             f"'num_speculative_tokens': 2}} or None, got {type(value).__name__}")
        unknown = set(value) - {"method", "num_speculative_tokens"}
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {sorted(unknown)}; "
                             "use 'method' and 'num_speculative_tokens'")
        return cls(**value)


@dataclass
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    kv_cache_bytes: int | None = None  # KV budget; None: room for max_num_seqs full contexts, capped at 1 GiB
    max_num_seqs: int = 256  # sequences in one step
    max_num_batched_tokens: int | None = None  # new tokens in one step; None: max(4096, max_model_len)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    seed: int = 0  # draws the seeds of requests that do not set one
    num_threads: int | None = None  # torch intra-op threads while the engine steps (restored after)
    # torch.compile the decode step (compiled.py): ~2x faster decode at 4 layers of the SmolLM2-135M
    # shape (measured, load-noisy), minutes of compiling at the first start of a 100M+ model (later
    # starts hit inductor's on-disk cache), weights frozen into the graph (not for live modules).
    # True or "default", or "max-autotune" (also tunes the matmul kernels: slower start, faster batches).
    compile: bool | str = False
    # MTP self-speculative decoding, vLLM's name and shape: {"method": "mtp", "num_speculative_tokens": k}.
    speculative_config: SpeculativeConfig | dict | None = None

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size}: must be >= 1 (16 is a good default)")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes={self.kv_cache_bytes}: must be positive (or None for the default)")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={self.max_num_seqs}: must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len={self.max_model_len}: must be >= 2 (a prompt token and an output token)")
        if self.compile not in (False, True, "default", "max-autotune"):
            raise ValueError(f"compile={self.compile!r}: use False, True (= 'default') or 'max-autotune'")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads={self.num_threads}: must be >= 1 (or None to leave torch's setting)")
        self.speculative_config = SpeculativeConfig.from_value(self.speculative_config)
        if self.speculative_config is not None and self.compile:
            raise ValueError("compile and speculative_config do not combine yet: the compiled graph runs one "
                             "token per row, the verify step k + 1; use one or the other")

    DEFAULT_MAX_KV_BYTES = 1 << 30
