"""What a checkpoint directory is, read without torch: architecture from config.json, parameter
count from the safetensors headers, provenance from qiusuo.json.

A safetensors file starts with an 8-byte little-endian header length and then that many bytes of
JSON mapping each tensor name to its dtype, shape and byte offsets; reading only that header
counts a multi-gigabyte checkpoint's parameters in microseconds.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

_MAX_HEADER_BYTES = 100 * 1024**2  # the format's own limit
# Stored tensors that are not parameters of their own, skipped so the count equals
# `Transformer.num_parameters()`: the copies of the embedding and output head DeepSeek's MTP layers
# store (qiusuo.model.checkpoint writes them too), and the MoE router's load-balancing bias (a buffer).
_NOT_PARAMETERS = re.compile(
    r"^model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight$|\.e_score_correction_bias$")
_EVAL_KEYS = ("score", "pass@1", "accuracy", "mean_reward")


def safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file; ValueError naming the file if it is not one."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER_BYTES):
            raise ValueError(f"{path} is not a safetensors file or is truncated (header length {n} "
                             f"does not fit in {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} has a corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a corrupt safetensors header (not a JSON object)")
    return header


def count_parameters(files: list[Path]) -> int:
    total = 0
    for f in files:
        for name, entry in safetensors_header(f).items():
            if name == "__metadata__" or _NOT_PARAMETERS.search(name):
                continue
            total += math.prod(entry["shape"])
    return total


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or remove it before importing") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return obj


def eval_score_of(value: Any) -> float | None:
    """qiusuo.json's `eval`: a number, or a summary dict with one of the usual headline keys."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        for key in _EVAL_KEYS:
            if isinstance(value.get(key), (int, float)) and not isinstance(value.get(key), bool):
                return float(value[key])
    return None


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """architecture, model_type, parameters, source_run, eval_score and metadata of a checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a checkpoint directory (no config.json)")
    config = _read_json(path / "config.json")
    architectures = config.get("architectures") or []
    weights = sorted(path.glob("*.safetensors"))
    meta = _read_json(path / "qiusuo.json") if (path / "qiusuo.json").is_file() else {}
    return {
        "architecture": architectures[0] if architectures else None,
        "model_type": config.get("model_type"),
        "parameters": count_parameters(weights) if weights else None,
        "source_run": meta.get("run_dir") or meta.get("source_run"),
        "eval_score": eval_score_of(meta.get("eval_score", meta.get("eval"))),
        "metadata": meta,
    }
