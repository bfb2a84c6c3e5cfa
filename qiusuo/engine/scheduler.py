"""`Scheduler`: continuous batching under a token budget and a fixed KV-block budget.

Every step (vLLM V1's order): first every running sequence decodes one token, oldest first; when a
sequence needs a new block and none is free, the *newest* running sequence is preempted: its blocks
are freed and it goes back to the front of the waiting queue, to be recomputed later (its prompt
and generated tokens are prefilled again, mostly from the prefix cache). Then waiting sequences
are admitted, first come first served, while the token budget (`max_num_batched_tokens`), the
sequence cap (`max_num_seqs`) and the free blocks allow. A step that preempted admits nothing, so
that a preempted sequence does not immediately evict another one.

With speculative decoding each decoding sequence also needs KV slots for its draft tokens
(`num_lookahead_tokens`, vLLM's lookahead slots), and they count against the token budget.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    prefill: list[Sequence] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 num_lookahead_tokens: int = 0):
        self.block_manager = block_manager
        self.num_lookahead_tokens = num_lookahead_tokens
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        bm = self.block_manager
        out = SchedulerOutput()
        queue = deque(self.running)
        preempted = False
        num_decode_tokens = 0
        while queue:
            seq = queue.popleft()
            lookahead = seq.num_lookahead_tokens(self.num_lookahead_tokens) if self.num_lookahead_tokens else 0
            while not bm.can_append(seq, lookahead):
                preempted = True
                self._preempt(queue.pop() if queue else seq)
                if seq.status is SequenceStatus.WAITING:
                    break
            if seq.status is SequenceStatus.RUNNING:
                bm.may_append(seq, lookahead)
                out.decode.append(seq)
                num_decode_tokens += 1 + lookahead
        self.running = list(out.decode)
        if preempted:
            return out
        budget = self.max_num_batched_tokens - num_decode_tokens
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # Upper bound (cache hits are known only after allocation); the first prefill of a
            # step always fits because the budget is at least the context length.
            if (out.prefill and seq.num_tokens > budget) or not bm.can_allocate(seq):
                break
            self.waiting.popleft()
            bm.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            budget -= seq.num_tokens - seq.num_computed_tokens
            out.prefill.append(seq)
            self.running.append(seq)
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Free a sequence that has finished (already marked) or is being aborted."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.deallocate(seq)
