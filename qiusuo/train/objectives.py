"""The GRPO objective as pure tensor functions: advantages, the clipped policy loss, KL k3.

Kept free of models and engines so the tests can check them against hand-computed tensors.
Formulas follow DeepSeekMath's GRPO (arXiv:2402.03300), DAPO (arXiv:2503.14476), Dr.GRPO
(arXiv:2503.20783) and TRL's `GRPOTrainer._compute_loss`.

Dimension letters: P prompts, G samples per prompt, N = P*G sequences (the package legend's B),
T completion positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qiusuo.engine.model_runner import length_groups
from qiusuo.model.logprobs import LOGIT_CHUNK_ELEMENTS, token_logprobs

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
    importance_sampling_level: str = "token",
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
    importance_sampling_level:
      token     r per token, as above (PPO/GRPO)
      sequence  GSPO (Zheng et al. 2025, arXiv 2507.18071): one r per sequence, the geometric mean of its
                tokens' ratios, r_i = exp(sum_t mask * (logp - old) / sum_t mask), clipped and shared by
                every token of the sequence; its gradient reaches each token's logp as r_i / |y_i|.
                TRL's `importance_sampling_level="sequence"`. On-policy (one pass, one minibatch) r_i = 1
                and both levels give the same update; they differ once the batch is reused.
    """
    assert logp.shape == old_logp.shape == mask.shape, (logp.shape, old_logp.shape, mask.shape)
    assert advantages.shape == logp.shape[:1], (advantages.shape, logp.shape)
    m = mask.to(logp.dtype)
    A = advantages.to(logp.dtype).unsqueeze(1)  # (N, 1)
    if importance_sampling_level == "token":
        ratio = torch.exp(logp - old_logp)  # (N, T)
    elif importance_sampling_level == "sequence":
        seq_log_ratio = ((logp - old_logp) * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1)
        ratio = torch.exp(seq_log_ratio).expand_as(logp)  # (N, 1) -> (N, T)
    else:
        raise ValueError(f"importance_sampling_level={importance_sampling_level!r}: use 'token' or 'sequence'")
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


# A forward+backward's fixed cost in padded tokens: rows are split into length groups (the engine's
# prefill rule, `length_groups`) only where that saves more padded tokens than this; 16..256 all
# measured within noise of each other on the demo base (64 GRPO rows of 9 prompt + 8..33
# completion tokens: forward+backward 0.18 -> 0.11 CPU s from the length groups alone).
SPLIT_OVERHEAD_TOKENS = 64


