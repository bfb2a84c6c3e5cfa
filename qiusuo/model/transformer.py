"""The one `Transformer`: a Qwen2/Llama dense decoder or a DeepSeek-V3 decoder (MLA + DeepSeekMoE + MTP).

Module names follow transformers' state-dict names (`model.layers.3.self_attn.q_proj`, ...) so a
checkpoint maps onto the model almost one to one; `checkpoint.py` handles the rest (stacked
experts, MTP layers stored after the last main layer).

Dimension letters: B batch, T positions, D hidden, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, MLAttention
from .config import ModelConfig
from .layers import MLP, RMSNorm, RotaryEmbedding
from .logprobs import token_logprobs
from .moe import MoE


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, moe: bool):
        super().__init__()
        attn_cls = MLAttention if config.is_deepseek else Attention
        self.self_attn = attn_cls(config, layer_idx)
        self.mlp = MoE(config) if moe else MLP(config.hidden_size, config.intermediate_size, config.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """One multi-token-prediction depth (V3-TR §2.2): h' = eh_proj([enorm(emb(t_{i+k})); hnorm(h_i)]).

    The concat order follows the released checkpoints and transformers (embedding first).
    The embedding and output head are the main model's (checkpoints store copies).
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx, moe=bool(config.n_routed_experts))
        D = config.hidden_size
        self.enorm = RMSNorm(D, config.rms_norm_eps)
        self.hnorm = RMSNorm(D, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.shared_head = SharedHead(config)

    def forward(self, h, emb, cos, sin, mask=None, cache=None):
        """h: the previous depth's hidden states (B, T, D) (depth 1: the main model's final ones),
        emb: embeddings of the tokens one ahead (B, T, D) -> normalised hidden states (B, T, D).
        With a cache (speculative decoding, qiusuo/engine/spec_decode.py) it attends to the
        cached positions as a main layer does."""
        x = self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h)), dim=-1))  # (B, T, 2D) -> (B, T, D)
        return self.shared_head.norm(super().forward(x, cos, sin, mask, cache))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, config.is_moe_layer(i)) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class LossOutput:
    loss: torch.Tensor  # what to backpropagate: lm + mtp_loss_weight * mtp + aux
    lm_loss: torch.Tensor
    mtp_loss: torch.Tensor | None
    aux_loss: torch.Tensor | None
    num_tokens: float  # target tokens, or the sum of their weights under a float loss mask


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        rope_dim = config.qk_rope_head_dim if config.is_deepseek else config.head_dim
        self.rotary = RotaryEmbedding(rope_dim, config.rope_theta, config.max_position_embeddings)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        n_mtp = config.num_nextn_predict_layers if config.is_deepseek else 0
        self.mtp = nn.ModuleList(MTPLayer(config, config.num_hidden_layers + k) for k in range(n_mtp))
        # A low-bit output head, set by `quantize.quantize_model` (tied: the quantized embedding's table).
        self.output_head: nn.Module | None = None
        self.gradient_checkpointing = False  # set by the trainer (--gradient-checkpointing)
        self.reset_parameters()

    # ------------------------------------------------------------------ setup
    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for matrices, ones for norms, zeros for biases."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.ndim == 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std))
        for m in self.modules():
            if isinstance(m, MoE):
                m.gate.e_score_correction_bias.zero_()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute non-persistent buffers (after building on the meta device and `to_empty`)."""
        cfg = self.config
        rope_dim = cfg.qk_rope_head_dim if cfg.is_deepseek else cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float) / rope_dim))
        self.rotary.inv_freq = inv_freq.to(self.rotary.inv_freq.device)
        for m in self.moe_layers():
            m.expert_load.zero_()

    def to_dtype(self, dtype: torch.dtype) -> "Transformer":
        """Cast to `dtype`, keeping routers (weight and bias) and the RoPE table in fp32 as HF does."""
        keep = [(m.gate, m.gate.weight.detach().float().clone(), m.gate.e_score_correction_bias.float().clone())
                for m in self.moe_layers()]
        inv_freq = self.rotary.inv_freq.float().clone()
        self.to(dtype)
        self.rotary.inv_freq = inv_freq
        for gate, weight, bias in keep:
            gate.weight.data = weight
            gate.e_score_correction_bias = bias
        return self

    def num_parameters(self, active: bool = False) -> int:
        """All parameters, or those a single token uses (shared + K of E routed experts)."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        for m in self.modules():
            if isinstance(m, MoE):
                per_expert = m.experts.gate_up_proj[0].numel() + m.experts.down_proj[0].numel()
                total -= per_expert * (m.num_experts - m.top_k)
        return total

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        # The final norm, not the embedding: a quantized model's embedding table is int8.
        return self.model.norm.weight.dtype

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    # ------------------------------------------------------------------ forward
    def hidden_states(self, input_ids, positions=None, cache=None, reference_moe=False):
        """input_ids (B, T) -> final normalised hidden states (B, T, D)."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = self.rotary(positions, x.dtype)
        mask = cache.attn_mask(positions) if cache is not None else None
        for layer in self.model.layers:
            if reference_moe and isinstance(layer.mlp, MoE):
                x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, mask, cache)
                x = x + layer.mlp(layer.post_attention_layernorm(x), reference=True)
            elif self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Activations inside the layer are recomputed in the backward pass (transformers' name).
                # The recompute counts an MoE layer's expert loads again: every gradient forward twice, so
                # the sign-based bias update (relative loads) is unchanged.
                x = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        return self.model.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.output_head is not None:
            return self.output_head(h)  # (..., V)
        return F.linear(h, self.output_weight)  # (..., V)

    def forward(self, input_ids, positions=None, cache=None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V)."""
        return self.logits(self.hidden_states(input_ids, positions, cache))

    def compute_loss(self, input_ids: torch.Tensor, loss_mask: torch.Tensor | None = None) -> LossOutput:
        """Next-token loss (+ MTP + balance losses) on right-padded rows.

        loss_mask (B, T) marks the tokens that count as *targets* (e.g. completion tokens only); a float
        mask weights them (the losses are then weighted means, `num_tokens` the sum of the weights).
        """
        B, T = input_ids.shape
        if loss_mask is None:
            loss_mask = torch.ones_like(input_ids, dtype=torch.bool)
        loss_mask = loss_mask.float() if loss_mask.is_floating_point() else loss_mask.bool()
        h = self.hidden_states(input_ids)  # (B, T, D)
        lm_loss = _masked_ce(self, h[:, :-1], input_ids[:, 1:], loss_mask[:, 1:])
        loss = lm_loss
        mtp_loss = None
        if len(self.mtp) and self.training:
            losses = []
            prev = h
            for k, layer in enumerate(self.mtp, start=1):
                if T <= k + 1:
                    break
                n = T - k  # positions i = 0..T-k-1 see token t_{i+k} and predict t_{i+k+1}
                positions = torch.arange(n, device=input_ids.device).expand(B, n)
                cos, sin = self.rotary(positions, h.dtype)
                emb = self.model.embed_tokens(input_ids[:, k:])  # (B, n, D)
                prev = layer(prev[:, :n], emb, cos, sin)
                losses.append(_masked_ce(self, prev[:, :-1], input_ids[:, k + 1 :], loss_mask[:, k + 1 :]))
            if losses:
                mtp_loss = torch.stack(losses).mean()
                loss = loss + self.config.mtp_loss_weight * mtp_loss
        aux = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        aux_loss = torch.stack(aux).sum() if aux and self.training else None
        for m in self.moe_layers():
            m.aux_loss = None
        if aux_loss is not None:
            loss = loss + aux_loss
        target = loss_mask[:, 1:].sum()
        return LossOutput(loss, lm_loss, mtp_loss, aux_loss, float(target) if loss_mask.is_floating_point() else int(target))

    # ------------------------------------------------------------------ MoE balancing
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def update_router_bias(
        self, gamma: float | None = None, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> dict[str, float]:
        """Auxiliary-loss-free balancing step; call after each optimizer step.

        `reduce` sums the per-layer expert loads across data-parallel ranks (e.g. an all-reduce),
        so every rank applies the same update. Returns the mean and worst max/mean expert load.
        """
        layers = self.moe_layers()
        if not layers:
            return {}
        gamma = self.config.bias_update_speed if gamma is None else gamma
        loads = torch.stack([m.expert_load for m in layers])  # (L, E)
        if reduce is not None:
            loads = reduce(loads)
        ratios = [m.update_bias(gamma, load)["max_over_mean"] for m, load in zip(layers, loads)]
        # Only layers that saw tokens: an MTP head's MoE gets none from a forward without the MTP loss
        # (GRPO's log-probs), and its 0 / 0 would pull the mean down.
        ratios = [r for r, load in zip(ratios, loads) if load.sum() > 0]
        if not ratios:
            return {}
        return {"moe_load_max_over_mean": sum(ratios) / len(ratios), "moe_load_worst": max(ratios)}


def _masked_ce(model, h, targets, mask):
    """Mean cross-entropy over positions where mask is True (weighted mean under a float mask);
    h (B, T, D), targets/mask (B, T). The logits exist a chunk of positions at a time
    (`logprobs.token_logprobs`): F.cross_entropy's values exactly."""
    ce = -token_logprobs(model, h, targets)[0].reshape(-1)  # (B*T,)
    mask = mask.reshape(-1).to(ce.dtype)
    return (ce * mask).sum() / mask.sum().clamp(min=1)
