"""`EngineConfig`: the engine's knobs (how `LLM` loads a checkpoint, KV budget, batching limits), validated;
and `SpeculativeConfig`, its speculative-decoding part (vLLM's `speculative_config`).

The one list of engine options: `LLM(path, **options)` passes them here, and `qiusuo generate`,
`chat`, `eval`, `serve` and `deploy` build their engine flags from these fields (qiusuo/cli/flags.py),
so a default or an allowed value is written once and checked once (`__post_init__`).
Light on purpose (no torch): the CLI's parser imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from qiusuo.fields import check_choices, option

DType = Literal["auto", "float32", "bfloat16"]
# qiusuo.model.quantize.MODES and INT4_GROUP_SIZES (tests/test_cli_flags.py checks they agree)
Quantization = Literal["int8", "int8-dynamic", "int4"]
Int4GroupSize = Literal[32, 64, 128]
SPECULATIVE_METHODS = ("mtp",)
# Weight-only modes whose kernels take the activations: the compiled graph keeps their packed weights (compiled.py)
COMPILABLE_QUANTIZATION = (None, "int8", "int4")


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
    # How `LLM` loads a checkpoint. `LLMEngine` runs the module it is given as it is.
    device: str = option("cpu", "torch device: cpu, cuda, cuda:1, ... (a live module: its own)")
    dtype: DType = option("auto", "weights and compute dtype; auto: float32 for a checkpoint (bfloat16 is faster "
                                  "on CPUs with AMX-BF16, where its linears are prepacked, slower on most others), "
                                  "a live module's own dtype")
    quantization: Quantization | None = option(
        None, "low-bit weights (qiusuo/model/quantize.py): int8 per channel, int8-dynamic (8-bit activations "
              "too, faster on x86, less exact), int4 in groups of --int4-group-size", flag="--quantize")
    int4_group_size: Int4GroupSize = option(32, "weights per int4 scale and zero point (smaller: closer to the "
                                                "float weights, a little larger)")
    # torch.compile the decode step (compiled.py): ~2x faster decode at 4 layers of the SmolLM2-135M
    # shape (measured, load-noisy), minutes of compiling at the first start of a 100M+ model (later
    # starts hit inductor's on-disk cache), weights frozen into the graph (not for live modules).
    compile: bool | Literal["default", "max-autotune"] = option(
        False, "torch.compile the decode step: faster small-model decode on CPU, after compiling at start "
               "(minutes for a 100M+ model on first use; later starts reuse inductor's on-disk cache, "
               "TORCHINDUCTOR_CACHE_DIR); max-autotune also tunes the matmul kernels (~1 min, faster batches)")
    # The engine.
    block_size: int = option(16, "tokens per KV-cache block")
    kv_cache_bytes: int | None = option(None, "KV-cache budget in bytes (default: room for --max-num-seqs full "
                                              "contexts, capped at 1 GiB)")
    max_num_seqs: int = option(256, "sequences in one engine step")
    max_num_batched_tokens: int | None = option(None, "new tokens in one engine step (default: max(4096, the "
                                                      "context length))")
    max_model_len: int | None = option(None, "context length (default: the model's max_position_embeddings)")
    enable_prefix_caching: bool = option(True, "share the KV cache of common prompt prefixes between requests")
    seed: int = option(0, "draws the seeds of requests that do not set one")
    # None from Python: torch's own setting; the CLI picks a count from the load average (runtime.py)
    num_threads: int | None = option(None, "torch threads while the engine steps (default: all cores on a quiet "
                                           "machine, 1 of 2 when the load average says a neighbour is busy)",
                                     flag="--threads")
    # MTP self-speculative decoding, vLLM's name and shape: {"method": "mtp", "num_speculative_tokens": k};
    # on the command line --speculative-mtp K (cli/flags.py)
    speculative_config: SpeculativeConfig | dict | None = option(None, "MTP self-speculative decoding")
    # LoRA adapters served on the base, {name: adapter directory} (vLLM's --lora-modules name=path);
    # on the command line `qiusuo serve --lora-modules NAME=PATH ...` (cli/serve.py)
    lora_modules: dict[str, str] | None = option(None, "LoRA adapters served per request on the base")

    def __post_init__(self):
        check_choices(self)
        if self.compile and self.quantization not in COMPILABLE_QUANTIZATION:
            raise ValueError(f"compile with quantization={self.quantization!r} is not supported (fbgemm's "
                             "prepacked int8-dynamic weights are opaque to torch.compile); use quantization='int8' "
                             "or 'int4' (weight-only) with compile, or no compile")
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size}: must be >= 1 (16 is a good default)")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes={self.kv_cache_bytes}: must be positive (or None for the default)")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={self.max_num_seqs}: must be >= 1")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens}: must be >= 1 (or None)")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len={self.max_model_len}: must be >= 2 (a prompt token and an output token)")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads={self.num_threads}: must be >= 1 (or None to leave torch's setting)")
        self.speculative_config = SpeculativeConfig.from_value(self.speculative_config)
        if self.lora_modules is not None:
            if not isinstance(self.lora_modules, dict) or not all(
                    isinstance(k, str) and k and isinstance(v, str) and v for k, v in self.lora_modules.items()):
                raise ValueError("lora_modules must be a dict {name: adapter directory} of non-empty strings")
            if self.compile or self.speculative_config is not None:
                raise ValueError("lora_modules do not combine with compile or speculative_config yet (the compiled "
                                 "graph and the MTP drafts run the base alone); drop one, or merge the adapter into "
                                 "a checkpoint (qiusuo export merged)")
        if self.speculative_config is not None and self.compile:
            raise ValueError("compile and speculative_config do not combine yet: the compiled graph runs one "
                             "token per row, the verify step k + 1; use one or the other")

    DEFAULT_MAX_KV_BYTES = 1 << 30
