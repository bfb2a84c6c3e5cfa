"""A LoRA adapter as a GGUF file llama.cpp applies on the exported base (`llama-cli -m base.gguf --lora
adapter.gguf`, llama-cpp-python's `Llama(model_path=..., lora_path=...)`).

Layout of llama.cpp's `convert_lora_to_gguf.py`, checked against its loader (`src/llama-adapter.cpp`):
`general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, the base's architecture, and
for every adapted weight `<base tensor name>.lora_a` (A, (r, in)) and `.lora_b` (B, (out, r)) in
PyTorch's layout (ggml reads them as {in, r} and {r, out}: the loader checks A.ne[0] == W.ne[0],
B.ne[1] == W.ne[1]). llama.cpp scales by alpha / r with r read from each lora_a.

Where the base export reorders a weight's rows (llama's q/k rows into adjacent pairs, gguf_file.py),
the same reordering is applied to B's rows, as the converter does: (W + s B A) with permuted rows =
P W + s (P B) A. For deepseek2 only `o_proj` and the MLPs (dense layers and shared experts) can carry an
adapter: llama.cpp's deepseek2 graph (src/models/deepseek2.cpp) multiplies wq / wq_a / wq_b /
wkv_a_mqa with plain ggml_mul_mat, never the adapters (measured: logits unchanged by such an adapter),
and splits kv_b_proj in two; such adapters are refused rather than silently dropped. Merge them
(`qiusuo export merged`) and export the merged checkpoint instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch

from .gguf_file import T, _name, _permute_pairs, check_gguf_support

LORA_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}
Rows = Callable[[torch.Tensor], torch.Tensor]


def _same(w: torch.Tensor) -> torch.Tensor:
    return w


def lora_tensor_map(model) -> dict[str, tuple[str, Rows]]:
    """Our module name -> (the GGUF tensor its weight is exported as, the row reordering applied to it)."""
    cfg = model.config
    llama = cfg.model_type == "llama"
    out: dict[str, tuple[str, Rows]] = {}
    for i, layer in enumerate(model.model.layers):
        attn, p = layer.self_attn, f"model.layers.{i}"
        if cfg.is_deepseek:  # attention: only the output projection takes an adapter in llama.cpp
            out[f"{p}.self_attn.o_proj"] = (_name(T.ATTN_OUT, i), _same)
        else:
            for kind, proj, heads in ((T.ATTN_Q, "q_proj", attn.num_heads), (T.ATTN_K, "k_proj", attn.num_kv_heads),
                                      (T.ATTN_V, "v_proj", None), (T.ATTN_OUT, "o_proj", None)):
                rows = (lambda w, h=heads: _permute_pairs(w, h)) if llama and heads else _same
                out[f"{p}.self_attn.{proj}"] = (_name(kind, i), rows)
        if cfg.is_moe_layer(i):
            mlp, kinds = f"{p}.mlp.shared_experts", (T.FFN_GATE_SHEXP, T.FFN_UP_SHEXP, T.FFN_DOWN_SHEXP)
        else:
            mlp, kinds = f"{p}.mlp", (T.FFN_GATE, T.FFN_UP, T.FFN_DOWN)
        for kind, proj in zip(kinds, ("gate_proj", "up_proj", "down_proj")):
            out[f"{mlp}.{proj}"] = (_name(kind, i), _same)
    return out


def export_lora_gguf(model, adapter_dir: str | os.PathLike, path: str | os.PathLike, dtype: str = "f32",
                     name: str = "qiusuo-lora") -> Path:
    """Write the PEFT adapter at `adapter_dir` (checked against the base `model`) as a llama.cpp LoRA GGUF."""
    from qiusuo.model.lora import PEFT_PREFIX, read_adapter

    if dtype not in LORA_TYPES:
        raise ValueError(f"dtype={dtype!r}: a LoRA GGUF is written in {' or '.join(LORA_TYPES)}")
    arch = check_gguf_support(model.config)
    cfg, names, tensors = read_adapter(model, adapter_dir)
    mapping = lora_tensor_map(model)
    unmapped = [n for n in names if n not in mapping]
    if unmapped:
        why = (" (llama.cpp's deepseek2 applies adapters only to attn_output and the FFNs)"
               if model.config.is_deepseek else "")
        raise ValueError(f"{adapter_dir}: no llama.cpp tensor takes an adapter on {', '.join(unmapped[:3])}{why}; "
                         "merge the adapter (qiusuo export merged) and export the merged checkpoint")
    qtype = LORA_TYPES[dtype]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg["lora_alpha"]))
        writer.add_name(name)
        for n in names:
            target, rows = mapping[n]
            a = tensors[f"{PEFT_PREFIX}{n}.lora_A.weight"].to(torch.float32)  # (r, in)
            b = rows(tensors[f"{PEFT_PREFIX}{n}.lora_B.weight"].to(torch.float32))  # (out, r), rows as the base's
            for suffix, t in (("lora_a", a), ("lora_b", b)):
                data = t.contiguous().numpy()
                data = data.astype(np.float16) if qtype == gguf.GGMLQuantizationType.F16 else data
                writer.add_tensor(f"{target}.{suffix}", data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path
