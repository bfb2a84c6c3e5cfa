"""MTP self-speculative decoding: the model's own MTP layer drafts k tokens, the main model verifies
them in one forward, and the longest agreeing prefix is kept (DeepSeek-V3 report, arXiv 2412.19437
§5.4.3; vLLM's `speculative_config={"method": "mtp"}`).

Drafting (`MTPProposer`). The MTP layer was trained (transformer.py, `compute_loss`) to take the
main model's final hidden state h_{i-1} and the embedding of token t_i and predict t_{i+1}; it
is a full decoder layer, so it attends to its own states of earlier positions. Those states live
in the paged cache next to the main model's (an extra layer), indexed by the token they embed:
position j holds the state of (h_{j-1}, t_j), RoPE position j - 1 as in training, and position 0
holds none (masked). So a block's MTP states depend only on the tokens up to the block's end,
and prefix caching shares them as it shares the main KV. The main model's final hidden states
are cached too (`PagedKVCache.hidden`), so the MTP layer can start after a cached prefix.

Each step, per decoding sequence with n tokens (t_{n-1} sampled, not yet in the cache):
1. catch-up: the MTP layer runs over positions [num_mtp_computed, n) with the *verified* hidden
   states, which fixes the states the previous step's drafts wrote; its last output drafts d_1;
2. steps 2..k: the layer's own output and d_{j-1} draft d_j (one position each), as vLLM reuses
   a single MTP layer for every draft step; these states are rewritten by the next catch-up;
3. verify: the main model runs [t_{n-1}, d_1..d_k] at positions n-1..n-1+k in one forward.

Acceptance (`RejectionSampler`). Greedy rows keep drafts while they equal the target's argmax,
then add the target's own token: the output is the non-speculative greedy output. Sampled rows
use speculative sampling (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023, arXiv
2302.01318): accept d_j with probability min(1, p(d_j) / q(d_j)), on rejection sample from
norm(max(0, p - q)), and when all k are accepted sample a bonus token from p; p and q are the
target's and the draft's distributions after the request's logits processors, temperature,
top-k and top-p, so the output follows exactly the distribution non-speculative sampling draws
from. The uniforms are counter-based (sampler.py) on separate streams for drafting, accepting and
resampling, keyed by (seed, output index): a seed still gives the same tokens whatever the batch.

Whatever the MTP state holds (stale, or written by a request that stopped early), the output is
the target's: the draft only decides how many tokens a step yields.

Dimension letters: B rows, T positions per row, k draft tokens, D hidden, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .outputs import Logprob
from .paged_cache import PagedKVCache
from .sampler import Sampler, _filter, apply_logits_processors, uniform_noise
from .sequence import Sequence

# Salts for the counter-based streams: the draft's Gumbel noise and the acceptance uniforms are
# independent of the target stream, which is the non-speculative sampler's own (so a row verified
# with no drafts samples exactly what the plain engine would).
_DRAFT_SALT = 0x2545F4914F6CDD1D
_ACCEPT_SALT = 0x5851F42D4C957F2D
_M63 = (1 << 63) - 1


def _salted(seeds: torch.Tensor, salt: int) -> torch.Tensor:
    return (seeds ^ (salt & _M63)) & _M63


@dataclass
class SpecDecodingStats:
    """vLLM's spec_decode counters (Prometheus `spec_decode_num_drafts`, ...), cumulative."""

    num_speculative_tokens: int
    num_drafts: int = 0  # rows verified with at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.num_accepted_tokens_per_pos:
            self.num_accepted_tokens_per_pos = [0] * self.num_speculative_tokens

    def observe(self, num_draft: int, num_accepted: int) -> None:
        if num_draft == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        for j in range(num_accepted):
            self.num_accepted_tokens_per_pos[j] += 1

    def as_dict(self) -> dict:
        return {"num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens,
                "num_accepted_tokens_per_pos": list(self.num_accepted_tokens_per_pos)}


