"""Model configuration: one dataclass whose fields are HF config.json names.

A config.json written by transformers for Qwen2, Llama or DeepseekV3 maps onto
`ModelConfig` one to one; `to_hf_dict` writes one transformers can read back.
Fields transformers does not know (the balancing speed, the MTP loss weight)
are written too: transformers ignores unknown keys.

A config.json is untrusted input (a downloaded or hand-edited checkpoint): every field is
type-checked (bool is not an int; a float field takes an int) and range-checked, with upper
bounds far above any released model, before anything is allocated, and the error names the
field. `num_hidden_layers=100000` or `hidden_size=0` is a ValueError, not an OOM or a crash
deep inside torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_TYPES = ("qwen2", "llama", "deepseek_v3")
ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}


# Upper bounds: generous (DeepSeek-V3 has 61 layers, 7168 hidden, 256 experts; vocabularies reach
# ~256k), low enough that a typo cannot ask for terabytes.
_BOUNDS = {
    "vocab_size": (1, 1 << 22), "hidden_size": (1, 1 << 16), "intermediate_size": (1, 1 << 20),
    "num_hidden_layers": (1, 1024), "num_attention_heads": (1, 1024), "num_key_value_heads": (1, 1024),
    "head_dim": (2, 4096), "max_position_embeddings": (1, 1 << 24), "q_lora_rank": (0, 1 << 16),
    "kv_lora_rank": (1, 1 << 16), "qk_nope_head_dim": (1, 4096), "qk_rope_head_dim": (2, 4096),
    "v_head_dim": (1, 4096), "n_routed_experts": (1, 4096), "n_shared_experts": (0, 64),
    "moe_intermediate_size": (1, 1 << 20), "num_experts_per_tok": (1, 4096), "n_group": (1, 4096),
    "topk_group": (1, 4096), "first_k_dense_replace": (0, 1024), "num_nextn_predict_layers": (0, 16),
}
_POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta", "initializer_range")
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "dict": "an object", "None": "null", "list[int]": "a list of integers"}


def _check_types(cfg: "ModelConfig") -> None:
    """Each field against its annotation (`int | None` etc.), exactly: JSON `true` is not 1."""
    for f in dataclasses.fields(cfg):
        value, allowed = getattr(cfg, f.name), f.type
        options = [a.strip() for a in allowed.split("|")] if isinstance(allowed, str) else [allowed]
        ok = False
        for option in options:
            if option == "None" and value is None:
                ok = True
            elif option == "int" and type(value) is int:
                ok = True
            elif option == "float" and type(value) in (int, float) and math.isfinite(value):
                ok = True
            elif option in ("bool", "str", "dict") and type(value) is {"bool": bool, "str": str, "dict": dict}[option]:
                ok = True
            elif option == "list[int]" and type(value) is list and all(type(v) is int for v in value):
                ok = True
        if not ok:
            wanted = " or ".join(_TYPE_WORDS.get(str(o), str(o)) for o in options)
            raise ValueError(f"config field {f.name}={value!r:.60} must be {wanted}")


@dataclass
class ModelConfig:
    model_type: str = "qwen2"
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool | None = None  # None: the architecture's default (qwen2: q/k/v bias)
    mlp_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    # --- DeepSeek-V3: MLA ---
    q_lora_rank: int | None = None
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope_interleave: bool = True
    # --- DeepSeek-V3: DeepSeekMoE ---
    n_routed_experts: int | None = None
    n_shared_experts: int = 1
    moe_intermediate_size: int = 128
    num_experts_per_tok: int = 2
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    # --- DeepSeek-V3: MTP ---
    num_nextn_predict_layers: int = 0
    # --- qiusuo training knobs (unknown to transformers, which ignores them) ---
    aux_loss_alpha: float = 0.0  # sequence-wise balance loss weight (V3: 1e-4)
    bias_update_speed: float = 0.001  # gamma of auxiliary-loss-free balancing
    mtp_loss_weight: float = 0.3  # lambda of the MTP loss

    def __post_init__(self):
        _check_types(self)
        for name, (low, high) in _BOUNDS.items():
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise ValueError(f"config field {name}={value} must be in [{low}, {high}]")
        for name in _POSITIVE_FLOATS:
            if not getattr(self, name) > 0:
                raise ValueError(f"config field {name}={getattr(self, name)} must be positive")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"model_type={self.model_type!r} is not supported; use one of {', '.join(MODEL_TYPES)}"
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.attention_bias is None:
            self.attention_bias = self.model_type == "qwen2"
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU) is implemented")
        if self.rope_scaling and (self.rope_scaling.get("rope_type") or self.rope_scaling.get("type")) not in (None, "default"):
            raise ValueError(
                f"rope_scaling={self.rope_scaling!r}: only default RoPE is implemented; "
                "remove rope_scaling or set its rope_type to 'default'"
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.is_deepseek:
            self._check_deepseek()
        else:
            if self.head_dim is None:
                if self.hidden_size % self.num_attention_heads:
                    raise ValueError(
                        f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                        f"{self.num_attention_heads}; set head_dim explicitly"
                    )
                self.head_dim = self.hidden_size // self.num_attention_heads
            if self.head_dim % 2:
                raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    def _check_deepseek(self):
        if self.num_key_value_heads != self.num_attention_heads:
            raise ValueError(
                "num_key_value_heads must equal num_attention_heads for MLA "
                f"(got {self.num_key_value_heads} and {self.num_attention_heads})"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even for RoPE")
        if self.q_lora_rank == 0:
            self.q_lora_rank = None  # the reference code's "no query compression"
        if self.n_routed_experts:
            e = self.n_routed_experts
            if e % self.n_group:
                raise ValueError(f"n_routed_experts={e} must be divisible by n_group={self.n_group}")
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
            if self.n_group > 1 and e // self.n_group < 2:
                raise ValueError(
                    f"each of the n_group={self.n_group} expert groups needs at least 2 experts "
                    f"(n_routed_experts={e}); lower n_group"
                )
            if not 1 <= self.num_experts_per_tok <= self.topk_group * (e // self.n_group):
                raise ValueError(
                    f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                    f"topk_group * n_routed_experts / n_group = {self.topk_group * (e // self.n_group)}"
                )
            if self.scoring_func not in ("sigmoid", "softmax"):
                raise ValueError(f"scoring_func={self.scoring_func!r}: use 'sigmoid' or 'softmax'")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError(
                f"first_k_dense_replace={self.first_k_dense_replace} must be in [0, num_hidden_layers]"
            )

    # ------------------------------------------------------------------ derived
    @property
    def is_deepseek(self) -> bool:
        return self.model_type == "deepseek_v3"

    def is_moe_layer(self, layer_idx: int) -> bool:
        return bool(self.is_deepseek and self.n_routed_experts and layer_idx >= self.first_k_dense_replace)

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a model config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        # transformers 5.x writes rope_parameters instead of rope_theta / rope_scaling.
        rope = d.pop("rope_parameters", None)
        if rope is not None and not isinstance(rope, dict):
            raise ValueError(f"config field rope_parameters must be an object, got {rope!r:.60}")
        if rope:
            d.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                d.setdefault("rope_scaling", rope)
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d["dtype"]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text: {e}") from None
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json transformers reads (legacy rope keys for 4.x compatibility)."""
        d = dataclasses.asdict(self)
        d["architectures"] = [ARCHITECTURES[self.model_type]]
        if self.is_deepseek:
            for k in ("head_dim", "mlp_bias"):
                d.pop(k)
        else:
            for k in _DEEPSEEK_ONLY:
                d.pop(k)
        d["use_cache"] = True
        return d


_DEEPSEEK_ONLY = (
    "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "rope_interleave", "n_routed_experts", "n_shared_experts", "moe_intermediate_size",
    "num_experts_per_tok", "n_group", "topk_group", "first_k_dense_replace",
    "routed_scaling_factor", "norm_topk_prob", "scoring_func", "num_nextn_predict_layers",
    "aux_loss_alpha", "bias_update_speed", "mtp_loss_weight",
)


# Presets: a few million parameters, trainable on 2 CPU cores in minutes.
# vocab_size, bos/eos/pad are filled in from the tokenizer by `preset()`.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-dense": dict(
        model_type="qwen2", hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        max_position_embeddings=512,
    ),
    "tiny-moe": dict(
        model_type="deepseek_v3", hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8,
        n_shared_experts=1, moe_intermediate_size=96, num_experts_per_tok=2, n_group=2,
        topk_group=1, first_k_dense_replace=1, routed_scaling_factor=1.0, norm_topk_prob=True,
        num_nextn_predict_layers=1, max_position_embeddings=512,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


__all__ = ["ModelConfig", "PRESETS", "preset", "MODEL_TYPES"]
