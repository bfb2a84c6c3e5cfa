"""Benchmark: qiusuo's GRPO against TRL's GRPOTrainer, same checkpoint, task, reward and budget.

Workload (issue 5): a checkpoint in HF layout that emits completions of varying length (by default
a short pretrain of the demo's base, or --model DIR, e.g. runs/demo/pretrain/final), the arithmetic
task with its rule-based reward, G = 8, 64 completions per step, at most 128 new tokens, T = 1,
beta = 0, lr 1e-4, the same number of steps and torch threads, on the CPU. TRL uses its default HF
`generate` path (vLLM is GPU-only). The first step of each is a warm-up and is not timed.

What keeps it fair (checked, and printed): both read the same directory; both prompt with
[bos] + prompt tokens; both stop at eos, count the eos in a completion's length and sample 64
completions per step (counted in each worker, not assumed). Each trainer runs in its own child
process, so its CPU seconds are its own and neither inherits the other's imports or thread pools.
TRL's gradient checkpointing (on by default in its GRPOConfig) is turned off, because qiusuo keeps
activations and recomputing them is extra work a ~1M-parameter model does not need;
--trl-gradient-checkpointing measures TRL's default instead. qiusuo drops groups whose rewards are
all equal (DAPO) and so trains on fewer rows when that happens; TRL backpropagates them with zero
advantage. Both figures are reported (`rows_trained`).

The machine is shared, so the summary uses medians over the timed steps, of wall seconds and of the
process's CPU seconds (time.process_time: all its threads); the ratio is given for both.
Prints a table, then one JSON line.

    .venv/bin/python bench/grpo.py [--model DIR] [--steps 10] [--threads 1] [--rounds 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

G, COMPLETIONS_PER_STEP, MAX_NEW_TOKENS, LR = 8, 64, 128, 1e-4
RESULT = "RESULT "  # prefix of a worker's one result line on stdout


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


# ---------------------------------------------------------------------- workers (one child process each)
def run_qiusuo(ckpt: str, steps: int, tmp: Path, threads: int, **_) -> dict:
    from qiusuo.train.config import GRPOConfig
    from qiusuo.train.grpo import GRPO

    cfg = GRPOConfig(model=ckpt, out=str(tmp / "qiusuo"), steps=steps + 1, prompts_per_step=COMPLETIONS_PER_STEP // G,
                     group_size=G, max_tokens=MAX_NEW_TOKENS, lr=LR, threads=threads, progress=False)
    seen_threads: list[int] = []
    GRPO(cfg, on_step=lambda step, m: seen_threads.append(torch.get_num_threads())).run()
    rows = [json.loads(x) for x in (tmp / "qiusuo" / "metrics.jsonl").read_text().splitlines()][1:]
    return {"wall": [r["step_time"] for r in rows], "cpu": [r["step_cpu_time"] for r in rows],
            "completion_len": [r["completion_len"] for r in rows],
            "completions": [round(r["tokens"] / r["completion_len"]) for r in rows],
            "rows_trained": [r["groups_used"] * G for r in rows],
            "rollout_s": [r["rollout_time"] for r in rows], "update_s": [r["update_time"] for r in rows],
            "threads": sorted(set(seen_threads))}


def run_trl(ckpt: str, steps: int, tmp: Path, threads: int, gradient_checkpointing: bool = False, **_) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from qiusuo.train.data import load_task

    torch.set_num_threads(threads)
    task = load_task("arithmetic")
    problems = task.generate(COMPLETIONS_PER_STEP // G * (steps + 1), seed=0)
    by_prompt = {p.prompt: p for p in problems}
    data = Dataset.from_list([{"prompt": p.prompt} for p in problems])
    scored: list[int] = []  # completions the reward saw, per call (one call per step)

    def reward(prompts, completions, **_):
        scored.append(len(completions))
        return [s.reward for s in task.score_many([by_prompt[p] for p in prompts], completions)]

    wall: list[float] = []
    cpu: list[float] = []
    seen_threads: set[int] = set()

    class StepTimer(TrainerCallback):
        # on_step_begin .. on_step_end spans generation, scoring, loss, backward and the optimizer step;
        # the trainer's logging runs after on_step_end, as qiusuo's metrics line is written after step_fn.
        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            wall.append(time.perf_counter() - self.t0)
            cpu.append(time.process_time() - self.c0)
            seen_threads.add(torch.get_num_threads())

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    cfg = GRPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=COMPLETIONS_PER_STEP,
                     num_generations=G, max_completion_length=MAX_NEW_TOKENS, beta=0.0, learning_rate=LR,
                     max_steps=steps + 1, temperature=1.0, logging_steps=1, report_to="none", save_strategy="no",
                     use_cpu=True, bf16=False, gradient_accumulation_steps=1, seed=0, dataloader_num_workers=0,
                     gradient_checkpointing=gradient_checkpointing, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok,
                          callbacks=[StepTimer()])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h][1:]
    return {"wall": wall[1:], "cpu": cpu[1:], "completion_len": [h["completions/mean_length"] for h in logs],
            "completions": scored[1:], "rows_trained": scored[1:],
            "frac_reward_zero_std": [h.get("frac_reward_zero_std", 0.0) for h in logs], "threads": sorted(seen_threads)}


def worker(name: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        fn = run_qiusuo if name == "qiusuo" else run_trl
        out = fn(args.model, args.steps, Path(d), args.threads, gradient_checkpointing=args.trl_gradient_checkpointing)
    use = resource.getrusage(resource.RUSAGE_SELF)
    out["process_cpu_s"] = round(use.ru_utime + use.ru_stime, 2)  # the whole child: imports and load included
    print(RESULT + json.dumps(out), flush=True)


# ---------------------------------------------------------------------- the parent: run both, summarise
def spawn(name: str, ckpt: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--model", ckpt, "--steps", str(args.steps),
           "--threads", str(args.threads)] + (["--trl-gradient-checkpointing"] if args.trl_gradient_checkpointing else [])
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT)]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"the {name} worker failed (exit {proc.returncode}); its output is above")
    r = json.loads(lines[-1][len(RESULT):])
    r["load_before"] = round(load, 2)
    return r


def merge(runs: list[dict]) -> dict:
    """One trainer's rounds pooled: per-step lists concatenated, per-process figures kept per round."""
    out = {k: [x for r in runs for x in r[k]] for k, v in runs[0].items() if isinstance(v, list) and k != "threads"}
    out["threads"] = sorted({t for r in runs for t in r["threads"]})
    out["process_cpu_s"] = [r["process_cpu_s"] for r in runs]
    out["load_before"] = [r["load_before"] for r in runs]
    return out


