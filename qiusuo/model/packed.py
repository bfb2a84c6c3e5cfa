"""bf16 linear layers on oneDNN's prepacked weights: `pack_bf16_linears(model)`, applied by `LLM` where it pays.

On a CPU with AMX-BF16 PyTorch runs a bf16 `F.linear` on oneDNN's AMX matmul (`brg_matmul:avx10_1_512_amx`
in ONEDNN_VERBOSE), but from a plain row-major weight, which the kernel reorders into its tile layout
on every call. Reordering each weight once (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's
`weight_prepack` does) and calling `torch.ops.mkldnn._linear_pointwise` on it took the matmuls of one
decode step from 40.0 to 28.6 ms of CPU time at batch 1 and from 44.3 to 30.3 ms at batch 16 at the
SmolLM2-135M shape, 114.3 -> 86.4 and 122.8 -> 88.5 ms at the Qwen2.5-0.5B shape (bench/kernels.py,
one thread, Sapphire Rapids class Xeon, weights cold); the engine's bf16 decode step at the
SmolLM2-135M shape went from 59.5 to 46.9 ms (B=1) and 74.7 to 59.7 ms (B=16) of CPU time.

What is packed: the GQA `Attention` projections (q/k/v fused into one matrix, `Attention.qkv_proj`)
and `o_proj`, the `MLP`s (gate/up fused, `MLP.gate_up_proj`) and `down_proj`, of the decoder layers
(MTP layers and MLA attention, whose `kv_b_proj` the absorbed decode path reads as a tensor, are
left as they are), and an untied output head (a tied head is the embedding table, which lookups
read: packing it would hold its weights twice). Each packed weight replaces the float one (the
weights stay held once). The packed tensors are oneDNN's opaque layout: a packed model is for
inference (no gradients, no LoRA serving, not saved), which is why only `LLM` applies it, to the
checkpoints it loads itself, in bf16, on the CPU, without compile (inductor does its own packing,
or not: compiled.py), and only where `cpu_has_amx_bf16()` says the CPU has AMX-BF16: the flag is
read from /proc/cpuinfo, not assumed. Greedy tokens equal the unpacked bf16 model's up to ties
(the same bf16 matmul, accumulated in another order; tests/test_packed.py).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from qiusuo.runtime import cpu_flags


@functools.cache
def cpu_has_amx_bf16() -> bool:
    """AMX-BF16 (Sapphire Rapids and later Xeons), from the CPU's flags; and a oneDNN build that runs bf16."""
    return "amx_bf16" in cpu_flags() and torch.backends.mkldnn.is_available() and \
        torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedLinear(nn.Module):
    """One or several bf16 `nn.Linear`s sharing an input (fused along N), the weight reordered once for oneDNN."""

    def __init__(self, parts: list[nn.Linear]):
        super().__init__()
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        w = torch.cat([p.weight.detach() for p in parts]) if len(parts) > 1 else parts[0].weight.detach()
        # batch-size hint 1: decode's rows (any batch runs on the packed weight; measured no slower at 16)
        self.weight_packed = torch.ops.mkldnn._reorder_linear_weight(w.to(torch.bfloat16).contiguous(), 1)
        biases = [p.bias for p in parts]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else torch.zeros(p.out_features, dtype=p.weight.dtype)
             for p, b in zip(parts, biases)]).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight_packed, self.bias, "none", [None], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 prepacked"


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLinear) for m in model.modules())


@torch.no_grad()
def pack_bf16_linears(model: nn.Module) -> int:
    """Replace a bf16 `Transformer`'s decoder linears (and an untied head) with `PackedLinear`s, in place;
    the number of matrices packed. The caller checks the conditions (`LLM`: bf16, CPU, AMX-BF16)."""
    from .attention import Attention
    from .layers import MLP

    if model.dtype != torch.bfloat16:
        raise ValueError(f"pack_bf16_linears packs bf16 weights; the model is {model.dtype}")
    n = 0
    for layer in model.model.layers:
        for m in list(layer.modules()):
            if type(m) is Attention and m.qkv_proj is None and m.q_proj is not None:
                m.qkv_proj = PackedLinear([m.q_proj, m.k_proj, m.v_proj])
                m.q_proj = m.k_proj = m.v_proj = None
                m.o_proj = PackedLinear([m.o_proj])
                n += 2
            elif type(m) is MLP and m.gate_up_proj is None and m.gate_proj is not None:
                m.gate_up_proj = PackedLinear([m.gate_proj, m.up_proj])
                m.gate_proj = m.up_proj = None
                m.down_proj = PackedLinear([m.down_proj])
                n += 2
    if model.lm_head is not None and model.output_head is None:  # untied: the head's own matrix
        model.output_head = PackedLinear([model.lm_head])
        model.lm_head = None
        n += 1
    return n


__all__ = ["PackedLinear", "pack_bf16_linears", "cpu_has_amx_bf16", "is_packed"]
