"""Benchmark: GRPO on a real model shape in bounded memory (issue 18 part 3), LoRA beside full fine-tuning.

The model is Qwen2.5-0.5B's shape from its config.json values (hidden 896, 24 layers, 14 query / 2 KV
heads, intermediate 4,864, vocabulary 151,936, tied embeddings; 494 M parameters, fp32), with random
weights: nothing is downloaded. A random policy over 151,936 tokens almost never samples eos, so every
completion runs to --max-tokens: the worst case for memory and time at that length. The prompts are the
built-in tokenizer's; the reward is a fixed hash of the completion text (rewards vary within a group,
and every group is kept, --no-filter-zero-variance, so each step updates on all P x G rows).

Configurations, each in its own child process (its peak RSS is its own: ru_maxrss, load included):
- `lora`: --lora-rank 16 --lora-alpha 32 on all linear layers, --gradient-checkpointing, chunked log-probs
  (always on); rollouts with the adapters merged into the base, the update through the LoRA layers;
- `full`: full fine-tuning (AdamW over every parameter), the same gradient checkpointing and chunking;
  in both, qiusuo's rollout engine keeps its default KV-cache pool (room for 256 full contexts, capped at
  1 GiB, allocated zeroed at start);
- `trl`: TRL's GRPOTrainer + PEFT LoRA on the same checkpoint, loaded by transformers
  (AutoModelForCausalLM, fp32): r = 16, alpha = 32, target_modules="all-linear" (the same seven
  projections per layer, the same 8,798,208 trainable parameters), gradient checkpointing (TRL's default),
  use_cpu, bf16 off (on with --precision bf16, TRL's own default), per-device batch 16 = 2 prompts x
  num_generations 8, max_completion_length, the
  same prompts in qiusuo's order (shuffle_dataset=False) and the same hash reward; generation with
  transformers' `generate` (padded static batch), TRL's default without vLLM;
- `trl-cb`: the same with use_transformers_continuous_batching=True (transformers' paged continuous
  batching, TRL's other vLLM-free generation path), its cache sized to the batch (num_blocks; on CPU its
  default is half the machine's free RAM, zero-filled); the faster TRL configuration is the ratios' peer.
TRL's vLLM paths are not used: vLLM's x86 CPU wheels are on its GitHub releases, not on PyPI (whose
wheel targets CUDA), this machine reaches PyPI only, and they pin their own torch build (bench/grpo.py).
TRL's split: rollout = its `_generate_and_score_completions` (generation, reward, advantages; no
log-prob pass, as beta = 0 and one optimizer step per generation), generate = its
`_generate_single_turn` alone, update = the rest of the optimizer step (on_step_begin .. on_step_end).
qiusuo's rollout is RolloutBuilder (sampling, reward, advantages), generate its sampler's seconds.
Settings: G = 8, 2 prompts per step, T = 1, beta = 0, lr 1e-5, one optimizer step per batch, --threads.
Per step: seconds (wall and CPU) split into rollout and update, completions/s, the peak RSS reached by
the end of the rollout and by the end of the update; per child: peak RSS, RSS after loading, CPU seconds.
The first step is timed too (no warm-up: a step is minutes, not milliseconds); medians over the steps.
A second table gives qiusuo over the faster TRL configuration: completions/s (issue 18's target >= 3x)
and peak RSS (target <= 0.7x).

    python bench/grpo_real.py [--configs lora full trl] [--steps 2] [--max-tokens 256] [--threads 1] [--precision bf16]
    python bench/grpo_real.py --layers 2 --max-tokens 8 --steps 1   # a smoke run of the script itself
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import Run, median  # noqa: E402
from trl_side import check_versions, prompt_dataset, spy, step_timer  # noqa: E402

RESULT = "RESULT "  # prefix of a worker's one result line on stdout
G, PROMPTS, LR = 8, 2, 1e-5
CONFIGS = ("lora", "full", "trl", "trl-cb")
# Qwen2.5-0.5B's config.json (the fields that set the shape).
QWEN25_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                  num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                  max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)


class HashRewardTask:
    """Problems `i+i=`; reward: a fixed hash of the completion text in [0, 1) (varies within a group)."""

    name = "hash-reward"

    def generate(self, n, seed, split="train"):
        from qiusuo.tasks.base import Problem

        return [Problem(prompt=f"{(seed + i) % 97}+{(seed + i) % 89}=", question="q", answer="0") for i in range(n)]

    def score_many(self, problems, texts):
        from qiusuo.tasks.base import Score

        out = []
        for t in texts:
            r = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16) / 16**8
            out.append(Score(reward=r, format=0.0, accuracy=0.0, parsed_answer=None))
        return out


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(path: Path, layers: int) -> None:
    """The random-weight checkpoint (in a child process, so no worker counts the builder's memory)."""
    from qiusuo.model import build_model, save_model

    config = path.parent / "config-src.json"
    config.write_text(json.dumps({**QWEN25_05B, "num_hidden_layers": layers}))
    model, tok = build_model(str(config), seed=0, vocab_size=QWEN25_05B["vocab_size"])
    save_model(model, tok, path)


def qiusuo_worker(config: str, args: argparse.Namespace) -> dict:
    from qiusuo.train.config import GRPOConfig
    from qiusuo.train.grpo import GRPO

    with tempfile.TemporaryDirectory() as d:
        cfg = GRPOConfig(model=args.model, out=d, prompts_per_step=PROMPTS, group_size=G, max_tokens=args.max_tokens,
                         steps=args.steps, lr=LR, threads=args.threads, progress=False, filter_zero_variance=False,
                         gradient_checkpointing=True, lora_rank=16 if config == "lora" else 0, lora_alpha=32.0,
                         dtype="bfloat16" if args.precision == "bf16" else "float32")
        grpo = GRPO(cfg, task=HashRewardTask())
        loaded = rss_mb()
        sample, rollout_peak, generate_s = grpo.rollout.sample, [], []

        def sample_and_note_peak(*a):  # which phase sets the peak: the rollout's, or the update's after it
            out = sample(*a)
            rollout_peak.append(round(peak_mb(), 1))
            generate_s.append(out[3])  # (outs, completions, scores, seconds): the sampler's own seconds
            return out

        grpo.rollout.sample = sample_and_note_peak
        trainable = sum(p.numel() for g in grpo.trainer.optimizer.param_groups for p in g["params"])
        steps = []
        for step in range(args.steps):
            grpo.model.train()
            t0, c0 = time.perf_counter(), time.process_time()
            m = grpo.train_step(step)
            steps.append({"seconds": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - c0, 2),
                          "generate_s": round(generate_s[-1], 4), "rollout_s": m["rollout_time"],
                          "update_s": m["update_time"], "completion_len": m["completion_len"],
                          "rss_mb": round(rss_mb(), 1), "peak_rss_after_rollout_mb": rollout_peak[-1],
                          "peak_rss_after_update_mb": round(peak_mb(), 1), "loss": m["loss"]})
    return {"steps": steps, "rss_after_load_mb": round(loaded, 1), "trainable_params": trainable,
            "precision": str(grpo.trainer.amp_dtype or "float32")}


