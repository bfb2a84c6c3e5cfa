"""Can a base's scratchpad carry to longer operands? A probe to run before spending on GRPO.

Pretrains the demo's base (tiny-dense, 68 rows a step, 25% blurt rows weighted to the 60% mix, 30% slips)
on arithmetic with a given scratchpad and difficulty mix, then evaluates it on the demo's held-out sets
(test split, seed 1234): greedy accuracy, T=1 pass@1 (2 samples), the T=1 share of completions that work
it out and how often those are right, and for "rewrite" where those go wrong: the share of worked T=1
completions whose first k lines are the rule's (`lines_right`, k = 1, 2, ...). RL can select the worked-out path but not fix it, so the transfer
gain it can give is about (worked completions right on the harder set) x (the shift from blurts to work).

    PYTHONPATH=. nice -n 10 python tools/transfer_probe.py --scratchpad rewrite --difficulty 1,2,3 \\
        --out /tmp/probe --sets 3:300:80 4:300:112

--eval-only evaluates the run already in --out. --independent-lengths draws each operand's digit count from 1..difficulty on its own in the pretraining
corpus (the held-out sets keep equal lengths): no read can then lean on where the other operand ends.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time

import torch

from qiusuo.engine import LLM
from qiusuo.eval import evaluate as sample_completions
from qiusuo.model import load_model
from qiusuo.tasks.arithmetic import Arithmetic
from qiusuo.train.demo import EVAL_SEED, DemoConfig, demo_task, pretrain_config, task_options
from qiusuo.train.evaluate import evaluate
from qiusuo.train.pretrain import Pretrain


class IndependentLengths(Arithmetic):
    """Addition whose operands have independent digit counts, each uniform in 1..difficulty."""

    def sample(self, rng: random.Random, difficulty: int, op: str | None = None) -> tuple[str, str, dict]:
        a, b = (rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)
                for d in (rng.randint(1, difficulty), rng.randint(1, difficulty)))
        return f"{a}+{b}", str(a + b), {"op": "+", "a": a, "b": b}


def lines_right(llm, task, problems, max_tokens: int) -> list[float]:
    """Share of worked T=1 completions (2 per problem) whose first k think lines equal the rule's, per k."""
    run = sample_completions(llm, task, problems, samples=2, temperature=1.0, max_tokens=max_tokens, seed=EVAL_SEED)
    width = max(len(task.steps(p)[0]) for p in problems)
    right, worked = [0] * width, 0
    for p, record in zip(problems, run.records):
        gold = task.steps(p)[0]
        for sample in record["samples"]:
            if sample["empty_think"]:
                continue
            worked += 1
            lines = sample["text"].split("<think>")[-1].split("</think>")[0].split(",")
            for k in range(len(gold)):
                right[k] += lines[:k + 1] == gold[:k + 1]
    return [round(r / max(worked, 1), 3) for r in right]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scratchpad", default="rewrite", choices=("columns", "rewrite"))
    ap.add_argument("--difficulty", default="1,2,3", help="pretraining levels, comma-separated")
    ap.add_argument("--independent-lengths", action="store_true")
    ap.add_argument("--steps", type=int, default=None,
                    help="pretraining steps (default: the demo's; README's Transfer runs used 700)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="directory of the pretraining run")
    ap.add_argument("--eval-only", action="store_true", help="skip pretraining: evaluate --out's final model")
    ap.add_argument("--sets", nargs="+", default=["3:300:80", "4:300:112"],
                    help="held-out sets as digits:problems:max_tokens")
    args = ap.parse_args()
    torch.set_num_threads(1)
    demo = DemoConfig(scratchpad=args.scratchpad, difficulty=args.difficulty, pretrain_steps=args.steps,
                      seed=args.seed, threads=1, progress=False)
    cfg = pretrain_config(demo, args.out)
    task = demo_task(demo)  # the held-out sets' task: equal operand lengths
    wall, cpu = time.perf_counter(), time.process_time()
    if not args.eval_only:
        corpus = IndependentLengths(template="compact", **task_options(demo)) if args.independent_lengths else task
        Pretrain(cfg, task=corpus).run()
        print(f"pretrain: wall {time.perf_counter() - wall:.0f} s, CPU {time.process_time() - cpu:.0f} s")

    model, tokenizer = load_model(f"{args.out}/final", device="cpu")
    llm = LLM(model=model, tokenizer=tokenizer)
    for spec in args.sets:
        digits, n, max_tokens = map(int, spec.split(":"))
        problems = task.generate(n, seed=EVAL_SEED, split="test", difficulty=digits)
        r = evaluate(llm, task, problems, samples=2, seed=EVAL_SEED, max_tokens=max_tokens)
        row = {"digits": digits, "problems": n, "greedy": r["accuracy"], "pass1": r["pass1"],
               "worked_share_t1": round(1 - r["empty_think_rate"], 4), "worked_right_t1": r["scratchpad_accuracy"]}
        if args.scratchpad == "rewrite":
            row["lines_right"] = lines_right(llm, task, problems, max_tokens)
        print(json.dumps(row))
    print(f"total: wall {time.perf_counter() - wall:.0f} s, CPU {time.process_time() - cpu:.0f} s, "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
