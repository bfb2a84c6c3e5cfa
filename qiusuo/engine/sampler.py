"""The sampler: temperature, top-k, top-p, greedy, per-request seeds and logprobs, batched.

Sampling is Gumbel-max over the filtered, temperature-scaled logits: argmax(logits / t + g) with
g = -log(-log u) draws from softmax(logits / t). The uniforms u are *counter-based*: a hash of
(the sample's seed, the index of the token being generated, the vocabulary id). So a row's noise
depends on nothing else in the batch: the same seed gives the same tokens whatever else is
batched with it, across preemption and recomputation too, with no per-row torch.Generator calls.
The hash is Chris Wellons' `lowbias32`; its (B, V) part runs on int32 tensors holding the uint32
bits (int64 arithmetic took ~half of a seeded batch-16 step at a 152k vocabulary).

Logprobs are of the raw model distribution (log_softmax of the logits, before temperature and
filtering), as vLLM returns them by default.

The logits the runner hands the sampler are the sampler's (the runner computes them fresh each
step and never reads them again), so request logits processors and grammar masks edit them in
place, as vLLM's sampler does: no copy of the (B, V) batch per step. That matters because every
chat request carries a `ThinkingBudget` processor that changes nothing on almost every step; a
defensive clone of the batch cost 2.5-6 ms per step at batch 16 with a 152k vocabulary (load-dependent).

Dimension letters: B rows, V vocabulary.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from .guided import GrammarStats
from .outputs import Logprob
from .sequence import Sequence

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """seeds (B,) in [0, 2^63), counters (B,) -> uniforms (B, V) in (0, 1), float32 (24 bits).

    The (B, V) part of the hash runs on int32 tensors that hold the uint32 bits (multiplication
    wraps mod 2^32, right shifts are masked to be logical): bit for bit `uniform_noise_reference`
    (tests/test_sampler.py); a seeded step at B=16, V=151,936 takes half the time it took on int64."""
    key = _mix32((seeds & _M32) ^ _mix32((seeds >> 32) + _GOLDEN))
    key = _as_int32(_mix32(key ^ _mix32(counters & _M32)))[:, None]  # (B, 1)
    h = _vocab_term(vocab_size, seeds.device) + key  # (B, V): (key + vocab * golden) mod 2^32
    h = _mix32_int32(_mix32_int32(h).bitwise_xor_(key))
    return h.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF).float().add_(0.5).mul_(2.0**-24)


def uniform_noise_reference(seeds: torch.Tensor, counters: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The same uniforms on int64 tensors, as written (tests/test_sampler.py checks they agree)."""
    key = _mix32((seeds & _M32) ^ _mix32((seeds >> 32) + _GOLDEN))
    key = _mix32(key ^ _mix32(counters & _M32))  # (B,)
    vocab = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    h = _mix32(_mix32((key[:, None] + vocab * _GOLDEN) & _M32) ^ key[:, None])  # (B, V)
    return ((h >> 8).float() + 0.5) / 2.0**24


def _as_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 with the same 32 bits."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


@functools.lru_cache(maxsize=8)
def _vocab_term(vocab_size: int, device: torch.device) -> torch.Tensor:
    """(vocab id * golden) mod 2^32 as int32 bits, (1, V): the same every step, so computed once."""
    vocab = torch.arange(vocab_size, device=device, dtype=torch.int64)
    return _as_int32((vocab * _GOLDEN) & _M32)[None, :]


# lowbias32's multipliers as int32 bit patterns (a Python int above 2^31 does not fit an int32 tensor op)
_C1, _C2 = 0x7FEB352D, 0x846CA68B - 2**32


def _mix32_int32(x: torch.Tensor) -> torch.Tensor:
    """`_mix32` on int32 bits, in place on x (B, V); `(x >> k) & mask` is the logical shift."""
    x.bitwise_xor_((x >> 16).bitwise_and_(0xFFFF)).mul_(_C1)
    x.bitwise_xor_((x >> 15).bitwise_and_(0x1FFFF)).mul_(_C2)
    return x.bitwise_xor_((x >> 16).bitwise_and_(0xFFFF))


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float | None]  # the sampled token's logprob, where asked
    top_logprobs: list[dict[int, Logprob] | None]


