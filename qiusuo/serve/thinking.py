"""Thinking budget: once a sample has `budget` reasoning tokens, its next token is forced to `</think>`.

The engine has no per-request logits hook yet, so this is an adapter: it wraps the engine's
`Sampler` (`engine.runner.sampler`), and before sampling it masks every logit but `</think>`'s on
the rows that are over budget; greedy, seeded sampling and logprobs then all see the forced
token (its logprob is 0, the others -inf; the server clamps those for JSON). Only the engine
thread calls it, so its state needs no lock. Budgets are per request; the state per sample
(request id, sample index) is updated incrementally from the sequence's new output tokens, so
preemption and recomputation (which keep the tokens) change nothing.

The engine change that would retire this file: a `SamplingParams.logits_processors` (vLLM's
`(output_token_ids, logits) -> logits` callables) or a built-in `max_thinking_tokens` with the
think ids taken from the tokenizer.

Dimension letters: B rows, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class _SampleState:
    scanned: int  # output tokens already looked at
    in_reasoning: bool
    num_reasoning: int = 0


class ThinkingBudget:
    """Installed once per engine: `ThinkingBudget.install(engine, start_id, end_id)`."""

    def __init__(self, inner, start_id: int, end_id: int):
        self.inner = inner
        self.start_id = start_id
        self.end_id = end_id
        self._budgets: dict[str, tuple[int, bool]] = {}  # request id -> (budget, prompt opens think)
        self._states: dict[tuple[str, int], _SampleState] = {}

    @classmethod
    def install(cls, engine, start_id: int, end_id: int) -> "ThinkingBudget":
        sampler = engine.runner.sampler
        if isinstance(sampler, ThinkingBudget):
            return sampler
        wrapper = cls(sampler, start_id, end_id)
        engine.runner.sampler = wrapper
        return wrapper

    def __getattr__(self, name):  # anything else the engine asks of its sampler
        return getattr(self.inner, name)

    # ------------------------------------------------------------------ requests (engine thread)
    def add(self, request_id: str, budget: int, opened_by_prompt: bool) -> None:
        if budget < 0:
            raise ValueError(f"thinking_budget={budget}: must be >= 0 (0 closes the think block at once)")
        self._budgets[request_id] = (budget, opened_by_prompt)

    def remove(self, request_id: str) -> None:
        if self._budgets.pop(request_id, None) is not None:
            for key in [k for k in self._states if k[0] == request_id]:
                del self._states[key]

    @property
    def num_tracked(self) -> int:
        return len(self._budgets)

    # ------------------------------------------------------------------ sampling
    def __call__(self, logits: torch.Tensor, seqs):
        if self._budgets:
            rows = [b for b, seq in enumerate(seqs) if self._over_budget(seq)]
            if rows:
                logits = logits.clone()  # (B, V); the runner's tensor is not ours to change
                forced = logits[rows]  # (R, V)
                forced.fill_(float("-inf"))
                forced[:, self.end_id] = 0.0
                logits[rows] = forced
        return self.inner(logits, seqs)

    def _over_budget(self, seq) -> bool:
        entry = self._budgets.get(seq.request_id)
        if entry is None:
            return False
        budget, opened = entry
        key = (seq.request_id, seq.index)
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = _SampleState(0, opened)
        out = seq.token_ids[seq.num_prompt_tokens + state.scanned:]
        for tid in out:
            if not state.in_reasoning and tid == self.start_id:
                state.in_reasoning = True
            elif state.in_reasoning and tid == self.end_id:
                state.in_reasoning = False
            elif state.in_reasoning:
                state.num_reasoning += 1
        state.scanned += len(out)
        return state.in_reasoning and state.num_reasoning >= budget