class _PrefixRecorder:
    """Cache protocol (qiusuo.model.cache): keeps each layer's states of the shared-prefix forward."""

    def __init__(self):
        self.states: dict[int, tuple[torch.Tensor, ...]] = {}

    def attn_mask(self, positions: torch.Tensor) -> None:
        return None  # plain causal: prefixes are right-padded, so padding never precedes a real token

    def update(self, layer_idx: int, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.states[layer_idx] = states  # (U, Lp, ...) each, kept with their graph
        return states


class _PrefixReader:
    """Cache protocol: suffix row i sees the first plen[i] recorded states of prefix owner[i], then
    its own tokens causally. Gradients reach the prefix forward through index_select."""

    def __init__(self, states: dict[int, tuple[torch.Tensor, ...]], owner: torch.Tensor, plen: torch.Tensor):
        self.states, self.owner, self.plen = states, owner, plen

    def attn_mask(self, positions: torch.Tensor) -> torch.Tensor:
        n, T = positions.shape
        Lp = next(iter(self.states.values()))[0].shape[1]
        seen = torch.arange(Lp, device=positions.device) < self.plen[:, None]  # (n, Lp)
        causal = torch.ones(T, T, dtype=torch.bool, device=positions.device).tril()
        return torch.cat((seen[:, None, :].expand(n, T, Lp), causal.expand(n, T, T)), dim=2)[:, None]  # (n,1,T,Lp+T)

    def update(self, layer_idx: int, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        past = self.states[layer_idx]
        return tuple(torch.cat((p.index_select(0, self.owner), x), dim=1) for p, x in zip(past, states))


def completion_token_logprobs(
    model, input_ids: torch.Tensor, completion_mask: torch.Tensor, with_entropy: bool = False,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of each token under `model`, aligned with input_ids.

    input_ids (N, S) right-padded prompt+completion rows; completion_mask (N, S) marks completion
    tokens. Returns logp (N, S) with logp[:, s] = log pi(input_ids[:, s] | input_ids[:, :s])
    (0 where the mask is off and at s = 0), and the entropy of the same distributions (no grad).

    The same values as one forward over the padded batch (to fp32 rounding), for ~40% less work on
    GRPO batches (demo base, 64 rows: forward+backward 0.18 -> 0.08 CPU s), because:
    - rows sharing a prompt (a GRPO group: G rows, one prompt) run the prompt once: a prefix forward
      records each layer's cached states, and every row's suffix attends to its prompt's states
      through the model's cache protocol; the prefix gets the gradients of all its rows;
    - a row is cut after its last completion token (causal: nothing before reads what follows), and
      suffixes are grouped by length (`length_groups`), so padding is not computed;
    - rows with no completion token are not computed at all, and logits come from suffixes only;
    - the output head and log_softmax run over chunks of positions (`token_logprobs`), so the
      vocabulary-wide logits of the whole batch never exist at once.
    The prefix of a row is everything before its last prompt token; that token starts the suffix,
    since its hidden state predicts the first completion token.
    """
    N, S = input_ids.shape
    dev = input_ids.device
    pos = torch.arange(S, device=dev)
    on = completion_mask.bool() & (pos > 0)  # position 0 has no predecessor: never scored
    logp_rows = [torch.zeros(N, S, device=dev)]  # row N of the concatenation: zeros for rows never computed
    ent_rows = [torch.zeros(N, S, device=dev)] if with_entropy else []
    active = on.any(dim=1).nonzero().flatten().tolist()
    source = list(range(N))  # row of torch.cat(logp_rows) holding row i: its zero row unless computed
    if active:
        ends = (torch.where(on, pos, -1).amax(dim=1) + 1).tolist()
        cuts = (torch.where(on, pos, S).amin(dim=1) - 1).tolist()  # prefix length = last prompt token's position
        prefixes: dict[tuple[int, ...], int] = {}
        owner = [prefixes.setdefault(tuple(input_ids[i, : cuts[i]].tolist()), len(prefixes)) for i in active]
        firsts = {u: active[j] for j, u in reversed(list(enumerate(owner)))}  # one row holding each prefix
        Lp = max(cuts[i] for i in active)
        states = None
        if Lp > 0:
            rec = _PrefixRecorder()
            first_rows = torch.tensor([firsts[u] for u in range(len(prefixes))], device=dev)
            model.hidden_states(input_ids[first_rows, :Lp], cache=rec)  # (U, Lp, D): only the states matter
            states = rec.states
        owner_of = dict(zip(active, owner))
        order = sorted(active, key=lambda i: -(ends[i] - cuts[i]))
        wide_ids = F.pad(input_ids, (0, S))  # suffix windows may run past S on padding rows
        wide_on = F.pad(on, (0, S))
        a, base = 0, N
        for size in length_groups([ends[i] - cuts[i] for i in order], SPLIT_OVERHEAD_TOKENS):
            rows = order[a: a + size]
            a += size
            Ls = ends[rows[0]] - cuts[rows[0]]
            idx = torch.tensor(rows, device=dev)
            cut = torch.tensor([cuts[i] for i in rows], device=dev)
            cols = cut[:, None] + torch.arange(Ls, device=dev)  # (n, Ls) absolute positions of the suffix
            ids = wide_ids[idx].gather(1, cols)
            cache = None if states is None else _PrefixReader(
                states, torch.tensor([owner_of[i] for i in rows], device=dev), cut)
            h = model.hidden_states(ids, cols, cache=cache)  # (n, Ls, D)
            for m in model.moe_layers():  # these forwards are not compute_loss: drop the balance-loss terms
                m.aux_loss = None
            # position j predicts token j+1; the vocabulary-wide logits exist one chunk at a time
            token_logp, ent = token_logprobs(model, h[:, :-1], ids[:, 1:], with_entropy, chunk_tokens)  # (n, Ls-1)
            mask = wide_on[idx].gather(1, cols[:, 1:]).to(token_logp.dtype)
            out = torch.zeros(len(rows), 2 * S, device=dev)
            logp_rows.append(out.scatter(1, cols[:, 1:], token_logp * mask)[:, :S])  # (n, S)
            if with_entropy:
                ent_rows.append(out.scatter(1, cols[:, 1:], ent * mask)[:, :S])
            for r, i in enumerate(rows):
                source[i] = base + r
            base += len(rows)
    take = torch.tensor(source, device=dev)
    logp = torch.cat(logp_rows).index_select(0, take)  # (N, S) in the callers' row order
    entropy = torch.cat(ent_rows).index_select(0, take) if with_entropy else None
    return logp, entropy


__all__ = ["group_advantages", "zero_variance_groups", "kl_k3", "policy_loss", "PolicyLoss", "completion_token_logprobs",
           "token_logprobs", "STD_EPS", "LOGIT_CHUNK_ELEMENTS"]