class Sampler:
    def __init__(self, decode_token=None):
        self.decode_token = decode_token  # id -> text, for Logprob.decoded_token (None: no tokenizer)
        self.grammar_stats = GrammarStats()
        self._bitmask: torch.Tensor | None = None  # reused (B, ceil(V / 32)) int32 buffer

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits (B, V), one row per sequence, handed over: processors and grammar masks edit it in place."""
        logits = logits.float()  # (B, V); a no-op for fp32 logits
        params = [s.params for s in seqs]
        if any(p.logits_processors for p in params):
            apply_logits_processors(logits, seqs)
        if any(s.guided is not None for s in seqs):
            logits = self._guide(logits, seqs)
        greedy = logits.argmax(dim=-1)
        if all(p.temperature == 0 for p in params):
            tokens = greedy
        else:
            tokens = self._sample(logits, seqs, greedy)
        token_list = tokens.tolist()
        want = [p.logprobs for p in params]
        if all(k is None for k in want):
            n = len(seqs)
            return SamplerOutput(token_list, [None] * n, [None] * n)
        return self._logprobs(logits, tokens, token_list, want)

    def _guide(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Mask each guided row to the tokens its grammar allows (xgrammar's bitmask, in place)."""
        import xgrammar as xgr

        t0 = time.perf_counter()
        B, V = logits.shape
        words = (V + 31) // 32
        if self._bitmask is None or self._bitmask.shape[0] < B or self._bitmask.shape[1] != words:
            self._bitmask = xgr.allocate_token_bitmask(max(B, 16), V)
        bitmask = self._bitmask[:B]
        rows = [b for b, s in enumerate(seqs) if s.guided is not None]
        for b in rows:
            seqs[b].guided.fill(bitmask, b)
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)
        self.grammar_stats.add(t0, len(rows))
        return logits

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], greedy: torch.Tensor) -> torch.Tensor:
        B, V = logits.shape
        device = logits.device
        params = [s.params for s in seqs]
        temp = torch.tensor([p.temperature for p in params], device=device)
        scaled = logits / torch.where(temp > 0, temp, 1.0)[:, None]
        top_k = [p.top_k if 0 < p.top_k < V else V for p in params]
        top_p = [p.top_p for p in params]
        if any(k < V for k in top_k) or any(p < 1 for p in top_p):
            scaled = _filter(scaled, torch.tensor(top_k, device=device), torch.tensor(top_p, device=device))
        seeds = torch.tensor([s.seed for s in seqs], dtype=torch.int64, device=device)
        counters = torch.tensor([s.num_output_tokens for s in seqs], dtype=torch.int64, device=device)
        gumbel = uniform_noise(seeds, counters, V).log_().neg_().log_().neg_()  # (B, V): -log(-log u)
        sampled = gumbel.add_(scaled).argmax(dim=-1)
        return torch.where(temp > 0, sampled, greedy)

    def _logprobs(self, logits, tokens, token_list, want) -> SamplerOutput:
        logp = torch.log_softmax(logits, dim=-1)  # (B, V)
        chosen = logp.gather(1, tokens[:, None])  # (B, 1)
        ranks = ((logp > chosen).sum(dim=-1) + 1).tolist()
        chosen = chosen[:, 0].tolist()
        k_max = max(k or 0 for k in want)
        top_vals, top_ids = logp.topk(k_max, dim=-1) if k_max else (None, None)
        top_vals = top_vals.tolist() if k_max else None
        top_ids = top_ids.tolist() if k_max else None
        lps, tops = [], []
        for b, k in enumerate(want):
            if k is None:
                lps.append(None)
                tops.append(None)
                continue
            tok = token_list[b]
            entry = {tok: Logprob(chosen[b], ranks[b], self._text(tok))}
            for r in range(k):
                tid = top_ids[b][r]
                if tid not in entry:
                    entry[tid] = Logprob(top_vals[b][r], r + 1, self._text(tid))
            lps.append(chosen[b])
            tops.append(entry)
        return SamplerOutput(token_list, lps, tops)

    def _text(self, token_id: int) -> str | None:
        return None if self.decode_token is None else self.decode_token(token_id)


def apply_logits_processors(logits: torch.Tensor, seqs: list[Sequence],
                            output_ids: list[list[int]] | None = None) -> int:
    """Run each sequence's logits processors on its row of `logits` (B, V), in place; return how many
    rows were copied into (rows a processor replaced; one edited in place is not counted: inference
    tensors keep no version counter to tell).

    vLLM's per-request hook, applied as vLLM's sampler applies it: a processor gets its row as a view
    and the output ids so far (`output_ids[b]`, default `seqs[b].output_token_ids`). It returns that
    same tensor to leave the row as it is (no copy at all: the common case, e.g. a thinking budget
    that has not run out), or edits the row in place and returns it, or returns a new (V,) row, which
    is copied into place. The caller owns `logits`: the runner's fresh tensor, never read again.
    """
    changed = 0
    for b, seq in enumerate(seqs):
        procs = seq.params.logits_processors
        if not procs:
            continue
        ids = seq.output_token_ids if output_ids is None else output_ids[b]
        row = logits[b]  # (V,) view
        copied = False
        for proc in procs:
            out = proc(ids, row)
            if out is not row:
                if out.shape != row.shape:
                    raise ValueError(f"logits processor {proc!r} returned shape {tuple(out.shape)}; it must return "
                                     f"the row it was given, edited or not, or a new row of shape {tuple(row.shape)}")
                row.copy_(out)
                copied = True
        changed += copied
    return changed


def _filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask all but each row's top_k tokens and smallest set with mass >= top_p; (B, V) -> (B, V)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    rank = torch.arange(logits.shape[1], device=logits.device)
    remove = rank[None, :] >= top_k[:, None]
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
    remove |= mass_before >= top_p[:, None]  # the most likely token always stays (mass_before = 0)
    remove = torch.zeros_like(remove).scatter_(1, order, remove)  # back to vocabulary order
    return logits.masked_fill(remove, float("-inf"))