def trl_worker(config: str, args: argparse.Namespace) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from qiusuo.train.data import step_seed

    task = HashRewardTask()
    # qiusuo's prompts (RolloutBuilder.problems at seed 0, round 0), step after step, read in order
    problems = [p for s in range(args.steps) for p in task.generate(PROMPTS, seed=step_seed(0, s, 0))]

    def reward(prompts, completions, **_):
        return [s.reward for s in task.score_many(prompts, completions)]  # the hash reads the text alone

    marks: list[tuple[float, float]] = []  # (RSS, peak RSS) at each step's end
    timer = step_timer(on_step_end=lambda: marks.append((round(rss_mb(), 1), round(peak_mb(), 1))))
    # trl-cb's paged cache sized to the batch (16 rows of prompt + completion, 256-token pages): left to
    # itself it takes max_memory_percent 0.5 of the machine's free RAM on CPU, zero-filled (~10 GB here).
    cb_blocks = PROMPTS * G * -(-(max(len(p.prompt) for p in problems) + 2 + args.max_tokens) // 256)
    with tempfile.TemporaryDirectory() as d:
        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        cfg = GRPOConfig(output_dir=d, per_device_train_batch_size=PROMPTS * G, num_generations=G,
                         max_completion_length=args.max_tokens, temperature=1.0, beta=0.0, learning_rate=LR,
                         max_steps=args.steps, gradient_accumulation_steps=1, gradient_checkpointing=True,
                         use_cpu=True, bf16=args.precision == "bf16", seed=0, shuffle_dataset=False, dataloader_num_workers=0,
                         logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
                         use_transformers_continuous_batching=config == "trl-cb",
                         transformers_continuous_batching_config={"num_blocks": cb_blocks} if config == "trl-cb" else None)
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, processing_class=tok, peft_config=lora,
                              train_dataset=prompt_dataset([p.prompt for p in problems], "grpo-real"), callbacks=[timer])
        loaded = rss_mb()
        rollout: list[tuple[float, float]] = []  # (seconds, peak RSS after it) per step
        generate: list[float] = []
        spy(trainer, "_generate_and_score_completions", lambda sec, _: rollout.append((sec, round(peak_mb(), 1))))
        spy(trainer, "_generate_single_turn", lambda sec, _: generate.append(sec))
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        torch.set_num_threads(args.threads)  # after the trainer is built: accelerate may set threads of its own
        trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    assert len(timer.wall) == len(rollout) == len(generate) == len(logs) == args.steps, \
        (len(timer.wall), len(rollout), len(generate), len(logs))
    assert timer.threads == {args.threads}, timer.threads
    steps = [{"seconds": round(wall, 2), "cpu_s": round(cpu, 2), "generate_s": round(gen, 4), "rollout_s": round(r, 4),
              "update_s": round(wall - r, 4), "completion_len": log["completions/mean_length"], "rss_mb": rss,
              "peak_rss_after_rollout_mb": r_peak, "peak_rss_after_update_mb": peak, "loss": log.get("loss")}
             for wall, cpu, gen, (r, r_peak), (rss, peak), log
             in zip(timer.wall, timer.cpu, generate, rollout, marks, logs)]
    return {"steps": steps, "rss_after_load_mb": round(loaded, 1), "trainable_params": trainable,
            "precision": trainer.accelerator.mixed_precision}  # accelerate's: "no" or "bf16"