def summarise(r: dict) -> dict:
    med = statistics.median
    return {"seconds_per_step": round(med(r["wall"]), 4), "cpu_seconds_per_step": round(med(r["cpu"]), 4),
            "completions_per_s": round(COMPLETIONS_PER_STEP / med(r["wall"]), 1),
            "completions_per_cpu_s": round(COMPLETIONS_PER_STEP / med(r["cpu"]), 1),
            "mean_wall_s": round(statistics.fmean(r["wall"]), 4), "completion_len": round(statistics.fmean(r["completion_len"]), 2),
            "completions_per_step": sorted(set(r["completions"])),
            "rows_trained_per_step": round(statistics.fmean(r["rows_trained"]), 1),
            **{k: r[k] for k in ("threads", "process_cpu_s", "load_before")},
            **({"rollout_s": round(med(r["rollout_s"]), 4), "update_s": round(med(r["update_s"]), 4)}
               if "rollout_s" in r else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: pretrain a small base first)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps of each trainer (plus one warm-up)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate the two trainers this many times and pool their steps (steadier on a busy machine)")
    ap.add_argument("--trl-gradient-checkpointing", action="store_true",
                    help="leave TRL's default activation recomputation on (extra work qiusuo does not do)")
    ap.add_argument("--worker", choices=("qiusuo", "trl"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args)
        return
    ensure_trl()
    with tempfile.TemporaryDirectory() as d:
        ckpt = base_checkpoint(args.model, Path(d), args.threads)
        runs: dict[str, list[dict]] = {"qiusuo": [], "trl": []}
        for _ in range(args.rounds):  # alternating, so a burst of outside load hits both alike
            for name in runs:
                runs[name].append(spawn(name, ckpt, args))
        ours, theirs = (summarise(merge(runs[name])) for name in ("qiusuo", "trl"))
    for name, r in (("qiusuo", ours), ("trl", theirs)):
        if r["completions_per_step"] != [COMPLETIONS_PER_STEP] or r["threads"] != [args.threads]:
            print(f"WARNING: {name} ran {r['completions_per_step']} completions/step on threads {r['threads']}")
    ratio = theirs["seconds_per_step"] / ours["seconds_per_step"]
    ratio_cpu = theirs["cpu_seconds_per_step"] / ours["cpu_seconds_per_step"]
    print(f"medians over {args.rounds} x {args.steps} steps, each run after one warm-up, {args.threads} thread(s), {COMPLETIONS_PER_STEP} "
          f"completions/step")
    print(f"{'':8} {'s/step':>7} {'cpu s/step':>10} {'compl/s':>8} {'compl/cpu-s':>11} {'mean len':>8} "
          f"{'rows trained':>12} {'proc cpu s':>10}")
    for name, r in (("qiusuo", ours), ("trl", theirs)):
        print(f"{name:8} {r['seconds_per_step']:7.3f} {r['cpu_seconds_per_step']:10.3f} {r['completions_per_s']:8.1f} "
              f"{r['completions_per_cpu_s']:11.1f} {r['completion_len']:8.1f} {r['rows_trained_per_step']:12.1f} "
              f"{statistics.fmean(r['process_cpu_s']):10.1f}")
    print(f"qiusuo rollout {ours['rollout_s']:.3f} s + update {ours['update_s']:.3f} s (medians)")
    print(f"qiusuo / trl completions/s: {ratio:.2f}x wall, {ratio_cpu:.2f}x cpu (target >= 4x)")
    print(json.dumps({"bench": "grpo", "steps": args.steps, "rounds": args.rounds, "threads": args.threads,
                      "completions_per_step": COMPLETIONS_PER_STEP, "max_new_tokens": MAX_NEW_TOKENS,
                      "trl_gradient_checkpointing": args.trl_gradient_checkpointing, "qiusuo": ours, "trl": theirs,
                      "speedup": round(ratio, 2), "speedup_cpu": round(ratio_cpu, 2)}))


if __name__ == "__main__":
    main()
