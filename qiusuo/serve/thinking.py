"""Thinking budget: once a sample has `budget` reasoning tokens, its next token is forced to `</think>`.

A per-request logits processor (`SamplingParams.logits_processors`, vLLM's hook): it masks every
logit but `</think>`'s while the sample is inside its think block with `budget` reasoning tokens
already written. Greedy, seeded sampling and logprobs then all see the forced token (its logprob
is 0, the others -inf; the server clamps those for JSON). It is stateless — it reads the state
off the sample's output ids each step — so the n samples of a request can share it, and
preemption and recomputation change nothing.
"""

from __future__ import annotations

import dataclasses

import torch

from qiusuo.engine import SamplingParams


class ThinkingBudget:
    def __init__(self, budget: int, start_id: int, end_id: int, opened_by_prompt: bool = False):
        if budget < 0:
            raise ValueError(f"thinking_budget={budget}: must be >= 0 (0 closes the think block at once)")
        self.budget, self.start_id, self.end_id = budget, start_id, end_id
        self.opened_by_prompt = opened_by_prompt  # the chat template already wrote `<think>`

    def num_reasoning_tokens(self, output_ids: list[int]) -> int | None:
        """Reasoning tokens written so far, or None when the sample is not inside its think block."""
        if self.opened_by_prompt:
            start = 0
        elif self.start_id in output_ids:
            start = output_ids.index(self.start_id) + 1
        else:
            return None
        if self.end_id in output_ids[start:]:
            return None
        return len(output_ids) - start

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        n = self.num_reasoning_tokens(output_ids)
        if n is None or n < self.budget:
            return logits
        forced = torch.full_like(logits, float("-inf"))  # (V,)
        forced[self.end_id] = 0.0
        return forced


def with_thinking_budget(params: SamplingParams, budget: int | None, tokenizer,
                         opened_by_prompt: bool = False) -> SamplingParams:
    """`params` plus a `ThinkingBudget` processor when a budget is set and the tokenizer has think tags."""
    start_id = getattr(tokenizer, "think_start_id", None)
    end_id = getattr(tokenizer, "think_end_id", None)
    if budget is None or start_id is None or end_id is None:
        return params
    proc = ThinkingBudget(budget, start_id, end_id, opened_by_prompt)
    return dataclasses.replace(params, logits_processors=[*params.logits_processors, proc])