def worker(config: str, args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    out = (trl_worker if config.startswith("trl") else qiusuo_worker)(config, args)
    use = resource.getrusage(resource.RUSAGE_SELF)
    print(RESULT + json.dumps({"config": config, **out, "peak_rss_mb": round(peak_mb(), 1),
                               "process_cpu_s": round(use.ru_utime + use.ru_stime, 1)}), flush=True)


def spawn(config: str, ckpt: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--_worker", config, "--model", str(ckpt), "--steps", str(args.steps),
           "--max-tokens", str(args.max_tokens), "--threads", str(args.threads), "--precision", args.precision]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT)]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"the {config} worker failed (exit {proc.returncode}); its output is above")
    r = json.loads(lines[-1][len(RESULT):])
    r["load_before"] = round(load, 2)
    r["load_after"] = round(os.getloadavg()[0], 2)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["lora", "full", "trl"], choices=CONFIGS)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=QWEN25_05B["num_hidden_layers"],
                    help="decoder layers (24: the real shape; fewer only to smoke-test the script)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: mixed precision on both sides: qiusuo --dtype bfloat16 (autocast in the update; "
                         "rollouts stay fp32 on the live weights), TRL bf16=True (its default; accelerate's autocast "
                         "around every forward, generation included)")
    ap.add_argument("--timeout", type=int, default=3 * 3600, help="seconds per configuration")
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_build", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._build:
        return build(Path(args._build), args.layers)
    if args._worker:
        return worker(args._worker, args)
    versions = check_versions() if any(c.startswith("trl") for c in args.configs) else {}
    run = Run("grpo_real", threads=args.threads, args={k: v for k, v in vars(args).items() if not k.startswith("_")})
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d) / "qwen2.5-0.5b-shape"
        subprocess.run([sys.executable, __file__, "--_build", str(ckpt), "--layers", str(args.layers)], check=True)
        for config in args.configs:
            r = results[config] = run.add(**spawn(config, ckpt, args))
            r["completions_per_s"] = round(PROMPTS * G / median([s["seconds"] for s in r["steps"]]), 4)
            save(run, results, args, versions)  # after every configuration: one that runs out of time keeps the rest


