"""The R1-Zero recipe in miniature (`qiusuo demo`, what `make demo` runs).

pretrain a tiny base on arithmetic (60% blurted guesses, 40% scratchpads of which 30% slip) ->
evaluate on held-out problems -> GRPO with answer-only rewards -> evaluate again on the same
problems -> before/after table, report.json, a PNG of the GRPO curves, the saved model and the
command that serves it. A second held-out set one step harder than training (4-digit operands;
`--transfer-difficulty`) is evaluated before and after with the same budget: does what RL selected
carry beyond the trained length? (It does not, on either scratchpad: "columns" reads digits by absolute
position, and "rewrite" (--scratchpad rewrite, whose reads are local) still copies operand prefixes only as
long as the ones it was trained on; 4-digit problems score 0 before and after: README, Transfer.)

The base's headroom is a property of its data, not of pretraining luck. A blurted trace in the
corpus (`<think></think><answer>N</answer>`) answers with another random problem's answer (the
"guess" style, tasks/base.py), so blurting is right 0.07% of the time in any base, however well it
trains; greedy decoding takes the commoner path (60% blurts), so a base's greedy accuracy is ~0.
Scratchpads are right, bar their 30% slips, and learnable. A base thus samples a scratchpad ~40% of
the time at T=1 and gets it right at most 70% of the time; RL's gain is choosing that path every
time, then sharpening its steps. (An earlier mix blurted *right* answers: a base that happened to learn
3-digit addition in one shot then blurted well, and the gain shrank from +62 to +32 points on
another machine with the same seed.)

On an MoE preset (`--preset tiny-moe`) the report adds `routing` (qiusuo/eval/routing.py): each MoE
layer's max/mean expert load on the greedy held-out completions before and after GRPO, and the share
of tokens whose top-k expert set the RL stage changed, teacher-forced on the same completions.

What RL does here, said plainly: it does not teach arithmetic. GRPO selects the worked-out path
(the empty-think rate falls, completions grow) and then sharpens the steps. The gain is capped by
what pretraining put in.

Countdown (--task countdown, TinyZero's task on 3 numbers from 1-10, target <= 100): the same shape.
60% blurted guesses (a random combination of the given numbers, right ~9% of the time by chance), 40%
searches: 0-3 failed tries, each restarting from the numbers, then the DFS's solution and in a quarter of
them a verify line (qiusuo/tasks/countdown.py). No slips: a slip claims the target after a miss, which
teaches a searcher to stop where it should retry. GRPO selects the search, and the model then retries
more often than its data did; `search_stats` counts retries and verifies before and after.

Threads (--threads 0, the default): each training stage times its first steps at 1 and 2 threads
and keeps the faster, re-checking later (qiusuo.runtime.ThreadTuner); report.json records it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from qiusuo.fields import check_choices

from .config import GRPOConfig, ImportanceSamplingLevel, PretrainConfig

EVAL_SEED = 1234  # the held-out problems: the same before and after RL

# Per-task defaults of the budget fields left unset (None); an explicit flag wins. Arithmetic's are the
# figures the module docstring describes; 900 pretraining steps: on an AVX512 machine 500 left seed 2's
# scratchpads right 24% of the time and its T=1 gain at +25 (700: 66%, +57), and on an AMX Xeon at 2 threads
# 700 left them right 6% (greedy +16, T=1 +6; 900: 65%, +70 / +57). Countdown
# (TinyZero's task, 3 numbers from 1-10, target <= 100): its traces are ~2.5x longer (failed tries, a
# verify line), so it pretrains on fewer, longer rows and gives completions room to retry. It runs 300 GRPO
# steps: from the same three bases, held-out greedy gains (seeds 0/1/2) were +35.6/+11.2/+19.6 at 200 steps,
# +35.4/+18.8/+25.0 at 300 and +40.0/+16.6/+25.8 at 400 (README, Countdown). 300 is where seed 2 clears +20
# and seed 1 stops rising; 400 costs ~130 CPU s more per run (~880 in all) for no gain on seed 1.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "arithmetic": dict(pretrain_steps=900, grpo_steps=70, max_tokens=48, p_slip=0.3, transfer_max_tokens=64),
    "countdown": dict(pretrain_steps=800, grpo_steps=300, max_tokens=128, p_slip=0.0, transfer_max_tokens=192),
}
# The task each demo builds (qiusuo.tasks.get options; template "compact" for all). Countdown's tries stay at 3:
# with up to 6 failed tries (and 160-token completions) GRPO's rollout accuracy for seeds 1 and 2 stayed at
# ~0.10 for 94-109 steps, blurts near 45% (README, Countdown).
TASK_OPTIONS: dict[str, dict[str, Any]] = {
    "arithmetic": {},
    "countdown": dict(operands=3, max_number=10, max_target=100, tries=3, verify=0.25),
}
# Budgets that follow the arithmetic scratchpad (--scratchpad) when left unset: "rewrite" traces are ~2x
# longer (the longest right or slipped 3-digit trace is 58 tokens, 4-digit 83; columns: 32 and 42).
SCRATCHPAD_DEFAULTS: dict[str, dict[str, Any]] = {
    "columns": {}, "rewrite": dict(max_tokens=80, transfer_max_tokens=112),
}


@dataclass
class DemoConfig:
    out: str = field(default="runs/demo", metadata={"help": "directory for the runs, report.json and the plot"})
    seed: int = field(default=0, metadata={"help": "seed of pretraining and RL (the held-out set is fixed)"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: measured: each stage times its first "
                                                       "steps at 1 and 2 threads and keeps the faster)"})
    preset: str = field(default="tiny-dense", metadata={"help": "model preset of the base"})
    task: Literal["arithmetic", "countdown"] = field(default="arithmetic", metadata={
        "help": "arithmetic (3-digit addition) or countdown (TinyZero's task: 3 numbers from 1-10, + - * /, a "
                "target <= 100; its worked solutions write failed tries before the DFS's solution)"})
    scratchpad: Literal["columns", "rewrite"] = field(default="columns", metadata={
        "help": "arithmetic's worked solutions: columns (one equation per column, digits read by position in the "
                "prompt) or rewrite (each column also rewrites what is left of the problem, so every read is local; "
                "its copies of the operands still grow with them: README, Transfer; tasks/arithmetic.py)"})
    pretrain_steps: int | None = field(default=None, metadata={
        "help": "pretraining steps (default: arithmetic 900, ~0.2-0.5 s each at 1 thread; countdown 800)"})
    pretrain_batch: int = field(default=68, metadata={"help": "pretraining sequences per step"})
    blurt_rows: float | None = field(default=0.25, metadata={
        "help": "share of pretraining rows drawn as blurts, importance-weighted to keep the 60% blurt objective "
                "(pretrain --blurt-rows; 68 rows at 0.25 hold the 51 scratchpads of 128 unweighted rows)"})
    grpo_steps: int | None = field(default=None, metadata={"help": "GRPO steps (default: arithmetic 70, countdown 300)"})
    max_tokens: int | None = field(default=None, metadata={
        "help": "most new tokens per completion, in GRPO and both evaluations (default: arithmetic 48, 80 with "
                "--scratchpad rewrite; countdown 128)"})
    p_slip: float | None = field(default=None, metadata={
        "help": "share of worked solutions with a slip (pretrain --p-slip; default: arithmetic 0.3, countdown 0: "
                "a slip claims the target after a miss, which teaches a searcher to stop where it should retry)"})
    prompts_per_step: int = field(default=16, metadata={"help": "GRPO prompts per step"})
    group_size: int = field(default=8, metadata={"help": "GRPO samples per prompt"})
    grpo_lr: float = field(default=1e-4, metadata={"help": "GRPO learning rate (5e-4 collapsed in the prototype)"})
    importance_sampling_level: ImportanceSamplingLevel = field(default="token", metadata={
        "help": "GRPO importance ratio per token, or per sequence (GSPO); the two differ only off-policy, "
                "i.e. with --minibatches > 1"})
    minibatches: int = field(default=1, metadata={
        "help": "GRPO optimizer steps per batch of rollouts (> 1: every minibatch after the first is off-policy)"})
    eval_problems: int = field(default=500, metadata={"help": "held-out problems evaluated before and after"})
    eval_samples: int = field(default=2, metadata={"help": "T=1 samples per held-out problem for pass@1"})
    difficulty: str = field(default="", metadata={
        "help": "pretraining corpus difficulty levels, comma-separated (pretrain --difficulty; e.g. 1,2,3 mixes "
                "operand lengths); empty: the task's default. GRPO and the held-out set stay at the task's default"})
    transfer_difficulty: int = field(default=4, metadata={
        "help": "difficulty of a second held-out set, one step harder than training (4-digit operands for the "
                "3-digit arithmetic demo, 4 numbers for the 3-number countdown demo), evaluated before and after "
                "RL to measure transfer; 0: off"})
    transfer_problems: int = field(default=300, metadata={"help": "problems in the harder held-out set"})
    transfer_max_tokens: int | None = field(default=None, metadata={
        "help": "most new tokens per completion on the harder set (default: arithmetic 64, 112 with --scratchpad "
                "rewrite; countdown 192: its solutions are longer)"})
    quick: bool = field(default=False, metadata={"help": "a few steps of each stage (CI smoke run, no real gain)"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self):
        if self.task not in TASK_DEFAULTS:
            raise ValueError(f"--task must be one of {', '.join(TASK_DEFAULTS)}, got {self.task!r}")
        if self.scratchpad != "columns" and self.task != "arithmetic":
            raise ValueError(f"--scratchpad {self.scratchpad} is an arithmetic format; --task {self.task} has its own")
        for name, value in {**TASK_DEFAULTS[self.task], **SCRATCHPAD_DEFAULTS.get(self.scratchpad, {})}.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.quick:
            self.pretrain_steps, self.pretrain_batch, self.grpo_steps = 12, 16, 3
            self.prompts_per_step, self.group_size, self.eval_problems = 4, 4, 24
        if self.quick:
            self.transfer_problems = min(self.transfer_problems, 24)
        check_choices(self)
        for name in ("pretrain_steps", "pretrain_batch", "grpo_steps", "prompts_per_step", "eval_problems",
                     "eval_samples", "max_tokens", "minibatches", "transfer_problems", "transfer_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.p_slip <= 1:
            raise ValueError(f"--p-slip must be in [0, 1], got {self.p_slip}")
        if self.prompts_per_step % self.minibatches:  # checked here, not after pretraining in GRPOConfig
            raise ValueError(f"--prompts-per-step {self.prompts_per_step} is not divisible by --minibatches "
                             f"{self.minibatches}; minibatches hold whole groups, so pick a divisor")
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0 (0: measured), got {self.threads}")
        if self.transfer_difficulty < 0:
            raise ValueError(f"--transfer-difficulty must be >= 0 (0: off), got {self.transfer_difficulty}")
        PretrainConfig(difficulty=self.difficulty).difficulty_levels()  # a malformed list fails here, not later


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from qiusuo.train.grpo import GRPO
    from qiusuo.eval.routing import greedy_rows, routing_report
    from qiusuo.eval.served import evaluate_served
    from qiusuo.model import load_model
    from qiusuo.train.evaluate import evaluate
    from qiusuo.train.pretrain import Pretrain

    out = Path(cfg.out)
    for sub in ("pretrain", "grpo"):  # the demo owns these: a re-run starts afresh
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = "measured (1 vs 2 on the first steps)" if cfg.threads == 0 else f"{cfg.threads} (fixed)"
    print(f"qiusuo demo: seed {cfg.seed}, torch threads {threads}, load average {load:.1f}, device {cfg.device}")
    wall0, cpu0 = time.perf_counter(), time.process_time()
    common = dict(seed=cfg.seed, device=cfg.device, threads=cfg.threads, progress=cfg.progress)
    task = demo_task(cfg)
    trace_stats = getattr(task, "search_stats", None)  # Countdown's retry / verify counter

    pre_cfg = pretrain_config(cfg, out / "pretrain")
    print(f"[1/4] pretraining {cfg.preset} on {cfg.task}: {cfg.pretrain_steps} steps x {cfg.pretrain_batch} "
          f"({pre_cfg.p_direct:.0%} blurted guesses, right only by chance; {1 - pre_cfg.p_direct:.0%} scratchpads, "
          f"{pre_cfg.p_slip:.0%} of them with a slip)")
    if pre_cfg.blurt_rows is not None:
        print(f"      blurts drawn as {pre_cfg.blurt_rows:.0%} of the rows, each weighted {pre_cfg.blurt_weight():.2f} "
              f"so that the loss keeps the {pre_cfg.p_direct:.0%} mix")
    t = time.perf_counter()
    pretrain = Pretrain(pre_cfg, task=task)
    pretrain.run()
    pretrain_s = time.perf_counter() - t
    thread_choice = {"mode": "measured" if cfg.threads == 0 else "fixed", "load_average_at_start": round(load, 2),
                     "pretrain": thread_summary(pretrain.trainer, pre_cfg.threads)}
    print(f"      threads: {describe_threads(thread_choice['pretrain'])}")
    del pretrain

    curves: list[dict[str, Any]] = []
    grpo_cfg = GRPOConfig(model=str(out / "pretrain" / "final"), out=str(out / "grpo"), steps=cfg.grpo_steps,
                          prompts_per_step=cfg.prompts_per_step, group_size=cfg.group_size, lr=cfg.grpo_lr,
                          importance_sampling_level=cfg.importance_sampling_level, minibatches=cfg.minibatches,
                          task=cfg.task, max_tokens=cfg.max_tokens, **common)
    grpo = GRPO(grpo_cfg, task=task, on_step=lambda step, m: curves.append({"step": step + 1, **m}))
    problems = grpo.task.generate(cfg.eval_problems, seed=EVAL_SEED, split="test")
    harder = transfer_problems(grpo.task, cfg)
    print(f"[2/4] evaluating the base on {len(problems)} held-out problems"
          + (f" and {len(harder)} harder ones (difficulty {cfg.transfer_difficulty}, not trained on)" if harder else ""))
    before = evaluate(grpo.llm, grpo.task, problems, samples=cfg.eval_samples, seed=EVAL_SEED,
                      max_tokens=cfg.max_tokens, trace_stats=trace_stats)
    transfer = {"difficulty": cfg.transfer_difficulty, "problems": len(harder),
                "max_tokens": cfg.transfer_max_tokens} if harder else None
    if transfer:
        transfer["before"] = evaluate(grpo.llm, grpo.task, harder, samples=cfg.eval_samples, seed=EVAL_SEED,
                                      max_tokens=cfg.transfer_max_tokens, trace_stats=trace_stats)
    base_rows = greedy_rows(grpo.llm, grpo.task, problems) if grpo.model.moe_layers() else None  # MoE: routing
    print(f"[3/4] GRPO: {cfg.grpo_steps} steps x {cfg.prompts_per_step} prompts x G={cfg.group_size}, T=1, "
          f"lr {cfg.grpo_lr:g}, beta 0, reward 1 if right else 0.1 if well-formed"
          + (f", {cfg.minibatches} minibatches, {cfg.importance_sampling_level}-level ratios"
             if cfg.minibatches > 1 or cfg.importance_sampling_level != "token" else ""))
    t = time.perf_counter()
    grpo.run()
    grpo_s = time.perf_counter() - t
    thread_choice["grpo"] = thread_summary(grpo.trainer, grpo_cfg.threads)
    print(f"      threads: {describe_threads(thread_choice['grpo'])}")
    print("[4/4] evaluating the RL model on the same held-out problems")
    after = evaluate(grpo.llm, grpo.task, problems, samples=cfg.eval_samples, seed=EVAL_SEED,
                     max_tokens=cfg.max_tokens, trace_stats=trace_stats)
    if transfer:
        transfer["after"] = evaluate(grpo.llm, grpo.task, harder, samples=cfg.eval_samples, seed=EVAL_SEED,
                                     max_tokens=cfg.transfer_max_tokens, trace_stats=trace_stats)
        transfer["gain_points"] = {k: round(100 * (transfer["after"][k] - transfer["before"][k]), 2)
                                   for k in ("accuracy", "pass1")}
    model_dir = out / "grpo" / "final"
    routing = None if base_rows is None else routing_report(
        load_model(out / "pretrain" / "final", device=cfg.device)[0], grpo.model, base_rows,
        greedy_rows(grpo.llm, grpo.task, problems))
    print("      and through the chat API of a real server (/v1/chat/completions, greedy), as a client would")
    served = evaluate_served(model_dir, grpo.task, problems, route="chat", max_tokens=cfg.max_tokens,
                             engine_process=False,
                             num_threads=thread_choice["grpo"]["threads"])

    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    gain = 100 * (after["accuracy"] - before["accuracy"])
    report = {
        "task": cfg.task, "task_options": task_options(cfg), "seed": cfg.seed, "threads": thread_choice["pretrain"]["threads"], "thread_choice": thread_choice,
        "before": before, "after": after, "after_chat_api": served,
        "gain_points": {"accuracy": round(gain, 2), "pass1": round(100 * (after["pass1"] - before["pass1"]), 2)},
        "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
        "cpu_seconds_per_point": round(cpu / gain, 2) if gain > 0 else None,
        "peak_rss_mb": peak_rss_mb(), "pretrain_seconds": round(pretrain_s, 1), "grpo_seconds": round(grpo_s, 1),
        "transfer": transfer,
        "decides_to_think_step": think_step(curves), "routing": routing,
        "model": str(model_dir), "config": asdict(cfg), "curves": curves,
    }
    report["registered"] = register_model(model_dir, report)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    report["plot"] = plot_curves(curves, out / "grpo_curves.png", before, after, task=cfg.task)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print_summary(report)
    return report


def transfer_problems(task, cfg: DemoConfig) -> list:
    """The harder held-out set: `transfer_problems` test-split problems at `transfer_difficulty` (none when
    off, or when that is a level the pretraining corpus contains: then it would not measure transfer)."""
    if not cfg.transfer_difficulty:
        return []
    trained = PretrainConfig(difficulty=cfg.difficulty).difficulty_levels() or [task.default_difficulty]
    if cfg.transfer_difficulty in trained:
        raise ValueError(f"--transfer-difficulty {cfg.transfer_difficulty} is a level the pretraining corpus "
                         f"contains ({','.join(map(str, trained))}): it would not measure transfer")
    return task.generate(cfg.transfer_problems, seed=EVAL_SEED, split="test", difficulty=cfg.transfer_difficulty)


def pretrain_config(cfg: DemoConfig, out: Path) -> PretrainConfig:
    """The demo's pretraining stage: its budget, mix and seed, written to `out`."""
    return PretrainConfig(out=str(out), preset=cfg.preset, task=cfg.task, steps=cfg.pretrain_steps,
                          batch_size=cfg.pretrain_batch, blurt_rows=cfg.blurt_rows, difficulty=cfg.difficulty,
                          p_slip=cfg.p_slip, warmup_steps=min(50, max(0, cfg.pretrain_steps // 10)), seed=cfg.seed,
                          device=cfg.device, threads=cfg.threads, progress=cfg.progress)


def demo_task(cfg: DemoConfig):
    """The task the demo pretrains and trains on: `cfg.task` with its TASK_OPTIONS, compact prompts."""
    from qiusuo.tasks import get

    return get(cfg.task, template="compact", **task_options(cfg))


def task_options(cfg: DemoConfig) -> dict[str, Any]:
    """TASK_OPTIONS of `cfg.task`, plus the arithmetic scratchpad when it is not the default."""
    return {**TASK_OPTIONS[cfg.task], **({"scratchpad": cfg.scratchpad} if cfg.scratchpad != "columns" else {})}


def thread_summary(trainer, configured: int) -> dict[str, Any]:
    """How a stage chose its threads: the tuner's summary, or the fixed count; and the steps run at each."""
    import json as _json

    path = trainer.run / "metrics.jsonl"
    steps: dict[str, int] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                n = str(_json.loads(line).get("threads", configured))
                steps[n] = steps.get(n, 0) + 1
    tuner = trainer.thread_tuner
    out = tuner.summary() if tuner is not None else {"threads": configured}
    out["steps_at"] = steps
    return out


def describe_threads(summary: dict[str, Any]) -> str:
    """One line: '2 (measured: 1 -> 0.160 ms/token, 2 -> 0.094 ms/token; 1 re-check(s), 0 switch(es))'."""
    if "candidates" not in summary:
        return f"{summary['threads']} (fixed by --threads)"
    if len(summary["candidates"]) == 1:
        return f"{summary['threads']} (the only core)"
    first = summary.get("first_measurement")
    how = "measured" if summary.get("measured_first") else "kept from the previous stage, re-checked"
    timings = ", ".join(f"{n} -> {1e3 * v:.3f} ms/token" for n, v in first.items()) if first else "no steps timed"
    return f"{summary['threads']} ({how}: {timings}; {summary['rechecks']} re-check(s), {summary['switches']} switch(es))"


def peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def think_step(curves: list[dict[str, Any]], threshold: float = 0.1) -> int | None:
    """First GRPO step whose rollouts open with an empty think block less than 10% of the time,
    after blurting more often than that (None when the policy never blurted, or never stopped)."""
    rates = [c.get("empty_think_rate", 0.0) for c in curves]
    if not rates or rates[0] < threshold:
        return None
    return next((c["step"] for c, r in zip(curves, rates) if r < threshold), None)


def register_model(path: Path, report: dict[str, Any]) -> str | None:
    """Import the model into the local registry (QIUSUO_HOME) as qiusuo-demo:seedN, if it is available."""
    try:
        from qiusuo.registry import Registry
    except ImportError:
        print("(qiusuo.registry is not available: the model is saved but not registered)")
        return None
    task = report.get("task", "arithmetic")
    name = f"qiusuo-demo{'' if task == 'arithmetic' else '-' + task}:seed{report['seed']}"
    try:
        Registry().import_dir(path, name, source_run=str(path.parent), eval_score=report["after"]["accuracy"],
                              metadata={"demo": {k: report[k] for k in ("before", "after", "seed")}})
    except (ValueError, OSError) as e:
        print(f"(could not register the model: {e})")
        return None
    return name


def plot_curves(curves: list[dict[str, Any]], path: Path, before: dict, after: dict,
                task: str = "arithmetic") -> str | None:
    """Reward, batch accuracy, completion length and empty-think rate over GRPO steps."""
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [c["step"] for c in curves]
    panels = [("reward_mean", "reward (batch mean)"), ("accuracy", "accuracy (rollouts)"),
              ("completion_len", "completion length (tokens)"), ("empty_think_rate", "empty <think></think> rate")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    decided = think_step(curves)
    for ax, (key, title) in zip(axes.flat, panels):
        ax.plot(steps, [c.get(key, 0) for c in curves], lw=1.4)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if decided is not None:
            ax.axvline(decided, color="tab:red", ls="--", lw=0.8)
    axes[1, 1].annotate("the model decides to think" if decided else "", xy=(decided or 0, 0.1), fontsize=8,
                        color="tab:red")
    for ax in axes[1]:
        ax.set_xlabel("GRPO step")
    fig.suptitle(f"GRPO on {task}: held-out greedy accuracy {before['accuracy']:.0%} -> {after['accuracy']:.0%}, "
                 f"T=1 pass@1 {before['pass1']:.0%} -> {after['pass1']:.0%}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def print_summary(report: dict[str, Any]) -> None:
    b, a = report["before"], report["after"]
    rows = [("held-out greedy accuracy (as trained)", f"{b['accuracy']:.1%}", f"{a['accuracy']:.1%}"),
            ("held-out T=1 pass@1", f"{b['pass1']:.1%}", f"{a['pass1']:.1%}"),
            ("format rate (T=1)", f"{b['format_rate']:.1%}", f"{a['format_rate']:.1%}"),
            ("completion length (T=1, tokens)", f"{b['length']:.1f}", f"{a['length']:.1f}"),
            ("empty-think rate (T=1)", f"{b['empty_think_rate']:.1%}", f"{a['empty_think_rate']:.1%}"),
            ("accuracy when blurting / working (T=1)",
             f"{b['direct_accuracy']:.0%} / {b['scratchpad_accuracy']:.0%}",
             f"{a['direct_accuracy']:.0%} / {a['scratchpad_accuracy']:.0%}")]
    if "retry_rate" in b:  # the task counts its search (Countdown: qiusuo.tasks.countdown.search_stats)
        rows += [("completions that retry (T=1 / greedy)", f"{b['retry_rate']:.0%} / {b['greedy_retry_rate']:.0%}",
                  f"{a['retry_rate']:.0%} / {a['greedy_retry_rate']:.0%}"),
                 ("retries per completion (T=1)", f"{b['retries']:.2f}", f"{a['retries']:.2f}"),
                 ("completions that verify (T=1 / greedy)", f"{b['verify_rate']:.0%} / {b['greedy_verify_rate']:.0%}",
                  f"{a['verify_rate']:.0%} / {a['greedy_verify_rate']:.0%}")]
    served = report.get("after_chat_api")
    if served is not None:
        rows.insert(1, ("  same, through /v1/chat/completions", "", f"{served['accuracy']:.1%}"))
    t = report.get("transfer")
    if t:
        tb, ta = t["before"], t["after"]
        rows += [(f"harder set (difficulty {t['difficulty']}, not trained on): greedy", f"{tb['accuracy']:.1%}",
                  f"{ta['accuracy']:.1%}"),
                 ("  T=1 pass@1", f"{tb['pass1']:.1%}", f"{ta['pass1']:.1%}"),
                 ("  empty-think rate (T=1)", f"{tb['empty_think_rate']:.1%}", f"{ta['empty_think_rate']:.1%}"),
                 ("  accuracy when working (T=1)", f"{tb['scratchpad_accuracy']:.0%}",
                  f"{ta['scratchpad_accuracy']:.0%}")]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':{width}}  {'before RL':>12}  {'after RL':>12}")
    for name, x, y in rows:
        print(f"{name:{width}}  {x:>12}  {y:>12}")
    per_point = report["cpu_seconds_per_point"]
    choice = report["thread_choice"]
    print(f"\nwall time {report['wall_seconds']:.0f}s (pretrain {report['pretrain_seconds']:.0f}s, "
          f"GRPO {report['grpo_seconds']:.0f}s), CPU time {report['cpu_seconds']:.0f}s, "
          f"peak RSS {report['peak_rss_mb']} MB, "
          f"CPU-seconds per accuracy point gained: {per_point if per_point is not None else 'n/a (no gain)'}")
    print(f"torch threads: pretraining {describe_threads(choice['pretrain'])}; "
          f"GRPO {describe_threads(choice['grpo'])}")
    if report.get("routing"):
        from qiusuo.eval.routing import describe_routing

        print(describe_routing(report["routing"]))
    step = report["decides_to_think_step"]
    if report["config"]["quick"]:
        print("\n(--quick: a smoke run with a few steps per stage; run without it for the real recipe)")
    elif report.get("task", "arithmetic") != "arithmetic":
        print(f"\nWhat RL did: the base blurted a guess {b['empty_think_rate']:.0%} of the time at T=1 (a random "
              f"combination of the numbers, right {b['direct_accuracy']:.0%} of the time) and searched otherwise; "
              f"GRPO rewarded only right answers ({a['empty_think_rate']:.0%} blurts after"
              + (f", below 10% from step {step}" if step else "") + ").")
    else:
        print("\nWhat RL did: it did not teach arithmetic. The base blurted an answer "
              f"{b['empty_think_rate']:.0%} of the time at T=1 ({b.get('greedy_empty_think_rate', 0):.0%} of its greedy "
              "answers) and worked it out otherwise; its "
              "blurts are guesses, as in its pretraining data, so they are right only by chance. GRPO rewarded "
              f"only right answers and so selected the worked-out path ({a['empty_think_rate']:.0%} blurts after"
              + (f", below 10% from step {step}" if step else "") + "), then sharpened the steps.")
    print(f"\nmodel: {report['model']}" + (f" (registered as {report['registered']})" if report["registered"] else ""))
    print(f"serve it: qiusuo serve --model {report['registered'] or report['model']}")


__all__ = ["DemoConfig", "run_demo"]
