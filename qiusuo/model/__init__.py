"""The model part: config, the one Transformer, and HF-layout checkpoints."""

from .cache import Cache, DynamicCache
from .checkpoint import load_model, read_metadata, save_model
from .config import PRESETS, ModelConfig, preset
from .factory import build_model, describe, kv_cache_bytes_per_token
from .transformer import Transformer

__all__ = [
    "Cache", "DynamicCache", "ModelConfig", "PRESETS", "preset", "Transformer", "build_model", "describe",
    "kv_cache_bytes_per_token", "load_model", "read_metadata", "save_model",
]

