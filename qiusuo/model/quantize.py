"""Low-bit weights for inference: `quantize_model(model, "int8" | "int4")`, a model transform the engine applies.

CPU decoding at real sizes is bound by the bytes of weight streamed per token, so the matmuls of
the decoder layers run on PyTorch's packed low-bit CPU kernels instead of fp32 GEMMs:

- int8: per-output-channel symmetric weights, W ~ q * scale (q in [-127, 127], one fp32 scale per
  row), weight-only: `_weight_int8pack_mm`. Its fast path takes bf16 activations (the fp32 one ran
  2.4 ms against an fp32 GEMM's 0.85 ms, 1 thread, AVX2, M=1, 576 x 3072), so activations are cast to
  bf16 around the kernel and back: 0.42 ms there; at M=16 3.7 ms, level with fp32. The model's own
  dtype stays fp32 unless the user asks for bf16 (native bf16 is reported by `cpu_has_native_bf16`).
- int8-dynamic (x86): the same weights on fbgemm's `quantized::linear_dynamic`, which also
  quantizes the activations per call (one scale per call; 8-bit range where the CPU has AVX512-VNNI,
  detected, 7-bit without it: max logit error on tiny-dense 5.1% against 7.9%) and
  runs an int8 x int8 GEMM, as llama.cpp's q8_0 path quantizes activations to 8 bits (but per
  block of 32): 0.21 ms at M=1 and 1.9 ms at M=16 above, at an accuracy cost (max logit error
  ~8% of the largest logit on tiny-dense, against ~1.6% for weight-only int8; tests/test_quantize.py).
- int4: group-wise asymmetric weights (groups of `group_size` = 32, 64 or 128 along K, a scale and
  an offset per group: W ~ (q - 8) * scale + zero, q in [0, 15]), `_weight_int4pack_mm_for_cpu`.
  Its fp32-activation path is ~12x slower than an fp32 GEMM on AVX2 (measured), so activations go
  to the kernel in bf16 on every CPU: 0.45 ms at M=1 for 576 x 3072 (fp32 GEMM 0.85 ms).
Where a kernel cannot take a shape (K not a multiple of 16 for int8pack, which crashes on K=8, 24,
100; K not a multiple of the group size), the weight is dequantized on the fly.

What is quantized: every `nn.Linear` inside the decoder layers (and MTP layers), the stacked
routed experts, and the token embedding and output head in int8 per row (one table when tied, as
llama.cpp's q8_0 files store `token_embd` once; with int4 layers the head stays int8, as llama.cpp's
quantizer keeps a tied output at q6_K, or q8_0 where rows are not a multiple of 256). The head
matters at real sizes: SmolLM2-135M's 49,152 x 576 head is a fifth of its weights, and in fp32 it
took a third of an int8 decode step (profiled, one thread). Left in floating point: routers (fp32
by design), norms, and MLA's `kv_b_proj`, whose weight the absorbed decode path reads as a tensor.

A decoder layer's q/k/v projections and its MLP's gate/up projections are fused into one
quantized matrix each (`Attention.qkv_proj`, `MLP.gate_up_proj`): at batch 1 each call costs a
kernel launch and two activation casts, so 7 calls per layer become 4.

A quantized model saves as it is (`save_model`: the low-bit tensors under their module names and a
`quantization_config` in config.json) and loads back without quantizing again (`load_model` builds
the structure with `quantize_model` on the meta device, then `load_quantized_state` assigns the
file's tensors); docs/quantized-checkpoints.md is the format. A float checkpoint is quantized as
it loads (`load_model(path, quantization=...)`, which `LLM` uses): matrices one at a time, in row
chunks of `_QUANTIZE_CHUNK_BYTES`, each chunk's memory-mapped pages dropped once read (`release`),
so loading peaks near the quantized size, not the float one.
"""

from __future__ import annotations

import platform
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qiusuo.runtime import cpu_flags

from .moe import Experts

