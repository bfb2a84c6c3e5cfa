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
- `full`: full fine-tuning (AdamW over every parameter), the same gradient checkpointing and chunking.
Settings: G = 8, 2 prompts per step, T = 1, beta = 0, one optimizer step per batch, --threads (default 1).
Per step: seconds split into rollout and update, completions/s, the peak RSS reached by the end of the
rollout and by the end of the update; per child: peak RSS, RSS after loading. The rollout engine keeps
its default KV-cache pool (room for 256 full contexts, capped at 1 GiB, allocated zeroed at start).
The first step is timed too (no warm-up: a step is minutes, not milliseconds); medians over the steps.
TRL GRPOTrainer + PEFT on the same settings is not measured here yet (issue 18 part 3 asks for it).

    python bench/grpo_real.py [--configs lora full] [--steps 2] [--max-tokens 256] [--threads 1]
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

RESULT = "RESULT "  # prefix of a worker's one result line on stdout
G, PROMPTS = 8, 2
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


def worker(config: str, args: argparse.Namespace) -> None:
    import torch

    from qiusuo.train.config import GRPOConfig
    from qiusuo.train.grpo import GRPO

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        cfg = GRPOConfig(model=args.model, out=d, prompts_per_step=PROMPTS, group_size=G, max_tokens=args.max_tokens,
                         steps=args.steps, lr=1e-5, threads=args.threads, progress=False, filter_zero_variance=False,
                         gradient_checkpointing=True, lora_rank=16 if config == "lora" else 0, lora_alpha=32.0)
        grpo = GRPO(cfg, task=HashRewardTask())
        loaded = rss_mb()
        sample, rollout_peak = grpo.rollout.sample, []

        def sample_and_note_peak(*a):  # which phase sets the peak: the rollout's, or the update's after it
            out = sample(*a)
            rollout_peak.append(round(peak_mb(), 1))
            return out

        grpo.rollout.sample = sample_and_note_peak
        trainable = sum(p.numel() for g in grpo.trainer.optimizer.param_groups for p in g["params"])
        steps = []
        for step in range(args.steps):
            grpo.model.train()
            t0 = time.perf_counter()
            m = grpo.train_step(step)
            steps.append({"seconds": round(time.perf_counter() - t0, 2), "rollout_s": m["rollout_time"],
                          "update_s": m["update_time"], "completion_len": m["completion_len"],
                          "rss_mb": round(rss_mb(), 1), "peak_rss_after_rollout_mb": rollout_peak[-1],
                          "peak_rss_after_update_mb": round(peak_mb(), 1), "loss": m["loss"]})
    print(RESULT + json.dumps({"config": config, "steps": steps, "peak_rss_mb": round(peak_mb(), 1),
                               "rss_after_load_mb": round(loaded, 1), "trainable_params": trainable}), flush=True)


def spawn(config: str, ckpt: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--_worker", config, "--model", str(ckpt), "--steps", str(args.steps),
           "--max-tokens", str(args.max_tokens), "--threads", str(args.threads)]
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
    ap.add_argument("--configs", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=QWEN25_05B["num_hidden_layers"],
                    help="decoder layers (24: the real shape; fewer only to smoke-test the script)")
    ap.add_argument("--timeout", type=int, default=3 * 3600, help="seconds per configuration")
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_build", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._build:
        return build(Path(args._build), args.layers)
    if args._worker:
        return worker(args._worker, args)
    run = Run("grpo_real", threads=args.threads, args=vars(args))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d) / "qwen2.5-0.5b-shape"
        subprocess.run([sys.executable, __file__, "--_build", str(ckpt), "--layers", str(args.layers)], check=True)
        for config in args.configs:
            r = run.add(**spawn(config, ckpt, args))
            sec = median([s["seconds"] for s in r["steps"]])
            rows.append([config, r["trainable_params"], round(r["peak_rss_mb"] / 1024, 2),
                         round(r["rss_after_load_mb"] / 1024, 2), round(median([s["rollout_s"] for s in r["steps"]]), 1),
                         round(median([s["update_s"] for s in r["steps"]]), 1), round(sec, 1),
                         round(PROMPTS * G / sec, 3), r["load_before"]])
            print(json.dumps(rows[-1]), flush=True)
    shape = "Qwen2.5-0.5B shape" if args.layers == QWEN25_05B["num_hidden_layers"] else f"{args.layers}-layer smoke"
    run.table(f"GRPO on a {shape}, G={G}, {PROMPTS} prompts/step, completions {args.max_tokens} tokens, "
              f"{args.threads} thread(s)",
              ["config", "trainable params", "peak RSS GiB", "RSS after load GiB", "rollout s/step", "update s/step",
               "s/step", "completions/s", "load avg"], rows,
              note="each configuration in its own process; medians over the steps; random weights, so every "
                   "completion runs to the token limit")
    run.save(summary={r[0]: dict(zip(["trainable_params", "peak_rss_gib"], r[1:3])) for r in rows})


if __name__ == "__main__":
    main()