def _slot(seq: Sequence, pos: int, block_size: int) -> int:
    return seq.block_table[pos // block_size] * block_size + pos % block_size


def _processed(logits: torch.Tensor, seqs: list[Sequence], contexts: list[list[int]]) -> torch.Tensor:
    """Apply each row's logits processors with its own output-so-far, in place on `logits` (B, V),
    a fresh tensor of the caller's; returns it."""
    if any(s.params.logits_processors for s in seqs):
        apply_logits_processors(logits, seqs, contexts)
    return logits


def _scaled(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Temperature, top-k and top-p as the sampler applies them (sampled rows only): (B, V) -> (B, V)."""
    V = logits.shape[-1]
    params = [s.params for s in seqs]
    temp = torch.tensor([p.temperature for p in params], device=logits.device)
    scaled = logits / torch.where(temp > 0, temp, 1.0)[:, None]
    top_k = [p.top_k if 0 < p.top_k < V else V for p in params]
    top_p = [p.top_p for p in params]
    if any(k < V for k in top_k) or any(p < 1 for p in top_p):
        scaled = _filter(scaled, torch.tensor(top_k, device=logits.device), torch.tensor(top_p, device=logits.device))
    return scaled


def _gumbel(seeds: torch.Tensor, counters: torch.Tensor, V: int) -> torch.Tensor:
    return -torch.log(-torch.log(uniform_noise(seeds, counters, V)))  # (B, V)


class MTPProposer:
    """Drafts tokens with the model's first MTP layer over the paged cache (module docstring)."""

    def __init__(self, model: nn.Module, cache: PagedKVCache, block_size: int, num_speculative_tokens: int):
        self.model = model
        self.layer = model.mtp[0]
        self.cache = cache
        self.block_size = block_size
        self.k = num_speculative_tokens
        self.device = model.device

    def _forward(self, h_prev, tokens, positions, seqs, slots, valid) -> torch.Tensor:
        """h_prev (B, T, D), tokens/positions (B, T) (positions index the MTP states, RoPE uses
        position - 1) -> the MTP layer's normalised output (B, T, D)."""
        null = self.cache.null_block
        nb = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [null] * (nb - len(s.block_table)) for s in seqs],
                              dtype=torch.int64, device=self.device)  # (B, nb)
        emb = self.model.model.embed_tokens(tokens)  # (B, T, D)
        cos, sin = self.model.rotary(positions - 1, emb.dtype)
        self.cache.prepare(tables, positions, slots, valid, first_visible=1)
        return self.layer(h_prev, emb, cos, sin, self.cache.attn_mask(positions), self.cache)

    def propose(self, seqs: list[Sequence], ks: list[int]) -> tuple[list[list[int]], torch.Tensor | None]:
        """Draft ks[b] tokens for row b (ks[b] >= 1). Returns the drafts and, when any row samples,
        the draft distributions q (B, max k, V) they were sampled from (greedy rows: unused)."""
        B, bs, dev = len(seqs), self.block_size, self.device
        # 1. catch-up over positions [num_mtp_computed, n) of each row, right-padded to T
        starts = [s.num_mtp_computed for s in seqs]
        lens = [s.num_tokens - m for s, m in zip(seqs, starts)]
        T = max(lens)
        ids, pos, hslots, slots, valid = [], [], [], [], []
        for b, (s, m, n) in enumerate(zip(seqs, starts, lens)):
            ids += s.token_ids[m:m + n] + [0] * (T - n)
            pos += list(range(m, m + n)) + [1] * (T - n)  # a padded query sees position 1 only (finite)
            hslots += [_slot(s, p - 1, bs) for p in range(m, m + n)] + [self.cache.null_block * bs] * (T - n)
            slots += [_slot(s, p, bs) for p in range(m, m + n)]
            valid += range(b * T, b * T + n)
        tokens = torch.tensor(ids, device=dev).view(B, T)
        positions = torch.tensor(pos, device=dev).view(B, T)
        h_prev = self.cache.read_hidden(torch.tensor(hslots, device=dev).view(B, T))  # (B, T, D)
        valid_t = torch.tensor(valid, device=dev) if len(valid) < B * T else None
        g = self._forward(h_prev, tokens, positions, seqs, torch.tensor(slots, device=dev), valid_t)  # (B, T, D)
        g = g[torch.arange(B, device=dev), torch.tensor(lens, device=dev) - 1]  # (B, D) each row's last
        for s in seqs:
            s.num_mtp_computed = s.num_tokens
        sampling = any(not s.params.greedy for s in seqs)
        drafts: list[list[int]] = [[] for _ in seqs]
        qs = torch.zeros(B, max(ks), self.model.config.vocab_size, device=dev) if sampling else None
        rows = list(range(B))
        for j in range(max(ks)):
            if j:  # 2. one more position per row still drafting: (its output, its last draft)
                keep = [i for i, b in enumerate(rows) if ks[b] > j]
                if len(keep) < len(rows):
                    rows = [rows[i] for i in keep]
                    g = g[torch.tensor(keep, device=dev)]
                sub = [seqs[b] for b in rows]
                p = [s.num_tokens + j - 1 for s in sub]
                tokens = torch.tensor([drafts[b][-1] for b in rows], device=dev).view(-1, 1)
                positions = torch.tensor(p, device=dev).view(-1, 1)
                slots = torch.tensor([_slot(s, q, bs) for s, q in zip(sub, p)], device=dev)
                g = self._forward(g[:, None], tokens, positions, sub, slots, None)[:, 0]  # (B', D)
            sub = [seqs[b] for b in rows]
            logits = _processed(self.model.logits(g).float(), sub,
                                [s.output_token_ids + drafts[b] for s, b in zip(sub, rows)])  # (B', V)
            tok = logits.argmax(dim=-1)
            if sampling:
                scaled = _scaled(logits, sub)
                seeds = _salted(torch.tensor([s.seed for s in sub], dtype=torch.int64, device=dev), _DRAFT_SALT)
                counters = torch.tensor([s.num_output_tokens + j for s in sub], dtype=torch.int64, device=dev)
                sampled = (scaled + _gumbel(seeds, counters, logits.shape[-1])).argmax(dim=-1)
                greedy = torch.tensor([s.params.greedy for s in sub], device=dev)
                tok = torch.where(greedy, tok, sampled)
                qs[rows, j] = scaled.softmax(dim=-1)
            for b, t in zip(rows, tok.tolist()):
                drafts[b].append(t)
        return drafts, qs


