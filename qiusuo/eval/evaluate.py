"""`evaluate`: sample K completions per problem through the engine and score them with the task.

Metrics: pass@1 and pass@k (the unbiased estimator of Chen et al. 2021), maj@k (majority vote
over parsed answers), format rate, completion length split into think tokens (inside think blocks,
tags excluded: the server's usage `reasoning_tokens`, counted by `qiusuo.engine.reasoning`) and the
rest, the rate of empty think blocks (`<think></think><answer>...`: the answer blurted without
working), timeouts of the answer checker, and generation tokens/s. With temperature 0 and one
sample, pass@1 is greedy accuracy.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from qiusuo.engine.reasoning import ThinkState
from qiusuo.rewards.metrics import maj_at_k, mean_pass_at_k
from qiusuo.tasks.prompts import prompt_ids


@dataclass
class EvalResult:
    task: str
    num_problems: int
    samples: int
    temperature: float
    seed: int
    metrics: dict[str, float]
    by_difficulty: dict[str, dict[str, float]]
    by_length: dict[str, dict[str, float]]
    records: list[dict[str, Any]] = field(repr=False)

    def to_dict(self, with_records: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_records:
            d.pop("records")
        return d


def _pass_ks(samples: int) -> list[int]:
    ks, k = [], 1
    while k < samples:
        ks.append(k)
        k *= 2
    return ks + [samples]


def encode_prompt(tokenizer: Any, task: Any, problem: Any) -> list[int]:
    """Token ids of a problem's prompt, exactly as the training stages encode it (`qiusuo.tasks.prompts`)."""
    return prompt_ids(tokenizer, task, problem)


def evaluate(llm: Any, task: Any, problems: Sequence[Any], *, samples: int = 1, temperature: float = 0.0,
             top_p: float = 1.0, max_tokens: int = 256, seed: int = 0) -> EvalResult:
    from qiusuo.engine import SamplingParams

    if samples < 1:
        raise ValueError(f"samples={samples}: need at least one sample per problem")
    if temperature == 0 and samples > 1:
        raise ValueError("greedy decoding (temperature 0) gives the same sample every time; use --samples 1 "
                         "or a temperature > 0")
    if not problems:
        raise ValueError("no problems to evaluate")
    tokenizer = llm.get_tokenizer()
    prompts = [encode_prompt(tokenizer, task, p) for p in problems]
    params = [SamplingParams(n=samples, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                             seed=seed * 1_000_003 + i) for i in range(len(problems))]
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params)
    gen_seconds = time.perf_counter() - t0
    flat_problems = [p for p in problems for _ in range(samples)]
    completions = [c for out in outputs for c in out.outputs]
    scores = task.score_many(flat_problems, [c.text for c in completions])

    records = []
    for i, (problem, out) in enumerate(zip(problems, outputs)):
        rec_samples = []
        for j, c in enumerate(out.outputs):
            s = scores[i * samples + j]
            # The server's splitter and usage count: tags excluded, a prompt-opened block included.
            think = ThinkState.for_prompt(tokenizer, prompts[i]).scan(c.token_ids)
            n_think = think.num_reasoning_tokens
            rec_samples.append({"text": c.text, "reward": s.reward, "correct": s.accuracy >= 1.0,
                                "format": s.format, "answer": s.parsed_answer, "tokens": len(c.token_ids),
                                "think_tokens": n_think, "answer_tokens": len(c.token_ids) - n_think,
                                "empty_think": think.closed and n_think == 0,
                                "truncated": c.finish_reason == "length", "timed_out": s.timed_out})
        records.append({"question": problem.question, "gold": problem.answer,
                        "difficulty": problem.metadata.get("difficulty"), "samples": rec_samples})

    flat = [s for r in records for s in r["samples"]]
    n_tokens = sum(s["tokens"] for s in flat)
    metrics = _summary(records, samples)
    metrics.update({
        "format_rate": _mean(s["format"] for s in flat),
        "mean_completion_tokens": n_tokens / len(flat),
        "mean_think_tokens": _mean(s["think_tokens"] for s in flat),
        "mean_answer_tokens": _mean(s["answer_tokens"] for s in flat),
        "empty_think_rate": _mean(s["empty_think"] for s in flat),
        "truncation_rate": _mean(s["truncated"] for s in flat),
        "checker_timeouts": sum(s["timed_out"] for s in flat),
        "generation_seconds": gen_seconds,
        "tokens_per_second": n_tokens / gen_seconds if gen_seconds > 0 else 0.0,
    })
    by_difficulty = _grouped(records, samples, lambda r, s: str(r["difficulty"]))
    by_length = _grouped(records, samples, lambda r, s: _length_bucket(s["tokens"]))
    return EvalResult(task.name, len(problems), samples, temperature, seed, metrics, by_difficulty, by_length, records)


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else 0.0


def _summary(records: list[dict], samples: int) -> dict[str, float]:
    counts = [(len(r["samples"]), sum(s["correct"] for s in r["samples"])) for r in records]
    out = {f"pass@{k}": mean_pass_at_k(counts, k) for k in _pass_ks(samples)}
    if samples > 1:
        out[f"maj@{samples}"] = _mean(
            maj_at_k([s["answer"] for s in r["samples"]], correct=[s["correct"] for s in r["samples"]])
            for r in records)
    out["accuracy"] = out["pass@1"]
    return out


def _length_bucket(tokens: int) -> str:
    lo = 1 << max(tokens - 1, 0).bit_length() - 1 if tokens > 1 else 0
    return f"{lo}-{max(2 * lo - 1, 1)}" if lo else "0-1"


def _grouped(records: list[dict], samples: int, key) -> dict[str, dict[str, float]]:
    """Per-group sample accuracy (pass@1 over the samples falling in each group) and counts."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        for s in r["samples"]:
            groups[key(r, s)].append(s["correct"])
    return {k: {"accuracy": _mean(v), "count": len(v)} for k, v in sorted(groups.items(), key=lambda kv: _sort_key(kv[0]))}


def _sort_key(k: str):
    head = k.split("-")[0]
    return (0, int(head)) if head.isdigit() else (1, k)
