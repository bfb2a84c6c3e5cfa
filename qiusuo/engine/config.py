"""`EngineConfig`: the engine's knobs (KV budget, block size, batching limits), validated."""

from __future__ import annotations

from dataclasses import dataclass


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

    DEFAULT_MAX_KV_BYTES = 1 << 30
