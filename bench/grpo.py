"""Benchmark: qiusuo's GRPO against TRL's GRPOTrainer, same checkpoint, task, reward and budget.

Workload (issue 5): a checkpoint in HF layout that emits completions of varying length (by default
a short pretrain of the demo's base, or --model DIR, e.g. runs/demo/pretrain/final), the arithmetic
task with its rule-based reward, G = 8, 64 completions per step, at most 128 new tokens, T = 1,
beta = 0, lr 1e-4, the same number of steps, on the CPU, in one process. TRL uses its default HF
`generate` path (vLLM is GPU-only). The first step of each is a warm-up and is not timed.
Prints completions/s and seconds per step of each and the ratio, then one JSON line.
TRL (and its `datasets`/`accelerate` dependencies) is pip-installed into this environment if missing.

    .venv/bin/python bench/grpo.py [--model DIR] [--steps 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

G, COMPLETIONS_PER_STEP, MAX_NEW_TOKENS, LR = 8, 64, 128, 1e-4


def ensure_trl() -> None:
    if importlib.util.find_spec("trl") is None or importlib.util.find_spec("datasets") is None:
        print("installing trl into this environment (pip) ...", flush=True)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "trl", "datasets", "accelerate"])


def base_checkpoint(model: str | None, tmp: Path, threads: int) -> str:
    if model:
        return model
    from qiusuo.train.config import PretrainConfig
    from qiusuo.train.pretrain import Pretrain

    print("pretraining a small base (150 steps) so completions vary in length ...", flush=True)
    cfg = PretrainConfig(out=str(tmp / "base"), steps=150, warmup_steps=15, threads=threads, progress=False)
    Pretrain(cfg).run()
    return str(tmp / "base" / "final")


def run_qiusuo(ckpt: str, steps: int, tmp: Path, threads: int) -> dict[str, float]:
    from qiusuo.train.config import GRPOConfig
    from qiusuo.train.grpo import GRPO

    cfg = GRPOConfig(model=ckpt, out=str(tmp / "qiusuo"), steps=steps + 1, prompts_per_step=COMPLETIONS_PER_STEP // G,
                     group_size=G, max_tokens=MAX_NEW_TOKENS, lr=LR, threads=threads, progress=False)
    GRPO(cfg).run()
    rows = [json.loads(x) for x in (tmp / "qiusuo" / "metrics.jsonl").read_text().splitlines()][1:]
    seconds = sum(r["step_time"] for r in rows)
    return {"seconds_per_step": seconds / len(rows), "completions_per_s": COMPLETIONS_PER_STEP * len(rows) / seconds,
            "completion_len": sum(r["completion_len"] for r in rows) / len(rows)}


def run_trl(ckpt: str, steps: int, tmp: Path, threads: int) -> dict[str, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from qiusuo.train.data import load_task

    torch.set_num_threads(threads)
    task = load_task("arithmetic")
    problems = task.generate(COMPLETIONS_PER_STEP // G * (steps + 1), seed=0)
    by_prompt = {p.prompt: p for p in problems}
    data = Dataset.from_list([{"prompt": p.prompt} for p in problems])

    def reward(prompts, completions, **_):
        return [s.reward for s in task.score_many([by_prompt[p] for p in prompts], completions)]

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32)
    cfg = GRPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=COMPLETIONS_PER_STEP,
                     num_generations=G, max_completion_length=MAX_NEW_TOKENS, beta=0.0, learning_rate=LR,
                     max_steps=steps + 1, temperature=1.0, logging_steps=1, report_to="none", save_strategy="no",
                     use_cpu=True, bf16=False, gradient_accumulation_steps=1, seed=0, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok,
                          callbacks=[StepTimer()])
    trainer.train()
    timed = times[1:]
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"seconds_per_step": sum(timed) / len(timed),
            "completions_per_s": COMPLETIONS_PER_STEP * len(timed) / sum(timed),
            "completion_len": sum(lengths) / len(lengths) if lengths else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: pretrain a small base first)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps of each trainer (plus one warm-up)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    ensure_trl()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ckpt = base_checkpoint(args.model, tmp, args.threads)
        ours = run_qiusuo(ckpt, args.steps, tmp, args.threads)
        theirs = run_trl(ckpt, args.steps, tmp, args.threads)
    ratio = ours["completions_per_s"] / theirs["completions_per_s"]
    print(f"{'':10} {'s/step':>8} {'completions/s':>14} {'mean length':>12}")
    for name, r in (("qiusuo", ours), ("trl", theirs)):
        print(f"{name:10} {r['seconds_per_step']:8.2f} {r['completions_per_s']:14.1f} {r['completion_len']:12.1f}")
    print(f"qiusuo / trl completions/s: {ratio:.2f}x (target >= 4x)")
    print(json.dumps({"bench": "grpo", "steps": args.steps, "threads": args.threads, "completions_per_step":
                      COMPLETIONS_PER_STEP, "qiusuo": ours, "trl": theirs, "speedup": round(ratio, 2)}))


if __name__ == "__main__":
    main()
