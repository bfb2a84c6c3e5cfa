"""The held-out check the demo and GRPO runs print: greedy and temperature-1 figures from `qiusuo.eval`.

Greedy accuracy (deterministic) and temperature-1 pass@1 (over `samples` draws per problem),
format rate, completion length, and the "empty think" rate: the share of completions that open
with `<think></think>`, i.e. blurt an answer without working it out (the behaviour GRPO trains
away in the R1-Zero miniature: from 0.68 of completions to 0.00 in the CPU prototype), with the
T=1 accuracy of each path. With `trace_stats` (a task's `search_stats`, e.g. Countdown's), also how
often completions retry and verify inside the think block, greedy and at T=1, counted by that function.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from qiusuo.eval import evaluate as run_eval


def evaluate(llm, task, problems: Sequence[Any], *, samples: int = 2, max_tokens: int = 48,
             seed: int = 0, trace_stats: Callable[[str, Any], dict[str, int]] | None = None) -> dict[str, float]:
    t0 = time.perf_counter()
    greedy = run_eval(llm, task, problems, samples=1, temperature=0.0, max_tokens=max_tokens, seed=seed)
    sampled = run_eval(llm, task, problems, samples=samples, temperature=1.0, max_tokens=max_tokens, seed=seed)
    out: dict[str, float] = {"problems": len(problems)}
    for prefix, r in (("greedy_", greedy), ("", sampled)):
        out[prefix + ("accuracy" if prefix else "pass1")] = r.metrics["pass@1"]
        out[prefix + "format_rate"] = r.metrics["format_rate"]
        out[prefix + "length"] = r.metrics["mean_completion_tokens"]
        out[prefix + "empty_think_rate"] = r.metrics["empty_think_rate"]
    flat = [s for rec in sampled.records for s in rec["samples"]]
    direct = [s["correct"] for s in flat if s["empty_think"]]
    worked = [s["correct"] for s in flat if not s["empty_think"]]
    out["direct_accuracy"] = sum(direct) / len(direct) if direct else 0.0
    out["scratchpad_accuracy"] = sum(worked) / len(worked) if worked else 0.0
    if trace_stats is not None:
        for prefix, r in (("greedy_", greedy), ("", sampled)):
            counts = [trace_stats(s["text"], p) for p, rec in zip(problems, r.records) for s in rec["samples"]]
            out[prefix + "retry_rate"] = sum(c["retries"] > 0 for c in counts) / len(counts)
            out[prefix + "retries"] = sum(c["retries"] for c in counts) / len(counts)
            out[prefix + "verify_rate"] = sum(c["verifies"] > 0 for c in counts) / len(counts)
    out["accuracy"] = out.pop("greedy_accuracy")
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


__all__ = ["evaluate"]
