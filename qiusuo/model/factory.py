"""Building a fresh model for a tokenizer, and describing a model in one dict."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .config import PRESETS, ModelConfig, preset
from .transformer import Transformer


def build_model(preset_or_config: str, tokenizer: Any = None, seed: int = 0, **overrides) -> tuple[Transformer, Any]:
    """A randomly initialised model from a preset name or a config.json path, sized to `tokenizer`
    (the built-in tokenizer by default): vocab_size and bos/eos/pad ids come from it."""
    if tokenizer is None:
        from qiusuo.tokenizer import Tokenizer

        tokenizer = Tokenizer.builtin()
    special = dict(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if preset_or_config in PRESETS:
        config = preset(preset_or_config, **special, **overrides)
    elif Path(preset_or_config).is_file():
        d = ModelConfig.from_json(preset_or_config).__dict__
        config = ModelConfig(**{**d, **special, **overrides})
    else:
        raise ValueError(f"{preset_or_config!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file")
    model = Transformer(config)
    model.reset_parameters(seed=seed)
    return model, tokenizer


def kv_cache_bytes_per_token(model: Transformer, dtype: torch.dtype | None = None) -> int:
    """Bytes of KV cache one token occupies across all layers (MLA: latent + RoPE key only)."""
    size = torch.tensor([], dtype=dtype or model.dtype).element_size()
    return sum(math.prod(d) * size for layer in model.model.layers for d in layer.self_attn.cache_dims())


def describe(model: Transformer) -> dict[str, Any]:
    cfg = model.config
    out = {
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "parameters": f"{model.num_parameters():,}",
        "active_parameters": f"{model.num_parameters(active=True):,}",
        "attention": "MLA" if cfg.is_deepseek else f"GQA ({cfg.num_attention_heads}q/{cfg.num_key_value_heads}kv heads)",
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(model),
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    if cfg.n_routed_experts and cfg.is_deepseek:
        out["experts"] = (f"{cfg.n_shared_experts} shared + {cfg.n_routed_experts} routed, top-{cfg.num_experts_per_tok}"
                          f" in {cfg.topk_group}/{cfg.n_group} groups, first {cfg.first_k_dense_replace} dense")
    if len(model.mtp):
        out["mtp_depths"] = len(model.mtp)
    return out
