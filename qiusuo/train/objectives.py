"""The GRPO objective as pure tensor functions: advantages, the clipped policy loss, KL k3.

Kept free of models and engines so the tests can check them against hand-computed tensors.
Formulas follow reference/deepseek.md §4 (DeepSeekMath GRPO, DAPO, Dr.GRPO, TRL's `_compute_loss`).

Dimension letters: P prompts, G samples per prompt, N = P*G sequences, T completion positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# TRL's epsilon: (r - mean) / (std + 1e-4). Only matters when std ~ 0, and those groups carry
# no signal anyway (their numerator is exactly 0).
STD_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = STD_EPS) -> torch.Tensor:
    """rewards (P, G) -> advantages (P, G): r - mean over the group, divided by the group's std
    (Bessel-corrected, as TRL) when scale == "group"; scale == "none" is Dr.GRPO's r - mean."""
    assert rewards.ndim == 2, f"rewards must be (P, G), got {tuple(rewards.shape)}"
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred
    if scale != "group":
        raise ValueError(f"scale={scale!r}: use 'group' or 'none'")
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def zero_variance_groups(rewards: torch.Tensor) -> torch.Tensor:
    """rewards (P, G) -> (P,) bool: groups whose rewards are all equal (no learning signal)."""
    return (rewards == rewards[:, :1]).all(dim=1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


@dataclass
class PolicyLoss:
    loss: torch.Tensor  # scalar to backpropagate (already divided by the normaliser)
    clip_fraction: float  # share of active tokens whose ratio is clipped in the direction that binds
    clip_low_fraction: float
    clip_high_fraction: float
    kl: float  # mean k3 over active tokens (0 when no reference)
    ratio_mean: float


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.28,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    agg: str = "token",
    normalizer: float | None = None,
) -> PolicyLoss:
    """The clipped surrogate, negated so that minimising it maximises J.

    logp, old_logp, ref_logp, mask: (N, T) per completion token; advantages: (N,) one per sequence.
    per token: -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * k3(pi, pi_ref), r = exp(logp - old)
    agg:
      token    (DAPO)     sum(mask * l) / normalizer; normalizer = active tokens in the *whole* batch,
                          passed in when the batch is split into minibatches (default: this mask's sum)
      sequence (GRPO)     mean over sequences of (sum_t mask * l / sum_t mask), times N / normalizer
                          when normalizer (the whole batch's sequence count) is given
      constant (Dr.GRPO)  sum(mask * l) / normalizer; normalizer = sequences * max_tokens (required)
    """
    assert logp.shape == old_logp.shape == mask.shape, (logp.shape, old_logp.shape, mask.shape)
    assert advantages.shape == logp.shape[:1], (advantages.shape, logp.shape)
    m = mask.to(logp.dtype)
    A = advantages.to(logp.dtype).unsqueeze(1)  # (N, 1)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.minimum(ratio * A, clipped * A)
    kl = torch.zeros((), dtype=logp.dtype)
    if beta:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp (the reference policy's log-probs)")
        k3 = kl_k3(logp, ref_logp)
        per_token = per_token + beta * k3
        kl = (k3 * m).sum() / m.sum().clamp(min=1)
    elif ref_logp is not None:
        kl = (kl_k3(logp, ref_logp) * m).sum() / m.sum().clamp(min=1)

    if agg == "token":
        denom = m.sum().clamp(min=1) if normalizer is None else normalizer
        loss = (per_token * m).sum() / denom
    elif agg == "sequence":
        per_seq = (per_token * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)  # (N,)
        loss = per_seq.sum() / (per_seq.shape[0] if normalizer is None else normalizer)
    elif agg == "constant":
        if normalizer is None:
            raise ValueError("agg='constant' (Dr.GRPO) needs normalizer = sequences * max_tokens")
        loss = (per_token * m).sum() / normalizer
    else:
        raise ValueError(f"agg={agg!r}: use 'token', 'sequence' or 'constant'")

    with torch.no_grad():
        active = m.sum().clamp(min=1)
        low = ((ratio < 1 - epsilon_low) & (A < 0)).to(m.dtype) * m
        high = ((ratio > 1 + epsilon_high) & (A > 0)).to(m.dtype) * m
        stats = dict(
            clip_low_fraction=float(low.sum() / active),
            clip_high_fraction=float(high.sum() / active),
            kl=float(kl),
            ratio_mean=float((ratio * m).sum() / active),
        )
    return PolicyLoss(loss=loss, clip_fraction=stats["clip_low_fraction"] + stats["clip_high_fraction"], **stats)


def completion_logprobs(
    model, input_ids: torch.Tensor, completion_mask: torch.Tensor, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of each token under `model`, aligned with input_ids.

    input_ids (N, S) right-padded prompt+completion rows; completion_mask (N, S) marks completion
    tokens. Returns logp (N, S) with logp[:, s] = log pi(input_ids[:, s] | input_ids[:, :s])
    (0 where the mask is off and at s = 0), and the entropy of the same distributions (no grad).
    """
    h = model.hidden_states(input_ids)  # (N, S, D)
    for m in model.moe_layers():  # this forward is not compute_loss: drop the balance-loss term it left
        m.aux_loss = None
    logits = model.logits(h[:, :-1]).float()  # (N, S-1, V): position s predicts token s+1
    logprobs = F.log_softmax(logits, dim=-1)
    token_logp = logprobs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (N, S-1)
    mask = completion_mask[:, 1:].to(token_logp.dtype)
    logp = F.pad(token_logp * mask, (1, 0))  # (N, S)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            ent = -(logprobs.exp() * logprobs).sum(-1)  # (N, S-1)
            entropy = F.pad(ent * mask, (1, 0))
    return logp, entropy


__all__ = ["group_advantages", "zero_variance_groups", "kl_k3", "policy_loss", "PolicyLoss", "completion_logprobs",
           "STD_EPS"]