def save(run: Run, results: dict[str, dict], args: argparse.Namespace, versions: dict) -> None:
    """The tables of the configurations measured so far, and the ratios of qiusuo's over the faster TRL one."""
    rows, ratios = [], []
    for config, r in results.items():
        med = lambda key: median([s[key] for s in r["steps"]])  # noqa: E731
        rows.append([config, r["trainable_params"], round(r["peak_rss_mb"] / 1024, 2),
                     round(r["rss_after_load_mb"] / 1024, 2), round(med("generate_s"), 1), round(med("rollout_s"), 1),
                     round(med("update_s"), 1), round(med("seconds"), 1), round(med("cpu_s"), 1),
                     r["completions_per_s"], round(med("completion_len"), 1), r["load_before"]])
    trl = [c for c in results if c.startswith("trl")]
    if trl:
        peer = max(trl, key=lambda c: results[c]["completions_per_s"])
        cpu = {c: median([s["cpu_s"] for s in r["steps"]]) for c, r in results.items()}
        for c in (c for c in results if not c.startswith("trl")):
            ratios.append([c, peer, round(results[c]["completions_per_s"] / results[peer]["completions_per_s"], 2),
                           round(cpu[peer] / cpu[c], 2),
                           round(results[c]["peak_rss_mb"] / results[peer]["peak_rss_mb"], 2)])
    print("\n".join(json.dumps(x) for x in rows + ratios), flush=True)
    shape = "Qwen2.5-0.5B shape" if args.layers == QWEN25_05B["num_hidden_layers"] else f"{args.layers}-layer smoke"
    pinned = f"; trl {versions['trl']}, transformers {versions['transformers']}" if versions else ""
    run.data["tables"] = []
    run.table(f"GRPO on a {shape}, G={G}, {PROMPTS} prompts/step, completions {args.max_tokens} tokens, "
              f"{args.threads} thread(s), {'bf16 mixed precision' if args.precision == 'bf16' else 'fp32'}",
              ["config", "trainable params", "peak RSS GiB", "RSS after load GiB", "generate s/step", "rollout s/step",
               "update s/step", "s/step", "CPU s/step", "completions/s", "mean len", "load avg"], rows,
              note="each configuration in its own process, one after another; medians over the steps (the first "
                   "step included); rollout = generation + reward + advantages, update = the rest of the step; "
                   "random weights, so every completion runs to the token limit" + pinned)
    if ratios:
        run.table("qiusuo over the faster TRL configuration, same run (issue 18 targets: completions/s >= 3x, "
                  "peak RSS <= 0.7x)",
                  ["qiusuo config", "TRL config", "completions/s ratio", "completions/CPU-s ratio", "peak RSS ratio"],
                  ratios, note="completions/CPU-s: the ratio of CPU seconds per step, which a load average that changes "
                               "between the configurations (each runs minutes after the last) moves less than wall time")
    run.save(summary={"configs": {c: {"trainable_params": r["trainable_params"],
                                      "peak_rss_gib": round(r["peak_rss_mb"] / 1024, 2),
                                      "completions_per_s": r["completions_per_s"]} for c, r in results.items()},
                      "ratios": ratios, "versions": versions})


if __name__ == "__main__":
    main()
