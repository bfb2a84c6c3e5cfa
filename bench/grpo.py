"""Benchmark: qiusuo's GRPO against TRL's GRPOTrainer, same checkpoint, problems, reward and budget.

Two workloads, each with its own base checkpoint in HF layout (a short pretrain of a tiny-dense
model on the task's corpus, or --model DIR for both):
- `short`: the arithmetic task, at most 128 new tokens (completions of ~10-40 tokens): the update
  is a large part of a step;
- `reasoning`: Countdown with scratchpads only (the base never saw a direct answer), at most 256
  new tokens, from a briefly pretrained base whose completions run long: generation dominates.

Both sides: G = 8, 64 completions per step, T = 1, beta = 0, lr 1e-4, the same number of steps and
torch threads, fp32 on the CPU. The *same problems in the same order*: qiusuo draws step s's
problems with seed step_seed(0, s, 0); TRL's dataset is those problems, step after step, read with
`shuffle_dataset=False`, and step 0's prompt token ids (qiusuo's [bos] + prompt, TRL's tokenizer
call) are asserted equal. Completions are sampled (seeds differ by construction), so the lengths are
compared and reported, not asserted.

Sides, each trainer in its own child process (its CPU seconds are its own):
- `qiusuo drop`: qiusuo's default, groups whose rewards are all equal are dropped (DAPO);
- `qiusuo keep`: the same with those groups kept and backpropagated at zero advantage, as TRL does
  (`--no-filter-zero-variance`, GRPOConfig.filter_zero_variance=False);
- `trl generate`: TRL's default generation (transformers `generate`, padded static batch);
- `trl continuous batching`: `use_transformers_continuous_batching=True` (transformers' paged
  continuous batching); the better TRL side is the ratio's denominator.
TRL's vLLM paths are not used, though vLLM has a CPU backend: its x86 CPU wheels (since 0.17) are
on vLLM's GitHub releases, not PyPI (whose wheel targets CUDA), and this bench's machine reaches
PyPI only; they pin their own torch build (this project pins torch 2.13.0; a bench that swaps
torch no longer compares the same stack); and on AVX2-only CPUs vLLM lists "limited features". TRL's gradient checkpointing (on by default) is turned off, as
qiusuo keeps activations (--trl-gradient-checkpointing measures TRL's default).

The first step of each child is a warm-up and not timed. Repeats (default 3) alternate the order of
the sides; per-step medians are pooled over the repeats. Results go to bench/results/grpo-*.json.

    python bench/grpo.py [--workloads short reasoning] [--steps 5] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import Run, alternating, median  # noqa: E402
from trl_side import PINNED, check_versions, prompt_dataset, step_timer  # noqa: E402

G, COMPLETIONS_PER_STEP, LR, SEED = 8, 64, 1e-4, 0
PROMPTS_PER_STEP = COMPLETIONS_PER_STEP // G
RESULT = "RESULT "  # prefix of a worker's one result line on stdout
WORKLOADS = {
    # name: (task, max new tokens, pretrain steps of the base, share of direct answers in its corpus)
    "short": ("arithmetic", 128, 80, 0.6),
    "reasoning": ("countdown", 256, 30, 0.0),
}
SIDES = ("qiusuo drop", "qiusuo keep", "trl generate", "trl continuous batching")


def base_checkpoint(workload: str, model: str | None, tmp: Path, threads: int) -> str:
    if model:
        return model
    from qiusuo.train.config import PretrainConfig
    from qiusuo.train.pretrain import Pretrain

    task, _, steps, p_direct = WORKLOADS[workload]
    print(f"[{workload}] pretraining a small base on {task} ({steps} steps) ...", flush=True)
    cfg = PretrainConfig(out=str(tmp / f"base-{workload}"), task=task, steps=steps, warmup_steps=max(steps // 10, 1),
                         p_direct=p_direct, threads=threads, progress=False, seed=SEED)
    Pretrain(cfg).run()
    return str(tmp / f"base-{workload}" / "final")


def step_problems(task, step: int) -> list:
    """Step `step`'s problems, exactly as qiusuo's GRPO draws them (GRPO._problems, round 0)."""
    from qiusuo.train.data import step_seed

    return task.generate(PROMPTS_PER_STEP, seed=step_seed(SEED, step, 0), split="train")


# ---------------------------------------------------------------------- workers (one child process each)
def run_qiusuo(ckpt: str, workload: str, steps: int, tmp: Path, threads: int, keep: bool, **_) -> dict:
    import qiusuo.train.grpo as grpo_module
    from qiusuo.train.config import GRPOConfig
    from qiusuo.tasks.prompts import prompt_ids

    task_name, max_tokens, _, _ = WORKLOADS[workload]
    cfg = GRPOConfig(model=ckpt, task=task_name, out=str(tmp / "qiusuo"), steps=steps + 1,
                     prompts_per_step=PROMPTS_PER_STEP, group_size=G, max_tokens=max_tokens, lr=LR, threads=threads,
                     progress=False, seed=SEED, filter_zero_variance=not keep)
    first_prompts: list[list[int]] = []
    sample_groups = grpo_module.sample_groups

    def spy(llm, tokenizer, task, problems, seeds, cfg):
        if not first_prompts:
            first_prompts.extend(prompt_ids(tokenizer, task, p) for p in problems)
        return sample_groups(llm, tokenizer, task, problems, seeds, cfg)

    grpo_module.sample_groups = spy
    seen_threads: list[int] = []
    trainer = grpo_module.GRPO(cfg, on_step=lambda step, m: seen_threads.append(torch.get_num_threads()))
    expected = step_problems(trainer.task, 0)
    trainer.run()
    rows = [json.loads(x) for x in (tmp / "qiusuo" / "metrics.jsonl").read_text().splitlines()]
    # the problems TRL is given (step_problems) are the ones qiusuo sampled at step 0
    assert first_prompts == [prompt_ids(trainer.tokenizer, trainer.task, p) for p in expected], \
        "step_problems drifted from GRPO's"
    rows = rows[1:]
    return {"wall": [r["step_time"] for r in rows], "cpu": [r["step_cpu_time"] for r in rows],
            "completion_len": [r["completion_len"] for r in rows],
            "completions": [round(r["tokens"] / r["completion_len"]) for r in rows],
            "rows_trained": [r["groups_used"] * G for r in rows],
            "zero_variance_frac": [r["zero_variance_frac"] for r in rows],
            "rollout_s": [r["rollout_time"] for r in rows], "update_s": [r["update_time"] for r in rows],
            "step0_prompt_ids": first_prompts, "threads": sorted(set(seen_threads))}


def run_trl(ckpt: str, workload: str, steps: int, tmp: Path, threads: int, continuous_batching: bool,
            gradient_checkpointing: bool = False, **_) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from qiusuo.train.data import load_task

    torch.set_num_threads(threads)
    task_name, max_tokens, _, _ = WORKLOADS[workload]
    task = load_task(task_name)
    problems = [p for s in range(steps + 1) for p in step_problems(task, s)]  # qiusuo's, in qiusuo's order
    by_prompt = {p.prompt: p for p in problems}
    data = prompt_dataset([p.prompt for p in problems], fingerprint=f"bench-{workload}")
    scored: list[int] = []  # completions the reward saw, per call (one call per step)

    def reward(prompts, completions, **_):
        scored.append(len(completions))
        return [s.reward for s in task.score_many([by_prompt[p] for p in prompts], completions)]

    timer = step_timer()
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    cfg = GRPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=COMPLETIONS_PER_STEP,
                     num_generations=G, max_completion_length=max_tokens, beta=0.0, learning_rate=LR,
                     max_steps=steps + 1, temperature=1.0, logging_steps=1, report_to="none", save_strategy="no",
                     use_cpu=True, bf16=False, gradient_accumulation_steps=1, seed=SEED, dataloader_num_workers=0,
                     shuffle_dataset=False, gradient_checkpointing=gradient_checkpointing, disable_tqdm=True,
                     use_transformers_continuous_batching=continuous_batching)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok,
                          callbacks=[timer])
    first_prompts: list[list[int]] = []
    tokenize = trainer._tokenize_prompts

    def spy(prompts):
        out = tokenize(prompts)
        if not first_prompts:
            first_prompts.extend(list(map(int, ids)) for ids in out[0][::G])  # each prompt is repeated G times
        return out

    trainer._tokenize_prompts = spy
    trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h][1:]
    return {"wall": timer.wall[1:], "cpu": timer.cpu[1:], "completion_len": [h["completions/mean_length"] for h in logs],
            "completions": scored[1:], "rows_trained": scored[1:],
            "zero_variance_frac": [h.get("frac_reward_zero_std", 0.0) for h in logs],
            "step0_prompt_ids": first_prompts, "threads": sorted(timer.threads)}


def worker(side: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        kw = dict(gradient_checkpointing=args.trl_gradient_checkpointing)
        if side.startswith("qiusuo"):
            out = run_qiusuo(args.model, args.workload, args.steps, Path(d), args.threads, keep=side.endswith("keep"))
        else:
            out = run_trl(args.model, args.workload, args.steps, Path(d), args.threads,
                          continuous_batching=side.endswith("batching"), **kw)
    use = resource.getrusage(resource.RUSAGE_SELF)
    out["process_cpu_s"] = round(use.ru_utime + use.ru_stime, 2)  # the whole child: imports and load included
    print(RESULT + json.dumps(out), flush=True)


# ---------------------------------------------------------------------- the parent: run all sides, summarise
def spawn(side: str, workload: str, ckpt: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--_worker", side, "--_workload", workload, "--model", ckpt,
           "--steps", str(args.steps), "--threads", str(args.threads)]
    cmd += ["--trl-gradient-checkpointing"] if args.trl_gradient_checkpointing else []
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.side_timeout)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT)]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"the {side} worker failed (exit {proc.returncode}); its output is above")
    r = json.loads(lines[-1][len(RESULT):])
    r["load_before"] = round(load, 2)
    return r


def summarise(runs: list[dict]) -> dict:
    """One side's repeats pooled: per-step medians over every timed step of every repeat."""
    pool = lambda key: [x for r in runs for x in r[key]]  # noqa: E731
    wall, cpu = pool("wall"), pool("cpu")
    out = {"seconds_per_step": round(median(wall), 4), "cpu_seconds_per_step": round(median(cpu), 4),
           "completions_per_s": round(COMPLETIONS_PER_STEP / median(wall), 1),
           "completions_per_cpu_s": round(COMPLETIONS_PER_STEP / median(cpu), 1),
           "completion_len": round(statistics.fmean(pool("completion_len")), 1),
           "completions_per_step": sorted(set(pool("completions"))),
           "rows_trained_per_step": round(statistics.fmean(pool("rows_trained")), 1),
           "zero_variance_frac": round(statistics.fmean(pool("zero_variance_frac")), 3),
           "threads": sorted({t for r in runs for t in r["threads"]}),
           "process_cpu_s": [r["process_cpu_s"] for r in runs], "repeats": len(runs), "steps": len(wall)}
    if "rollout_s" in runs[0]:
        out.update(rollout_s=round(median(pool("rollout_s")), 4), update_s=round(median(pool("update_s")), 4))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory for every workload (default: pretrain a base per workload)")
    ap.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    ap.add_argument("--steps", type=int, default=5, help="timed steps per child process (plus one warm-up)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="child processes per side, in alternating order")
    ap.add_argument("--side-timeout", type=float, default=1800, help="seconds one child may take")
    ap.add_argument("--trl-gradient-checkpointing", action="store_true",
                    help="leave TRL's default activation recomputation on (extra work qiusuo does not do)")
    ap.add_argument("--_worker", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--_workload", choices=list(WORKLOADS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        args.workload = args._workload
        worker(args._worker, args)
        return
    versions = check_versions()
    run = Run("grpo", threads=args.threads, args={k: v for k, v in vars(args).items() if not k.startswith("_")})
    rows, ratio_rows = [], []
    with tempfile.TemporaryDirectory() as d:
        for workload in args.workloads:
            ckpt = base_checkpoint(workload, args.model, Path(d), args.threads)
            runs: dict[str, list[dict]] = {s: [] for s in args.sides}
            errors: dict[str, str] = {}
            prompt_ids: dict[str, list[list[int]]] = {}
            for r, side in alternating(list(args.sides), args.repeats):
                if side in errors:
                    continue
                try:
                    res = spawn(side, workload, ckpt, args)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    errors[side] = str(e)[:300]
                    run.add(workload=workload, side=side, repeat=r, error=errors[side])
                    print(f"[{workload}] {side} failed: {errors[side]}", flush=True)
                    continue
                prompt_ids.setdefault(side, res.pop("step0_prompt_ids"))
                first = next(iter(prompt_ids.values()))
                assert prompt_ids[side] == first, (  # fail fast, before the other sides' runs
                    f"[{workload}] step 0's prompt ids differ between sides: {prompt_ids}")
                runs[side].append(res)
                run.add(workload=workload, side=side, repeat=r, **res)
                print(f"[{workload}] repeat {r} {side:<24} median {median(res['wall']):.3f} s/step wall, "
                      f"{median(res['cpu']):.3f} cpu, mean len {statistics.fmean(res['completion_len']):.1f} "
                      f"(load {res['load_before']})", flush=True)
            ids = list(prompt_ids.values())
            assert ids and all(x == ids[0] for x in ids), f"[{workload}] step 0's prompt ids differ between sides: {prompt_ids}"
            summary = {s: summarise(v) for s, v in runs.items() if v}
            for s, v in summary.items():
                if v["completions_per_step"] != [COMPLETIONS_PER_STEP] or v["threads"] != [args.threads]:
                    print(f"WARNING: [{workload}] {s} ran {v['completions_per_step']} completions/step on "
                          f"threads {v['threads']}")
                rows.append([workload, s, v["seconds_per_step"], v["cpu_seconds_per_step"], v["completions_per_s"],
                             v["completions_per_cpu_s"], v["completion_len"], v["rows_trained_per_step"],
                             v["zero_variance_frac"], v["steps"]])
            for s, e in errors.items():
                rows.append([workload, f"{s} (failed: {e[:100]})"] + [None] * 8)
            trl = {s: v for s, v in summary.items() if s.startswith("trl")}
            if trl:
                best = min(trl, key=lambda s: trl[s]["seconds_per_step"])
                for s in ("qiusuo drop", "qiusuo keep"):
                    if s in summary:
                        ratio_rows.append([workload, s, best,
                                           round(trl[best]["seconds_per_step"] / summary[s]["seconds_per_step"], 2),
                                           round(trl[best]["cpu_seconds_per_step"] / summary[s]["cpu_seconds_per_step"], 2)])
            run.add(workload=workload, kind="summary", summary=summary, errors=errors,
                    step0_prompt_ids_equal=True, step0_prompt_ids=ids[0])
            save(run, rows, ratio_rows, args, versions)  # after every workload: a later one that runs out of time keeps this
    for row in rows:
        print(" | ".join(str(x) for x in row))
    for row in ratio_rows:
        print("ratio:", " | ".join(str(x) for x in row))


def save(run: Run, rows: list, ratio_rows: list, args: argparse.Namespace, versions: dict) -> None:
    run.data["tables"] = []
    cols = ["workload", "side", "s/step", "CPU s/step", "compl/s", "compl/CPU-s", "mean len", "rows trained/step",
            "zero-var groups", "timed steps"]
    run.table("GRPO steps: medians over every timed step of every repeat", cols, rows,
              note=f"{COMPLETIONS_PER_STEP} completions/step (G={G}), {args.steps} timed steps per process after a "
                   f"warm-up, {args.repeats} processes per side in alternating order, {args.threads} thread(s); same "
                   f"problems per step on both sides (step 0's prompt ids asserted equal); trl {versions['trl']}, "
                   f"transformers {versions['transformers']}.")
    run.table("qiusuo over the better TRL side (step-time ratio; > 1: qiusuo faster)",
              ["workload", "qiusuo side", "better TRL side", "ratio wall", "ratio CPU"], ratio_rows)
    run.save(summary={"pinned": PINNED, "versions": versions})


if __name__ == "__main__":
    main()
