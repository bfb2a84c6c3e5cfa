"""Attention: grouped-query attention (Llama/Qwen2) and Multi-head Latent Attention (DeepSeek).

Both read and write past states through a cache object (`qiusuo.model.cache`): the model owns
the math, the cache owns the memory layout (contiguous here, paged in the engine). GQA caches
per-head keys and values; MLA caches only the compressed latent c_kv and the shared RoPE key
k_pe (DeepSeek-V2 report, arXiv 2405.04434 §2.1), so its cache is (kv_lora_rank +
qk_rope_head_dim) per token per layer instead of 2 * H * head_dim.

Dimension letters (the package's legend, qiusuo/model/__init__.py): B batch, T new positions,
S visible positions (past + new), H query heads, Hk key/value heads, hd head_dim, g = H / Hk,
C kv_lora_rank, R qk_rope_head_dim, Dn qk_nope_head_dim, Dv v_head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import RMSNorm, apply_rope


def _sdpa(q, k, v, mask, scale, enable_gqa=False):
    """q (B, H, T, d), k/v (B, Hk, S, d); mask None means causal when T == S, none when T == 1."""
    T, S = q.shape[2], k.shape[2]
    causal = mask is None and T > 1
    assert not causal or T == S, f"causal attention needs an explicit mask when T={T} != S={S}"
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=enable_gqa
    )


class Attention(nn.Module):
    """Grouped-query attention with RoPE (half-split layout), optional q/k/v(/o) bias."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        qkv_bias = config.attention_bias
        o_bias = config.attention_bias and config.model_type == "llama"
        D, hd = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(D, self.num_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(D, self.num_kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(D, self.num_kv_heads * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * hd, D, bias=o_bias)
        # q, k and v as one matmul, set by `quantize.quantize_model` (one kernel call and one
        # activation cast instead of three; the separate projections are then dropped).
        self.qkv_proj: nn.Module | None = None
        self.scale = hd**-0.5

    def cache_dims(self) -> tuple[tuple[int, ...], ...]:
        """Per-token shapes of what this layer caches: keys and values."""
        return (self.num_kv_heads, self.head_dim), (self.num_kv_heads, self.head_dim)

    def forward(self, x, cos, sin, mask=None, cache=None):
        B, T, _ = x.shape
        H, Hk, hd = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is not None:  # fused: q and k are adjacent, so one RoPE call rotates both
            qk, v = self.qkv_proj(x).split(((H + Hk) * hd, Hk * hd), dim=-1)
            q, k = apply_rope(qk.view(B, T, H + Hk, hd), cos, sin, interleaved=False).split((H, Hk), dim=2)
            v = v.view(B, T, Hk, hd)
        else:
            q = apply_rope(self.q_proj(x).view(B, T, H, hd), cos, sin, interleaved=False)  # (B, T, H, hd)
            k = apply_rope(self.k_proj(x).view(B, T, Hk, hd), cos, sin, interleaved=False)  # (B, T, Hk, hd)
            v = self.v_proj(x).view(B, T, Hk, hd)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, S, Hk, hd)
        if T == 1 and self.num_kv_heads != self.num_heads:
            # Decode: each KV head's group of g query heads becomes its query axis, so SDPA walks
            # each KV head once, not once per query head as enable_gqa does (~8% less engine CPU
            # time on tiny-dense, bench/engine.py). Query head h uses KV head h // g, so
            # (H,) -> (Hk, g) keeps the pairing; same math, rounding differs by ~1e-7.
            Hk = self.num_kv_heads
            qg = q.view(B, Hk, self.num_heads // Hk, self.head_dim)  # (B, Hk, g, hd)
            y = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                               scale=self.scale)  # (B, Hk, g, hd); mask (B, 1, 1, S) or None
            return self.o_proj(y.reshape(B, 1, -1))
        y = _sdpa(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLAttention(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2/V3) with decoupled, pair-interleaved RoPE.

    Prefill expands the latent into per-head keys and values; decode, where the cached prefix is
    long and the new tokens few, uses weight absorption (DeepSeek-V2 report, appendix C) and never
    materialises per-head keys. The two paths are the same function (tests check it).
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = H = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.interleaved = config.rope_interleave
        qk_head_dim = self.nope_dim + self.rope_dim
        D, bias = config.hidden_size, config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)  # eps 1e-6 whatever rms_norm_eps says (as HF)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, D, bias=bias)
        self.scale = qk_head_dim**-0.5

    def cache_dims(self) -> tuple[tuple[int, ...], ...]:
        """Per-token shapes of what this layer caches: the latent and the shared RoPE key."""
        return (self.kv_lora_rank,), (self.rope_dim,)

    def forward(self, x, cos, sin, mask=None, cache=None):
        B, T, _ = x.shape
        if self.can_fold and cache is not None and torch.compiler.is_compiling():
            return self.forward_folded(x, cos, sin, mask, cache)
        H, Dn, R, Dv = self.num_heads, self.nope_dim, self.rope_dim, self.v_head_dim
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, H, Dn + R)
        q_nope, q_pe = q.split([Dn, R], dim=-1)  # (B, T, H, Dn), (B, T, H, R)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, R], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # (B, T, C)
        q_pe = apply_rope(q_pe, cos, sin, self.interleaved)
        k_pe = apply_rope(k_pe[:, :, None, :], cos, sin, self.interleaved)[:, :, 0]  # (B, T, R)
        if cache is not None:
            c_kv, k_pe = cache.update(self.layer_idx, c_kv, k_pe)  # (B, S, C), (B, S, R)
        S = c_kv.shape[1]
        if S > 2 * T:
            y = self._absorbed(q_nope, q_pe, c_kv, k_pe, mask)
        else:
            y = self._expanded(q_nope, q_pe, c_kv, k_pe, mask)
        return self.o_proj(y.reshape(B, T, H * Dv))

    def _expanded(self, q_nope, q_pe, c_kv, k_pe, mask):
        B, S, _ = c_kv.shape
        H, Dn, R = self.num_heads, self.nope_dim, self.rope_dim
        kv = self.kv_b_proj(c_kv).view(B, S, H, Dn + self.v_head_dim)
        k_nope, v = kv.split([Dn, self.v_head_dim], dim=-1)  # (B, S, H, Dn), (B, S, H, Dv)
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(B, S, H, R)), dim=-1)  # (B, S, H, Dn+R)
        q = torch.cat((q_nope, q_pe), dim=-1)  # (B, T, H, Dn+R)
        y = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.scale)
        return y.transpose(1, 2)  # (B, T, H, Dv)

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
        H, Dn = self.num_heads, self.nope_dim
        w = self.kv_b_proj.weight.view(H, Dn + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, :Dn], w[:, Dn:]  # (H, Dn, C), (H, Dv, C)
        q_lat = torch.einsum("bthn,hnc->bthc", q_nope, w_uk)  # (B, T, H, C)
        o_lat = self._latent_attention(q_lat, q_pe, c_kv, k_pe, mask)  # (B, T, H, C)
        return torch.einsum("bthc,hvc->bthv", o_lat, w_uv)  # (B, T, H, Dv)

    def _latent_attention(self, q_lat, q_pe, c_kv, k_pe, mask):
        """Attention in the latent space: q_lat (B, T, H, C), q_pe (B, T, H, R), c_kv (B, S, C),
        k_pe (B, S, R) -> o_lat (B, T, H, C)."""
        if torch.compiler.is_compiling():
            # Broadcast-multiply-sum instead of batched matmuls: inductor fuses the paged gather
            # and the softmax into the reductions (one kernel instead of ~5 per layer).
            scores = (q_lat.transpose(1, 2)[:, :, :, None] * c_kv[:, None, None]).sum(-1)
            scores = scores + (q_pe.transpose(1, 2)[:, :, :, None] * k_pe[:, None, None]).sum(-1)  # (B, H, T, S)
        else:
            scores = torch.einsum("bthc,bsc->bhts", q_lat, c_kv)
            scores = scores + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)  # (B, H, T, S)
        scores = scores * self.scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        elif scores.shape[2] > 1:
            T, S = scores.shape[2], scores.shape[3]
            causal = torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(S - T)
            scores = scores.masked_fill(~causal, float("-inf"))
        p = torch.softmax(scores.float(), dim=-1).to(q_lat.dtype)
        if torch.compiler.is_compiling():
            return (p[..., None] * c_kv[:, None, None]).sum(-2).transpose(1, 2)
        return torch.einsum("bhts,bsc->bthc", p, c_kv)  # (B, T, H, C)

    # ------------------------------------------------------------------ folded decode (compiled)
    @property
    def can_fold(self) -> bool:
        return self.q_lora_rank is None and self.kv_a_proj_with_mqa.bias is None

    def folded_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The absorbed path's weights multiplied out (DeepSeek-V2 report, appendix C): w_in (H*C + H*R
        + C + R, D) maps x straight to [q_lat, q_pe, c_kv, k_pe] (q_proj's nope rows times W_UK,
        then the rope rows and kv_a), w_out (D, H*C) maps o_lat to the output (o_proj times W_UV).
        One matmul in and one out instead of five per layer; under torch.compile's freezing they
        are computed once, at compile time."""
        H, Dn, R, Dv, C = self.num_heads, self.nope_dim, self.rope_dim, self.v_head_dim, self.kv_lora_rank
        w = self.kv_b_proj.weight.view(H, Dn + Dv, C)
        w_uk, w_uv = w[:, :Dn], w[:, Dn:]  # (H, Dn, C), (H, Dv, C)
        wq = self.q_proj.weight.view(H, Dn + R, -1)  # (H, Dn+R, D)
        wq_lat = torch.einsum("hnd,hnc->hcd", wq[:, :Dn], w_uk).reshape(H * C, -1)
        w_in = torch.cat((wq_lat, wq[:, Dn:].reshape(H * R, -1), self.kv_a_proj_with_mqa.weight))
        w_out = torch.einsum("dhv,hvc->dhc", self.o_proj.weight.view(-1, H, Dv), w_uv).reshape(-1, H * C)
        return w_in, w_out

    def forward_folded(self, x, cos, sin, mask, cache):
        """`forward` with `folded_weights` (the same function; rounding differs by ~1e-6)."""
        B, T, _ = x.shape
        H, R, C = self.num_heads, self.rope_dim, self.kv_lora_rank
        w_in, w_out = self.folded_weights()
        q_lat, q_pe, c_kv, k_pe = F.linear(x, w_in).split([H * C, H * R, C, R], dim=-1)
        q_pe = apply_rope(q_pe.view(B, T, H, R), cos, sin, self.interleaved)
        k_pe = apply_rope(k_pe[:, :, None, :], cos, sin, self.interleaved)[:, :, 0]  # (B, T, R)
        c_kv, k_pe = cache.update(self.layer_idx, self.kv_a_layernorm(c_kv), k_pe)  # (B, S, C), (B, S, R)
        o_lat = self._latent_attention(q_lat.view(B, T, H, C), q_pe, c_kv, k_pe, mask)  # (B, T, H, C)
        return F.linear(o_lat.reshape(B, T, H * C), w_out, self.o_proj.bias)
