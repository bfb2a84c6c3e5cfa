"""The model part: config, the one Transformer, and HF-layout checkpoints.

Dimension letters, one legend for the whole package (a file's docstring names the ones it
uses, and a shape comment on a reshape, gather or einsum uses these letters):

    B   batch rows (sequences; in GRPO B = P * G)      D   hidden_size
    T   new positions of a forward (training: all)     V   vocab_size
    S   visible positions (past + new), or a padded    H   query heads
        row's length                                   Hk  key/value heads
    N   flattened tokens (B * T, or the real ones      hd  head_dim
        of a padded batch)                             g   query heads per key/value head (H / Hk)
    E   routed experts                                 C   kv_lora_rank (MLA latent)
    K   experts per token (num_experts_per_tok)        R   qk_rope_head_dim (MLA)
    I   moe_intermediate_size                          Dn  qk_nope_head_dim (MLA)
    Ng  expert groups (n_group)                        Dv  v_head_dim (MLA)
    P   prompts per GRPO step                          G   samples per prompt (GRPO's group)
    nb  blocks per row (the engine's block tables)     d   the last dim `apply_rope` turns
"""

from .cache import Cache, DynamicCache
from .checkpoint import load_model, read_metadata, save_model
from .config import PRESETS, ModelConfig, preset
from .factory import build_model, describe, kv_cache_bytes_per_token
from .transformer import Transformer

__all__ = [
    "Cache", "DynamicCache", "ModelConfig", "PRESETS", "preset", "Transformer", "build_model", "describe",
    "kv_cache_bytes_per_token", "load_model", "read_metadata", "save_model",
]

