"""Held-out evaluation for the training stages and the demo, through the engine.

Greedy accuracy (deterministic) and temperature-1 pass@1 (mean over `samples` draws per problem),
format rate, completion length, and the "empty think" rate: the share of completions that open
with `<think></think>`, i.e. blurt an answer without working it out (the behaviour GRPO trains away
in the miniature, reference/r1-zero-miniature.md).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from .data import prompt_ids


def evaluate(llm, tokenizer, task, problems: Sequence[Any], *, samples: int = 2, max_tokens: int = 48,
             seed: int = 0) -> dict[str, float]:
    from qiusuo.engine import SamplingParams

    t0 = time.perf_counter()
    prompts = [prompt_ids(tokenizer, p.prompt) for p in problems]
    out: dict[str, float] = {"problems": len(problems)}
    runs = [("greedy_", SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens)),
            ("", SamplingParams(n=samples, temperature=1.0, max_tokens=max_tokens, seed=seed))]
    think, end = tokenizer.think_start_id, tokenizer.think_end_id
    for prefix, params in runs:
        results = llm.generate(prompts, params)
        completions = [o for r in results for o in r.outputs]
        expanded = [p for p in problems for _ in range(params.n)]
        scores = task.score_many(expanded, [o.text for o in completions])
        n = len(completions)
        acc = sum(s.accuracy for s in scores) / n
        out[prefix + ("accuracy" if prefix else "pass1")] = acc
        out[prefix + "format_rate"] = sum(s.format for s in scores) / n
        out[prefix + "length"] = sum(len(o.token_ids) for o in completions) / n
        out[prefix + "empty_think_rate"] = sum(list(o.token_ids[:2]) == [think, end] for o in completions) / n
        if not prefix:  # accuracy split by the path the model chose (direct vs worked out)
            direct = [s.accuracy for s, o in zip(scores, completions) if list(o.token_ids[:2]) == [think, end]]
            worked = [s.accuracy for s, o in zip(scores, completions) if list(o.token_ids[:2]) != [think, end]]
            out["direct_accuracy"] = sum(direct) / len(direct) if direct else 0.0
            out["scratchpad_accuracy"] = sum(worked) / len(worked) if worked else 0.0
    out["accuracy"] = out.pop("greedy_accuracy")
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


__all__ = ["evaluate"]