MODES = ("int8", "int8-dynamic", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
DEFAULT_INT4_GROUP_SIZE = 32  # llama.cpp q4_0's block: matched precision
_INT8PACK_K_MULTIPLE = 16  # _weight_int8pack_mm segfaults for other K (torch 2.13, measured)
_INT8PACK_ALIGN = 64  # bytes; it segfaults on weights at 8 mod 16 (Int8Weight.prepare_kernel), 64 to be safe
_SKIP = ("kv_b_proj",)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 (x86) or the bf16 extension (ARM), from the CPU's flags, not assumed."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_has_vnni() -> bool:
    """AVX512-VNNI, from the CPU's flags: fbgemm's int8 GEMM then accumulates u8 x s8 products in
    32 bits (vpdpbusd), so activations may use the full 8-bit range. Without it (AVX2) pairs of products
    are summed in saturating 16 bits (vpmaddubsw), and activations keep to 7 bits (reduce_range)."""
    return "avx512_vnni" in cpu_flags()


def int8_kernel(mode: str = "int8") -> str:
    """The kernel for an int8 mode on this machine: "int8pack", "fbgemm" or "dequant"."""
    if mode == "int8-dynamic" and "fbgemm" in torch.backends.quantized.supported_engines \
            and platform.machine().lower() in ("x86_64", "amd64"):
        return "fbgemm"
    return "int8pack"


# ---------------------------------------------------------------------- int8
Release = Callable[[torch.Tensor], None]
# Float bytes of a weight quantized at a time (whole rows): the transients (a float32 copy of a bf16
# chunk, |w|, w / scale) are of one chunk, not of the matrix, so loading peaks near the quantized size.
_QUANTIZE_CHUNK_BYTES = 256 << 10


def _quantize_row_chunks(N: int, K: int) -> list[slice]:
    return _row_chunks(N, max(1, _QUANTIZE_CHUNK_BYTES // (4 * K)))


def quantize_per_channel(w: torch.Tensor, release: Release | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., N, K) float -> int8 (..., N, K), scales (..., N) fp32 with w ~ q * scale[..., None].

    A 2-D w is quantized `_QUANTIZE_CHUNK_BYTES` of rows at a time (rows are independent, so the result
    is the whole matrix's); `release(rows_of_w)` is called on each chunk once it is read (the
    loader drops a memory-mapped source's pages there: `load_model(path, quantization=...)`)."""
    if w.dim() != 2:
        w = w.detach().float()
        scale = w.abs().amax(dim=-1).clamp(min=1e-12) / 127.0
        return torch.round(w / scale[..., None]).clamp_(-127, 127).to(torch.int8), scale
    N, K = w.shape
    q, scale = torch.empty(N, K, dtype=torch.int8, device=w.device), torch.empty(N, device=w.device)
    for rows in _quantize_row_chunks(N, K):
        chunk = w[rows].detach().float()
        s = chunk.abs().amax(dim=-1).clamp(min=1e-12) / 127.0
        q[rows] = torch.round(chunk / s[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[rows] = s
        del chunk
        if release is not None:
            release(w[rows])
    return q, scale


class Int8Weight(nn.Module):
    """One (N, K) int8 per-channel weight and its matmul: `forward(x) = x @ (q * scale).T`."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, kernel: str | None = None):
        super().__init__()
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.kernel = kernel or int8_kernel()
        K = q.shape[-1]
        if self.kernel == "int8pack" and K % _INT8PACK_K_MULTIPLE:
            self.kernel = "dequant"
        self.prepare_kernel()

    def prepare_kernel(self, release: Release | None = None) -> None:
        """The kernel's derived state (fbgemm's packed weight, bf16 scales) from qweight and scale:
        after building and after a quantized checkpoint's tensors are assigned. Not on meta tensors.
        `release(old_qweight)` is called if qweight is replaced by an aligned copy (below)."""
        self._packed = None
        if self.qweight.is_meta:
            return
        if self.kernel == "fbgemm":
            zero = torch.zeros(self.qweight.shape[0], dtype=torch.int64)
            with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm's prepack still takes only them
                warnings.simplefilter("ignore", UserWarning)
                qt = torch._make_per_channel_quantized_tensor(self.qweight, self.scale.double(), zero, 0)
            self._packed = torch.ops.quantized.linear_prepack(qt, None)
            self._reduce_range = not cpu_has_vnni()
        elif self.kernel == "int8pack":
            if self.qweight.device.type == "cpu" and self.qweight.data_ptr() % _INT8PACK_ALIGN:
                # _weight_int8pack_mm segfaults on a weight that is not 16-byte aligned (torch 2.13, an
                # AVX512 CPU: offset 8 crashes at M >= 3 for every N tried, and at M = 1 for N = 266;
                # offsets 16, 32, 64 do not; measured). A memory-mapped checkpoint's tensors are only
                # 8-byte aligned, so such a matrix gets its own aligned copy (the loader then drops
                # the mapped pages: peak RSS stays the weights once).
                old, self.qweight = self.qweight, self.qweight.clone()
                if release is not None:
                    release(old)
            self.register_buffer("scale_bf16", self.scale.to(torch.bfloat16), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, K = self.qweight.shape
        flat = x.reshape(-1, K)
        if self.kernel == "fbgemm" and x.device.type == "cpu":
            y = torch.ops.quantized.linear_dynamic(flat.float().contiguous(), self._packed,
                                                   self._reduce_range).to(x.dtype)
        elif self.kernel == "int8pack" and x.device.type == "cpu":
            y = torch._weight_int8pack_mm(flat.to(torch.bfloat16), self.qweight, self.scale_bf16).to(x.dtype)
        else:
            y = F.linear(flat, self.qweight.to(x.dtype) * self.scale.to(x.dtype)[:, None])
        return y.view(*x.shape[:-1], N)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]


# ---------------------------------------------------------------------- int4
def quantize_int4_groupwise(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) -> q (N, K) int32 in [0, 15], scale (N, K/g), zero (N, K/g) fp32 with
    w ~ (q - 8) * scale + zero per group of g columns (the layout `_weight_int4pack_mm_for_cpu` reads)."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide K={K}; use one of {INT4_GROUP_SIZES} that does")
    g = w.detach().float().view(N, K // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32)
    zero = lo + 8 * scale  # (q - 8) * scale + zero == q * scale + lo
    return q.view(N, K), scale, zero


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) integers in [0, 15] -> (N, K/2) uint8, column 2j in the low nibble, 2j+1 in the high."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def quantize_int4_packed(w: torch.Tensor, group_size: int,
                         release: Release | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize_int4_groupwise` with q already nibble-packed (N, K/2) uint8, `_QUANTIZE_CHUNK_BYTES`
    of rows at a time (the int32 q and the float transients exist for one chunk); `release` as in
    `quantize_per_channel`."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide K={K}; use one of {INT4_GROUP_SIZES} that does")
    packed = torch.empty(N, K // 2, dtype=torch.uint8, device=w.device)
    scale, zero = (torch.empty(N, K // group_size, device=w.device) for _ in range(2))
    for rows in _quantize_row_chunks(N, K):
        q, scale[rows], zero[rows] = quantize_int4_groupwise(w[rows], group_size)
        packed[rows] = pack_nibbles(q)
        if release is not None:
            release(w[rows])
    return packed, scale, zero


class Int4Weight(nn.Module):
    """One (N, K) weight in group-wise int4; `forward(x) = x @ W.T` on the packed int4 CPU kernel.

    q is (N, K) in [0, 15], or (N, K/2) uint8 already nibble-packed with `packed=True`."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                 packed: bool = False):
        super().__init__()
        self.group_size = group_size
        N, K = q.shape[0], q.shape[1] * (2 if packed else 1)
        self.shape = (N, K)
        # Two 4-bit values per byte, row-major (even column in the low nibble): half an int8 tensor's bytes.
        self.register_buffer("qweight", q.contiguous() if packed else pack_nibbles(q))
        self.register_buffer("scales", scale.float().contiguous())  # (N, K/g)
        self.register_buffer("zeros", zero.float().contiguous())  # (N, K/g)
        self.prepare_kernel()

    def prepare_kernel(self) -> None:
        """The kernel's packed weight and bf16 scales/zeros from the stored tensors (not on meta tensors)."""
        N, K = self.shape
        self.kernel = "int4pack" if K % self.group_size == 0 and N % 16 == 0 and K % 2 == 0 else "dequant"
        if self.qweight.is_meta:
            return
        if self.kernel == "int4pack":
            # In row chunks: the kernel packs each block of rows on its own (blocks of 64 or fewer), so
            # chunks of 256 rows pack the same bytes while the int32 input the op wants (8x the packed
            # bytes) exists for one chunk at a time, not the whole matrix (peak RSS while loading).
            # The kept tensors are allocated before the transient ones, so that the next matrix's
            # transients reuse the freed space rather than leave holes under kept tensors.
            self._scales_zeros = torch.empty(K // self.group_size, N, 2, dtype=torch.bfloat16)
            self._scales_zeros[..., 0] = self.scales.t()
            self._scales_zeros[..., 1] = self.zeros.t()
            self._packed = torch.empty(N, K // 2, dtype=torch.uint8)
            for rows in _row_chunks(N, _INT4PACK_ROW_CHUNK):
                self._packed[rows] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.unpacked(rows), 1)

    def unpacked(self, rows: slice = slice(None)) -> torch.Tensor:
        """(N, K) int32 in [0, 15] (or those `rows`)."""
        b = self.qweight[rows]  # nibbles split in uint8, widened once: a quarter of the transient bytes
        return torch.stack((b & 15, b >> 4), dim=-1).view(b.shape[0], self.shape[1]).to(torch.int32)

    def dequantize(self) -> torch.Tensor:
        N, K = self.shape
        q = self.unpacked().float().view(N, K // self.group_size, self.group_size)
        return ((q - 8) * self.scales[..., None] + self.zeros[..., None]).view(N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, K = self.shape
        flat = x.reshape(-1, K)
        if self.kernel == "int4pack" and x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(torch.bfloat16), self._packed, self.group_size,
                                                          self._scales_zeros).to(x.dtype)
        else:
            y = F.linear(flat, self.dequantize().to(x.dtype))
        return y.view(*x.shape[:-1], N)


_INT4PACK_ROW_CHUNK = 256  # a multiple of the int4 CPU kernel's row block (64); 2 MB of int32 at K=2048


def _row_chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def make_weight(w: torch.Tensor | list[torch.Tensor], mode: str, group_size: int = DEFAULT_INT4_GROUP_SIZE,
                release: Release | None = None) -> nn.Module:
    """The quantized weight of w (N, K), or of several (N_i, K) stacked along N: each part is
    quantized on its own and the results stacked (rows are quantized independently, so this is
    the stacked matrix quantized, without a float copy of it)."""
    parts = w if isinstance(w, list) else [w]
    if mode in ("int8", "int8-dynamic"):
        q, scale = _cat([quantize_per_channel(p, release) for p in parts])
        return Int8Weight(q, scale, kernel=int8_kernel(mode))
    if mode == "int4":
        return Int4Weight(*_cat([quantize_int4_packed(p, group_size, release) for p in parts]), group_size,
                          packed=True)
    raise ValueError(f"quantization {mode!r}: use one of {MODES}")


def _cat(parts: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    return parts[0] if len(parts) == 1 else tuple(torch.cat(ts) for ts in zip(*parts))


# ---------------------------------------------------------------------- modules
class QuantizedLinear(nn.Module):
    """An `nn.Linear` (or several sharing an input, fused along N) with int8 or int4 weights; biases stay in floating point."""

    def __init__(self, linear: nn.Linear | list[nn.Linear], mode: str = "int8",
                 group_size: int = DEFAULT_INT4_GROUP_SIZE, release: Release | None = None):
        super().__init__()
        parts = linear if isinstance(linear, list) else [linear]
        self.in_features, self.mode = parts[0].in_features, mode
        self.out_features = sum(p.out_features for p in parts)
        self.weight_q = make_weight([p.weight for p in parts], mode, group_size, release)
        biases = [p.bias for p in parts]
        if all(b is None for b in biases):
            self.bias = None
        else:
            full = [b.detach() if b is not None else torch.zeros(p.out_features, dtype=p.weight.dtype)
                    for p, b in zip(parts, biases)]
            self.bias = nn.Parameter(torch.cat(full).clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.weight_q(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.mode}"


class QuantizedEmbedding(nn.Module):
    """The token embedding as an int8 table with one scale per row; `table` doubles as the output head when tied."""

    def __init__(self, embedding: nn.Embedding, kernel: str = "int8pack", release: Release | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.dtype = dtype or embedding.weight.dtype  # of the looked-up rows
        self.table = Int8Weight(*quantize_per_channel(embedding.weight, release), kernel=kernel)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        q, scale = self.table.qweight[input_ids], self.table.scale[input_ids]  # (..., D), (...)
        return (q.to(torch.float32) * scale[..., None]).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


class QuantizedExperts(Experts):
    """Stacked routed experts with int8/int4 weights; routing and grouping are `Experts`'.

    `parts`, when given, holds the float weights instead of `experts`' stacked ones: each expert's
    [gate (I, D), up (I, D)] and down (D, I), e.g. a checkpoint's tensors as they lie in the file
    (a loader never stacks them in float then)."""

    def __init__(self, experts: Experts, mode: str = "int8", group_size: int = DEFAULT_INT4_GROUP_SIZE,
                 release: Release | None = None,
                 parts: tuple[list[list[torch.Tensor]], list[torch.Tensor]] | None = None):
        nn.Module.__init__(self)
        self.num_experts = experts.num_experts
        gate_up, down = parts if parts is not None else (list(experts.gate_up_proj), list(experts.down_proj))
        self.gate_up = nn.ModuleList(make_weight(w, mode, group_size, release) for w in gate_up)  # (2I, D) each
        self.down = nn.ModuleList(make_weight(w, mode, group_size, release) for w in down)  # (D, I) each

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up[e](x).chunk(2, -1)
        return self.down[e](F.silu(gate) * up)


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str = "int8", group_size: int = DEFAULT_INT4_GROUP_SIZE,
                   release: Release | None = None) -> nn.Module:
    """Replace the decoder's linear layers and stacked experts with quantized ones, in place.

    The model is for inference afterwards (eval mode; no gradients flow into low-bit weights).
    Returns `model` for chaining. Matrices are quantized one at a time, in row chunks, and
    `release(float_rows)` is called on each chunk once it has been read: `load_model(path,
    quantization=...)` drops the file pages there, so loading never holds the float weights whole.
    """
    if mode not in MODES:
        raise ValueError(f"quantization {mode!r}: use one of {MODES} (int8: per-channel, int4: group-wise)")
    if mode == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size={group_size}: use one of {INT4_GROUP_SIZES}")
    have = getattr(model, "quantization_config", None)
    if have is not None:  # e.g. a quantized checkpoint loaded with quantization= as well
        if have == quantization_config(mode, group_size):
            return model.eval()
        raise ValueError(f"the model is already quantized ({have['mode']}, group size {have['group_size']}); "
                         f"re-quantizing it as {mode} would compound the rounding: load the float checkpoint, "
                         "or drop quantization= to use it as it is")
    for layer in list(model.model.layers) + list(getattr(model, "mtp", [])):
        quantize_layer(layer, mode, group_size, release)
    _quantize_embedding_and_head(model, mode, release)
    model.quantization_config = quantization_config(mode, group_size)
    return model.eval()


@torch.no_grad()
def quantize_layer(layer: nn.Module, mode: str, group_size: int, release: Release | None = None) -> None:
    """One decoder (or MTP) layer's linear layers and experts, in place (`quantize_model`'s step)."""
    for parent in list(layer.modules()):
        _fuse(parent, mode, group_size, release)
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child_name not in _SKIP:
                gs = group_size if child.in_features % group_size == 0 else INT4_GROUP_SIZES[0]
                if mode == "int4" and child.in_features % gs:
                    continue  # no group size divides K: this matrix stays in floating point
                setattr(parent, child_name, QuantizedLinear(child, mode, gs, release))
            elif isinstance(child, Experts) and not isinstance(child, QuantizedExperts):
                setattr(parent, child_name, QuantizedExperts(child, mode, group_size, release))


def _fuse(parent: nn.Module, mode: str, group_size: int, release: Release | None = None) -> None:
    """q/k/v of a GQA `Attention` and gate/up of an `MLP` -> one QuantizedLinear each (the parts are dropped)."""
    from .attention import Attention
    from .layers import MLP

    groups = {Attention: ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
              MLP: ("gate_up_proj", ("gate_proj", "up_proj"))}
    for cls, (fused_name, names) in groups.items():
        if type(parent) is not cls or getattr(parent, fused_name) is not None:
            continue
        parts = [getattr(parent, n) for n in names]
        if not all(type(p) is nn.Linear for p in parts):
            continue
        K = parts[0].in_features
        gs = group_size if K % group_size == 0 else INT4_GROUP_SIZES[0]
        if mode == "int4" and K % gs:
            continue  # stays in floating point, unfused, as quantize_model leaves such a matrix
        setattr(parent, fused_name, QuantizedLinear(parts, mode, gs, release))
        for n in names:
            setattr(parent, n, None)


def _quantize_embedding_and_head(model: nn.Module, mode: str, release: Release | None = None) -> None:
    """int8 embedding table and output head (the same table when tied), on the mode's int8 kernel."""
    emb = model.model.embed_tokens
    if not isinstance(emb, nn.Embedding) or emb.weight.shape[-1] % _INT8PACK_K_MULTIPLE:
        return  # a hidden size int8pack cannot take: the head would dequantize per call, slower than fp32
    kernel = int8_kernel(mode) if mode != "int4" else "int8pack"
    dtype = model.model.norm.weight.dtype  # the model's float dtype (a loader's table may still be the file's)
    model.model.embed_tokens = QuantizedEmbedding(emb, kernel, release, dtype)
    if model.lm_head is None:  # tied
        model.output_head = model.model.embed_tokens.table
    else:
        model.output_head = Int8Weight(*quantize_per_channel(model.lm_head.weight, release), kernel=kernel)
        model.lm_head = None  # the fp32 copy is not read any more (`Transformer.logits` uses output_head)


# ---------------------------------------------------------------------- quantized checkpoints
QUANT_METHOD = "qiusuo"
FORMAT_VERSION = 1


def quantization_config(mode: str, group_size: int = DEFAULT_INT4_GROUP_SIZE) -> dict:
    """config.json's `quantization_config` of a quantized checkpoint (docs/quantized-checkpoints.md)."""
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "mode": mode,
            "group_size": group_size if mode == "int4" else None}


def check_quantization_config(qc: object) -> tuple[str, int]:
    """(mode, group_size) of a checkpoint's `quantization_config`; ValueError naming what is wrong."""
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise ValueError(f"quantization_config quant_method={method!r}: qiusuo reads only its own quantized "
                         f"checkpoints ({QUANT_METHOD!r}); load the float checkpoint and pass quantization=")
    if qc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"quantization_config format_version={qc.get('format_version')!r}: this qiusuo reads "
                         f"version {FORMAT_VERSION}; re-save the checkpoint with this version")
    mode, group_size = qc.get("mode"), qc.get("group_size")
    if mode not in MODES:
        raise ValueError(f"quantization_config mode={mode!r}: must be one of {MODES}")
    if mode == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"quantization_config group_size={group_size!r}: int4 needs one of {INT4_GROUP_SIZES}")
    return mode, group_size if mode == "int4" else DEFAULT_INT4_GROUP_SIZE


def _aliases(model: nn.Module) -> dict[str, str]:
    """State-dict names of tensors that belong to a module registered twice (the tied output head is
    the embedding's int8 table) -> the name they are stored under."""
    first: dict[int, str] = {}
    out = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        if id(module) not in first:
            first[id(module)] = prefix
            continue
        for name in [*module._parameters, *(n for n in module._buffers if n not in module._non_persistent_buffers_set)]:
            out[f"{prefix}.{name}"] = f"{first[id(module)]}.{name}"
    return out


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a quantized checkpoint stores: the model's state dict under its module names
    (fused qkv_proj / gate_up_proj, `weight_q.qweight` ...), a tied head's table once."""
    aliases = _aliases(model)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in aliases}


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Weight, Int4Weight)) for m in model.modules())


@torch.no_grad()
def load_quantized_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint",
                         release: Release | None = None) -> None:
    """Assign a quantized checkpoint's tensors to `model`, a float `Transformer` built on the meta device
    and quantized there (`quantize_model` on meta tensors builds the structure and nothing else).

    The tensors are assigned, not copied (views of the file's memory map), and checked first: a
    missing or unexpected name, or a shape or dtype that is not the one the config implies, is a
    ValueError naming the tensor (a hostile or corrupt file never reaches a kernel)."""
    aliases = _aliases(model)
    expected = {k: v for k, v in model.state_dict().items() if k not in aliases}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = ([f"missing tensors: {', '.join(missing[:10])}"] if missing else []) + \
                ([f"unexpected tensors: {', '.join(unexpected[:10])}"] if unexpected else [])
        raise ValueError(f"{source} does not match its config.json and quantization_config; " + "; ".join(parts))
    for name, t in state.items():
        want = expected[name]
        if t.shape != want.shape or t.dtype != want.dtype:
            raise ValueError(f"{source}: tensor {name} is {t.dtype} {tuple(t.shape)}, but config.json and "
                             f"quantization_config imply {want.dtype} {tuple(want.shape)}; the file is corrupt "
                             "or was written for another model")
    full = dict(state)
    full.update({alias: state[name] for alias, name in aliases.items() if name in state})
    model.load_state_dict(full, strict=True, assign=True)
    for m in model.modules():
        if isinstance(m, Int8Weight):
            m.prepare_kernel(release)
        elif isinstance(m, Int4Weight):
            m.prepare_kernel()


__all__ = ["quantize_model", "QuantizedLinear", "QuantizedExperts", "QuantizedEmbedding", "Int8Weight", "Int4Weight",
           "quantize_per_channel", "quantize_int4_groupwise", "quantize_int4_packed", "quantize_layer",
           "cpu_has_native_bf16", "cpu_has_vnni", "int8_kernel", "MODES",
           "quantization_config", "check_quantization_config", "quantized_state_dict", "load_quantized_state",
           "is_quantized"]
