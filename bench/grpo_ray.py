"""Benchmark: GRPO throughput on Ray with 1 and 2 rollout workers, against the single process.

Workload: a tiny-dense model (random init, --layers/--hidden, or --model DIR), a toy reward (share of digits
in the completion, so every group has signal and every step runs an update), P prompts x G = 8
samples, --max-tokens new tokens, T = 1, one torch thread per process (each Ray actor gets one).
The first step of each run is a warm-up (engine and allocator start) and is not timed. Prints
completions/s of whole steps (rollout + update + weight broadcast) and of the rollout phase alone,
then one JSON line. All Ray runs share one local Ray (127.0.0.1) started here.

    .venv/bin/python bench/grpo_ray.py [--steps 4] [--prompts 16] [--max-tokens 32]
                                       [--layers 2 --hidden 128 | --model DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


class DigitsTask:
    """Reward = share of the completion's characters that are digits (defined here: pickled by value)."""

    name = "bench-digits"

    def generate(self, n, seed, split="train"):
        from qiusuo.tasks.base import Problem

        return [Problem(prompt=f"{(seed + i) % 97}=", question="q", answer="0") for i in range(n)]

    def score_many(self, problems, texts):
        from qiusuo.tasks.base import Score

        out = []
        for t in texts:
            r = sum(c.isdigit() for c in t) / len(t) if t else 0.0
            out.append(Score(reward=r, format=float(bool(t)), accuracy=float(r == 1.0), parsed_answer=None))
        return out


def summarize(run: Path, completions_per_step: int) -> dict[str, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1:]  # drop the warm-up
    step_s = sum(r["step_time"] for r in rows)
    rollout_s = sum(r["rollout_time"] for r in rows)
    return {"completions_per_s": round(completions_per_step * len(rows) / step_s, 1),
            "rollout_completions_per_s": round(completions_per_step * len(rows) / rollout_s, 1),
            "seconds_per_step": round(step_s / len(rows), 3), "completion_len": round(
                sum(r["completion_len"] for r in rows) / len(rows), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4, help="timed steps (plus one warm-up)")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step (x G = 8 completions)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--model", default=None, help="checkpoint directory (default: a random tiny-dense)")
    p.add_argument("--layers", type=int, default=2, help="layers of the random tiny-dense")
    p.add_argument("--hidden", type=int, default=128, help="hidden size of the random tiny-dense (heads of 32)")
    args = p.parse_args()
    torch.set_num_threads(1)

    from qiusuo.model import build_model, save_model
    from qiusuo.train.config import GRPOConfig
    from qiusuo.train.distributed import RayGRPO, ray_session
    from qiusuo.train.grpo import GRPO

    tmp = Path(tempfile.mkdtemp(prefix="bench-grpo-ray-"))
    size = dict(num_hidden_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.hidden // 32,
                intermediate_size=args.hidden * 11 // 4)
    base = args.model or str(save_model(*build_model("tiny-dense", seed=0, **size), tmp / "base"))
    G = 8
    common = dict(model=base, prompts_per_step=args.prompts, group_size=G, max_tokens=args.max_tokens,
                  steps=args.steps + 1, lr=1e-4, threads=1, progress=False)
    results = {}
    GRPO(GRPOConfig(out=str(tmp / "single"), **common), task=DigitsTask()).run()
    results["single process"] = summarize(tmp / "single", args.prompts * G)
    with ray_session(num_cpus=3):
        for n in (1, 2):
            out = tmp / f"ray{n}"
            RayGRPO(GRPOConfig(out=str(out), ray=True, rollout_workers=n, **common), task=DigitsTask()).run()
            results[f"ray, {n} rollout worker{'s' if n > 1 else ''}"] = summarize(out, args.prompts * G)
    for name, r in results.items():
        print(f"{name:26s} {r['completions_per_s']:7.1f} completions/s per step   "
              f"{r['rollout_completions_per_s']:7.1f} completions/s in rollouts   {r['seconds_per_step']:.3f} s/step")
    one, two = results["ray, 1 rollout worker"], results["ray, 2 rollout workers"]
    print(f"2 vs 1 rollout workers: x{two['completions_per_s'] / one['completions_per_s']:.2f} per step, "
          f"x{two['rollout_completions_per_s'] / one['rollout_completions_per_s']:.2f} in rollouts")
    print(json.dumps({"workload": {"prompts": args.prompts, "G": G, "max_tokens": args.max_tokens,
                                   "steps": args.steps, "model": args.model or size}, **results}))


if __name__ == "__main__":
    main()
