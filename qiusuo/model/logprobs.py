"""Per-token log-probs through the output head in chunks of positions, for every training loss.

The vocabulary-wide logits are the largest tensor of a training step on a real vocabulary: one GRPO
micro-batch of 8 x 1,024 positions on Qwen2.5's 151,936 tokens is 8 x 1,024 x 151,936 x 4 B = 5 GB of
fp32 logits, and as much again for log_softmax and for its gradient. `token_logprobs` runs the output
head, log_softmax and the gather over at most LOGIT_CHUNK_ELEMENTS logits at a time; under gradients
each chunk is checkpointed (torch.utils.checkpoint), so its logits are freed after the forward and
recomputed in the backward: one more output-head matmul per chunk for memory bounded by one chunk.
Values and gradients are the unchunked computation's (Liger's fused linear + loss kernels do the same
with hand-written backward passes). A batch that fits one chunk (the built-in tokenizer's tiny
vocabulary) runs as one plain computation.

Dimension letters (qiusuo/model/__init__.py): N positions of a chunk, D hidden, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# At most this many fp32 logits exist at once: 2**25 = 128 MiB, ~220 positions of a 151,936 vocabulary.
LOGIT_CHUNK_ELEMENTS = 1 << 25


def _chunk_logprobs(model, h: torch.Tensor, targets: torch.Tensor, with_entropy: bool):
    """h (N, D), targets (N,) -> log pi(target) (N,), and the entropy (N,) without gradient."""
    logprobs = F.log_softmax(model.logits(h).float(), dim=-1)  # (N, V)
    token_logp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N,)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logprobs.exp() * logprobs).sum(-1)
    return token_logp, entropy


def token_logprobs(model, h: torch.Tensor, targets: torch.Tensor, with_entropy: bool = False,
                   chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """h (..., D) final hidden states, targets (...) -> log pi(targets) (...) with gradient, and the
    entropies (...) without, through `model.logits` `chunk_tokens` positions at a time (default: as many
    as keep LOGIT_CHUNK_ELEMENTS logits)."""
    shape = targets.shape
    flat_h, flat_t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)  # (N, D), (N,)
    N = flat_t.shape[0]
    step = chunk_tokens or max(1, LOGIT_CHUNK_ELEMENTS // model.config.vocab_size)
    if step >= N:
        lp, ent = _chunk_logprobs(model, flat_h, flat_t, with_entropy)
        return lp.view(shape), None if ent is None else ent.view(shape)
    from torch.utils.checkpoint import checkpoint

    lps, ents = [], []
    for a in range(0, N, step):
        args = (model, flat_h[a: a + step], flat_t[a: a + step], with_entropy)
        if torch.is_grad_enabled():
            lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*args)
        lps.append(lp)
        ents.append(ent)
    return torch.cat(lps).view(shape), torch.cat(ents).view(shape) if with_entropy else None


__all__ = ["token_logprobs", "LOGIT_CHUNK_ELEMENTS"]