@dataclass
class VerifiedRow:
    token_ids: list[int]  # accepted drafts then the target's token
    logprobs: list[float | None]
    top_logprobs: list[dict[int, Logprob] | None]
    num_accepted: int
    num_draft: int = 0  # draft tokens this row verified


class RejectionSampler:
    """Keeps the longest acceptable prefix of each row's drafts (module docstring)."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler  # for logprobs, exactly as the plain path computes them

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]],
                 qs: torch.Tensor | None) -> list[VerifiedRow]:
        """logits (B, T, V): the target's at positions n-1..n-1+k_b of each row (T = 1 + max k_b)."""
        B, T, V = logits.shape
        dev = logits.device
        ks = [len(d) for d in drafts]
        # Flatten the real positions: row b, position j (0..k_b) predicts output index n_out + j.
        row_of, pos_of = [], []
        for b, k in enumerate(ks):
            row_of += [b] * (k + 1)
            pos_of += range(k + 1)
        flat = logits[torch.tensor(row_of, device=dev), torch.tensor(pos_of, device=dev)].float()  # (N, V)
        fseqs = [seqs[b] for b in row_of]
        flat = _processed(flat, fseqs, [seqs[b].output_token_ids + drafts[b][:j] for b, j in zip(row_of, pos_of)])
        argmax = flat.argmax(dim=-1).tolist()
        sampling = [not s.params.greedy for s in seqs]
        if any(sampling):
            scaled = _scaled(flat, fseqs)  # (N, V)
            p = scaled.softmax(dim=-1)
            seeds = torch.tensor([s.seed for s in fseqs], dtype=torch.int64, device=dev)
            counters = torch.tensor([s.num_output_tokens + j for s, j in zip(fseqs, pos_of)], dtype=torch.int64,
                                    device=dev)
            u_accept = uniform_noise(_salted(seeds, _ACCEPT_SALT), counters, 1)[:, 0].tolist()  # (N,)
            gumbel = _gumbel(seeds, counters, V)  # the plain sampler's stream
        out_tokens, out_index, num_accepted = [], [], []
        start = 0
        for b, k in enumerate(ks):
            toks: list[int] = []
            a = 0
            if not sampling[b]:
                while a < k and drafts[b][a] == argmax[start + a]:
                    a += 1
                toks = drafts[b][:a] + [argmax[start + a]]
            else:
                while a < k:
                    i, d = start + a, drafts[b][a]
                    q_d = float(qs[b, a, d])
                    if u_accept[i] * q_d < float(p[i, d]):  # accept with probability min(1, p/q)
                        a += 1
                        continue
                    residual = (p[i] - qs[b, a]).clamp(min=0)
                    if float(residual.sum()) <= 0:  # p == q: a rejection had probability 0
                        residual = p[i]
                    toks = drafts[b][:a] + [int((residual.log() + gumbel[i]).argmax())]
                    break
                else:  # every draft accepted: a bonus token from p, as the plain sampler draws it
                    i = start + k
                    toks = drafts[b][:k] + [int((scaled[i] + gumbel[i]).argmax())]
            out_tokens.append(toks)
            out_index.append(list(range(start, start + len(toks))))
            num_accepted.append(a)
            start += k + 1
        want = [s.params.logprobs for s in seqs]
        rows = []
        if all(w is None for w in want):
            for toks, a, k in zip(out_tokens, num_accepted, ks):
                rows.append(VerifiedRow(toks, [None] * len(toks), [None] * len(toks), a, k))
            return rows
        idx = [i for ix in out_index for i in ix]
        tok_flat = [t for toks in out_tokens for t in toks]
        lp = self.sampler._logprobs(flat[torch.tensor(idx, device=dev)], torch.tensor(tok_flat, device=dev),
                                    tok_flat, [want[row_of[i]] for i in idx])
        c = 0
        for toks, a, k in zip(out_tokens, num_accepted, ks):
            n = len(toks)
            rows.append(VerifiedRow(toks, lp.logprobs[c:c + n], lp.top_logprobs[c:c + n], a, k))
            c += n
        return rows
