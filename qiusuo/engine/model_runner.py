"""`ModelRunner`: turns a scheduled step into model calls on the paged cache, then samples.

A step runs one forward for the decode rows (one new token each, (B, 1), no padding) and one or
more for the prefill rows (each right-padded to its longest new-token count). Keeping them apart
avoids padding every decode row to the longest prompt. Prefill rows are grouped by length so that
padding stays small (prompts of 8-64 tokens padded to 64 nearly doubled the prefill work of
bench/engine.py); a split costs one more forward's fixed overhead, so `length_groups` splits only
where that saves more than `SPLIT_OVERHEAD_TOKENS` padded tokens. Rows that reuse cached blocks
all go to the last forward: a block a row reads may be written by a sibling prefilled in the same
step, and within one forward every layer writes before it reads (block_manager.py). Rows without
cache hits read only their own blocks, so they may run in any earlier forward. Prefill computes
logits only at each row's last real position (`hidden_states` then `logits`). With LoRA adapters
served (`loras`), each forward first tells the adapter layers which adapter each of its rows uses.

With speculative decoding (`spec_decode.py`) a decode row instead gets drafts from the MTP layer
and one verify forward over its last token and drafts ((B, 1 + k), right-padded), and `run_spec`
returns each row's accepted tokens; every main forward also caches its final hidden states.

Dimension letters: B rows, T new tokens per row, D hidden, V vocabulary, nb blocks per row.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .compiled import CompiledDecode, decode_logits
from .paged_cache import PagedKVCache
from .sampler import Sampler, SamplerOutput
from .sequence import Sequence
from .spec_decode import MTPProposer, RejectionSampler, VerifiedRow


SPLIT_OVERHEAD_TOKENS = 64  # a forward's fixed cost in padded tokens (~1.5 ms vs ~25 us per token, tiny-dense)


def length_groups(lens: list[int], overhead: int = SPLIT_OVERHEAD_TOKENS) -> list[int]:
    """lens sorted longest first -> group sizes minimising sum(overhead + rows * longest) (exact DP).

    Rows of equal length never need splitting, so cuts are only tried where the length changes."""
    n = len(lens)
    cuts = [i for i in range(n) if i == 0 or lens[i] != lens[i - 1]] + [n]
    best = {n: (0, n)}  # start -> (cost of rows start..n-1, end of its first group)
    for a in reversed(cuts[:-1]):
        best[a] = min((overhead + (b - a) * lens[a] + best[b][0], b) for b in cuts if b > a)
    sizes, a = [], 0
    while a < n:
        b = best[a][1]
        sizes.append(b - a)
        a = b
    return sizes


class ModelRunner:
    loras = None  # lora.ServingAdapters when the engine serves LoRA adapters: told each forward's rows

    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, cache_dtype: torch.dtype,
                 sampler: Sampler, compile: bool | str = False, num_speculative_tokens: int = 0):
        self.model = model
        self.device = model.device
        self.block_size = block_size
        self.num_speculative_tokens = k = num_speculative_tokens
        self.cache = PagedKVCache(model, num_blocks, block_size, cache_dtype, self.device, mtp=k > 0)
        self.sampler = sampler
        self.proposer = MTPProposer(model, self.cache, block_size, k) if k else None
        self.rejection_sampler = RejectionSampler(sampler) if k else None
        # The compiled decode graphs are traced on rows spanning >= 2 blocks (a size of 1 would be
        # specialised, LLMEngine._warm_up); shorter rows are padded with the null block, which the
        # mask hides, so that a 10-token chat does not recompile the graph.
        self._min_decode_blocks = 1
        if compile:
            self.decode_forward = CompiledDecode(model, "default" if compile is True else compile)
            self._min_decode_blocks = 2
        else:
            self.decode_forward = functools.partial(decode_logits, model)

    def run(self, prefill: list[Sequence], decode: list[Sequence]) -> SamplerOutput:
        logits = []
        if decode:
            logits.append(self._decode(decode))
        if prefill:
            logits.append(self._prefill_grouped(prefill))
        logits = logits[0] if len(logits) == 1 else torch.cat(logits)  # (B, V), decode rows first
        return self.sampler(logits, decode + prefill)

    def run_spec(self, prefill: list[Sequence], decode: list[Sequence]) -> list[VerifiedRow]:
        """The speculative step: per row (decode rows first) the tokens it gained."""
        rows: list[VerifiedRow] = []
        if decode:
            ks = [s.num_lookahead_tokens(self.num_speculative_tokens) for s in decode]
            drafting = [i for i, k in enumerate(ks) if k]
            drafts: list[list[int]] = [[] for _ in decode]
            qs = None
            if drafting:
                sub_drafts, sub_q = self.proposer.propose([decode[i] for i in drafting], [ks[i] for i in drafting])
                for i, d in zip(drafting, sub_drafts):
                    drafts[i] = d
                if sub_q is not None:
                    qs = torch.zeros(len(decode), *sub_q.shape[1:], device=self.device)
                    qs[torch.tensor(drafting, device=self.device)] = sub_q
            logits = self._verify(decode, drafts)  # (B, 1 + max k, V)
            rows += self.rejection_sampler(logits, decode, drafts, qs)
        if prefill:
            out = self.sampler(self._prefill_grouped(prefill), prefill)
            rows += [VerifiedRow([t], [lp], [top], 0)
                     for t, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs)]
        return rows

    def _verify(self, seqs: list[Sequence], drafts: list[list[int]]) -> torch.Tensor:
        """The main model over each row's last token and its drafts in one forward -> logits (B, T, V)."""
        if self.loras is not None:
            self.loras.prepare([s.lora_id for s in seqs])
        B = len(seqs)
        T = 1 + max(len(d) for d in drafts)
        ids, pos, slots, valid = [], [], [], []
        for b, (s, d) in enumerate(zip(seqs, drafts)):
            n = 1 + len(d)
            start = s.num_tokens - 1
            ids += [s.token_ids[-1]] + d + [0] * (T - n)
            pos += list(range(start, start + n)) + [0] * (T - n)
            slots += [self._slot(s, p) for p in range(start, start + n)]
            valid += range(b * T, b * T + n)
        input_ids = torch.tensor(ids, device=self.device).view(B, T)
        positions = torch.tensor(pos, device=self.device).view(B, T)
        valid_t = torch.tensor(valid, device=self.device) if len(valid) < B * T else None
        slots_t = torch.tensor(slots, device=self.device)
        self.cache.prepare(self._block_tables(seqs), positions, slots_t, valid_t)
        h = self.model.hidden_states(input_ids, positions, cache=self.cache)  # (B, T, D)
        self._write_hidden(h, slots_t, valid_t)
        return self.model.logits(h)  # (B, T, V)

    def _write_hidden(self, h: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Cache the final hidden states of the real new tokens (the MTP layer's input)."""
        if self.cache.hidden is None:
            return
        h = h.reshape(-1, h.shape[-1])  # (B*T, D)
        self.cache.write_hidden(slots, h if valid is None else h.index_select(0, valid))

    def _block_tables(self, seqs: list[Sequence], min_blocks: int = 1) -> torch.Tensor:
        nb = max(min_blocks, max(len(s.block_table) for s in seqs))
        null = self.cache.null_block
        rows = [s.block_table + [null] * (nb - len(s.block_table)) for s in seqs]
        return torch.tensor(rows, dtype=torch.int64, device=self.device)  # (B, nb)

    def _slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _decode(self, seqs: list[Sequence]) -> torch.Tensor:
        if self.loras is not None:
            self.loras.prepare([s.lora_id for s in seqs])
        B = len(seqs)
        pos = [s.num_tokens - 1 for s in seqs]
        input_ids = torch.tensor([s.token_ids[-1] for s in seqs], device=self.device).view(B, 1)
        positions = torch.tensor(pos, device=self.device).view(B, 1)
        slots = torch.tensor([self._slot(s, p) for s, p in zip(seqs, pos)], device=self.device)
        self.cache.prepare(self._block_tables(seqs, self._min_decode_blocks), positions, slots, None)
        return self.decode_forward(input_ids, positions, self.cache)  # (B, V)

    def _prefill_grouped(self, seqs: list[Sequence]) -> torch.Tensor:
        new = [s.num_tokens - s.num_computed_tokens for s in seqs]
        fresh = sorted((i for i, s in enumerate(seqs) if s.num_computed_tokens == 0), key=lambda i: -new[i])
        hits = [i for i, s in enumerate(seqs) if s.num_computed_tokens > 0]
        groups, start = [], 0
        for size in length_groups([new[i] for i in fresh]) if fresh else []:
            groups.append(fresh[start:start + size])
            start += size
        if hits:
            groups.append(hits)  # last: they may read blocks the other groups write
        if len(groups) == 1:
            return self._prefill(seqs)
        order = [i for g in groups for i in g]
        logits = torch.cat([self._prefill([seqs[i] for i in g]) for g in groups])  # (B, V) in `order`
        inverse = [0] * len(order)
        for r, i in enumerate(order):
            inverse[i] = r
        return logits.index_select(0, torch.tensor(inverse, device=self.device))  # the callers' order

    def _prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        if self.loras is not None:
            self.loras.prepare([s.lora_id for s in seqs])
        B = len(seqs)
        lens = [s.num_tokens - s.num_computed_tokens for s in seqs]
        T = max(lens)
        ids, pos, slots, valid = [], [], [], []
        for b, (s, n) in enumerate(zip(seqs, lens)):
            start = s.num_computed_tokens
            ids += s.token_ids[start:] + [0] * (T - n)
            pos += list(range(start, start + n)) + [0] * (T - n)
            slots += [self._slot(s, p) for p in range(start, start + n)]
            valid += range(b * T, b * T + n)
        input_ids = torch.tensor(ids, device=self.device).view(B, T)
        positions = torch.tensor(pos, device=self.device).view(B, T)
        padded = len(valid) < B * T
        valid_t = torch.tensor(valid, device=self.device) if padded else None
        slots_t = torch.tensor(slots, device=self.device)
        self.cache.prepare(self._block_tables(seqs), positions, slots_t, valid_t)
        h = self.model.hidden_states(input_ids, positions, cache=self.cache)  # (B, T, D)
        self._write_hidden(h, slots_t, valid_t)
        last = torch.tensor(lens, device=self.device) - 1
        h_last = h[torch.arange(B, device=self.device), last]  # (B, D)
        return self.model.logits(h_last)  # (B, V)
