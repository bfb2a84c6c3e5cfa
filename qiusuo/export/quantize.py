"""Weight-only int8 quantization for qiusuo's own engine (`quantize_model(model, "int8")`).

Each output channel (row) of a weight W (N, K) gets one scale s = max|W_row| / 127 and int8
values q = round(W / s), so W ~ q * s. Activations stay in floating point.

The matmul: `torch._weight_int8pack_mm` (PyTorch's CPU kernel for exactly this layout, the one
gpt-fast uses) with bfloat16 activations. Micro-benchmark, one thread, torch 2.13, 2 shared cores
(us per call, M x K x N): 1x1024x4096 fp32 5242, bf16 1727, int8pack(bf16 x) 1570, int8pack(fp32 x)
26848, dequantize-per-call 11579; 16x1024x4096 fp32 16197, bf16 4345, int8pack(bf16 x) 3703.
So fp32 activations never go to the kernel: inputs are cast to bf16 around it and back. On the
tiny presets (D=128) the casts cost more than the weight bytes saved: bench/edge.py measures int8
below fp32 there; int8 pays on matrices of real models, where decode is memory-bound. Where the kernel cannot run (not CPU, K not a multiple of 16:
it crashes on K=8, 24, 100), the weight is dequantized on the fly.

What is quantized: every `nn.Linear` inside the decoder layers and the stacked routed experts.
Left in floating point: embeddings and the output head (`Transformer.logits` reads the weight
directly), routers (fp32 by design, reference/deepseek.md §1.2), norms, and MLA's `kv_b_proj`,
whose weight the absorbed decode path reads as a tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qiusuo.model.moe import Experts

_KERNEL_K_MULTIPLE = 16  # _weight_int8pack_mm segfaults for other K (torch 2.13, measured)
_SKIP = ("kv_b_proj",)


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., N, K) float -> int8 (..., N, K), scales (..., N) fp32 with w ~ q * scale[..., None]."""
    w = w.detach().float()
    scale = w.abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, scale_bf16: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ (q * scale).T -> (..., N) in x's dtype."""
    K = q.shape[-1]
    if x.device.type == "cpu" and K % _KERNEL_K_MULTIPLE == 0:
        flat = x.reshape(-1, K).to(torch.bfloat16)  # (M, K)
        y = torch._weight_int8pack_mm(flat, q, scale_bf16)  # (M, N)
        return y.to(x.dtype).view(*x.shape[:-1], q.shape[0])
    return F.linear(x, q.to(x.dtype) * scale.to(x.dtype)[:, None])


class QuantizedLinear(nn.Module):
    """An `nn.Linear` with int8 per-output-channel weights; the bias stays in floating point."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_per_channel(linear.weight)
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scale", scale)
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_linear(x, self.qweight, self.scale, self.scale_bf16)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class QuantizedExperts(Experts):
    """Stacked routed experts with int8 per-channel weights; routing and grouping are `Experts`'."""

    def __init__(self, experts: Experts):
        nn.Module.__init__(self)
        self.num_experts = experts.num_experts
        gu_q, gu_s = quantize_per_channel(experts.gate_up_proj)  # (E, 2I, D), (E, 2I)
        d_q, d_s = quantize_per_channel(experts.down_proj)  # (E, D, I), (E, D)
        self.register_buffer("gate_up_q", gu_q.contiguous())
        self.register_buffer("gate_up_scale", gu_s)
        self.register_buffer("gate_up_scale_bf16", gu_s.to(torch.bfloat16))
        self.register_buffer("down_q", d_q.contiguous())
        self.register_buffer("down_scale", d_s)
        self.register_buffer("down_scale_bf16", d_s.to(torch.bfloat16))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = int8_linear(x, self.gate_up_q[e], self.gate_up_scale[e], self.gate_up_scale_bf16[e]).chunk(2, -1)
        return int8_linear(F.silu(gate) * up, self.down_q[e], self.down_scale[e], self.down_scale_bf16[e])


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str = "int8") -> nn.Module:
    """Replace the decoder's linear layers and stacked experts with int8 versions, in place.

    The model is for inference afterwards (eval mode; no gradients flow into int8 weights).
    Returns `model` for chaining.
    """
    if mode != "int8":
        raise ValueError(f"quantize mode {mode!r}: only 'int8' (weight-only, per-channel) is implemented")
    layers = list(model.model.layers) + list(getattr(model, "mtp", []))
    for layer in layers:
        for parent in list(layer.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and child_name not in _SKIP:
                    setattr(parent, child_name, QuantizedLinear(child))
                elif isinstance(child, Experts) and not isinstance(child, QuantizedExperts):
                    setattr(parent, child_name, QuantizedExperts(child))
    return model.eval()


__all__ = ["quantize_model", "QuantizedLinear", "QuantizedExperts", "quantize_per_channel", "int8_linear"]
