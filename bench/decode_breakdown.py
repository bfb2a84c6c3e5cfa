"""Where one single-stream decode step's time goes, per weight precision, measured in one process.

    python bench/decode_breakdown.py [--shape smollm2-135m] [--variants fp32 int8 int4] [--threads 1]

The engine's own step (`LLMEngine.step` through `LLM.generate`, B=1, greedy, a 16-token prompt,
`--new-tokens` tokens) with its parts timed by wrapping the methods it calls: the decoder layers
(`Transformer.hidden_states`), the output head (`Transformer.logits`), the sampler, the paged
cache's per-step `prepare`, and the rest of the step (scheduler, bookkeeping). Process time, not
wall time (steadier on a shared machine); the variants run interleaved, `--repeats` times, medians
per token (the prompt's prefill amortised over the tokens, as in a real generation). A second table
times the same step's matmuls alone on matrices of the model's shapes (weights cold: every layer's
own, as in the model), so that "layers" minus "matmuls" is the eager per-layer overhead
(RMSNorm, RoPE, cache writes and gathers, attention, casts) that `compile=True` removes.
Real config.json shapes (bench/engine.py's REAL_SHAPES), random weights.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import REAL_SHAPES  # noqa: E402
from kernels import random_weights, time_matmuls  # noqa: E402
from results import Run, median  # noqa: E402

from qiusuo.engine import LLM, SamplingParams  # noqa: E402
from qiusuo.model import ModelConfig, Transformer, save_model  # noqa: E402

PARTS = ("layers", "head", "sampler", "kv prepare", "step")


def timed(obj, name: str, key: str, bucket: dict) -> None:
    fn = getattr(obj, name)

    def wrapped(*args, **kwargs):
        t = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            bucket[key] += time.process_time() - t
    setattr(obj, name, wrapped)


def engine_parts(ckpt: Path, variants: list[str], args) -> dict[str, list[dict]]:
    llms, buckets = {}, {}
    for v in variants:
        llm = LLM(str(ckpt), quantization=None if v == "fp32" else v, num_threads=args.threads,
                  enable_prefix_caching=False, max_model_len=256)
        b = buckets[v] = collections.defaultdict(float)
        engine = llm.llm_engine
        timed(engine.model, "hidden_states", "layers", b)
        timed(engine.model, "logits", "head", b)
        timed(engine.runner, "sampler", "sampler", b)
        timed(engine.runner.cache, "prepare", "kv prepare", b)
        timed(engine, "step", "step", b)
        llms[v] = llm
    prompt = list(range(10, 26))
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            buckets[v].clear()
            llms[v].generate(prompt, params)
            runs[v].append({k: buckets[v][k] / args.new_tokens * 1e3 for k in PARTS})
    return runs


# decode_breakdown's precision -> bench/kernels.py's kernel that the engine runs for it
KERNEL_OF = {"fp32": "fp32", "int8": "int8 weight-only", "int8-dynamic": "int8-dynamic fbgemm", "int4": "int4"}


def matmuls_alone(cfg: dict, variant: str, repeats: int) -> float:
    """ms of one step's matmuls (M=1) on the model's matrix shapes, each layer its own weights."""
    g = torch.Generator().manual_seed(0)
    weights, head_w = random_weights(cfg, g)
    return median(time_matmuls(KERNEL_OF[variant], weights, head_w, cfg, [1], repeats, g)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m", choices=["smollm2-135m", "qwen2.5-0.5b"])
    ap.add_argument("--variants", nargs="+", default=["fp32", "int8", "int8-dynamic", "int4"],
                    choices=["fp32", "int8", "int8-dynamic", "int4"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=33)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Run("decode_breakdown", threads=args.threads, args=vars(args))
    cfg = REAL_SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        model = Transformer(ModelConfig(**cfg)).eval()
        model.reset_parameters(seed=args.seed)
        ckpt = save_model(model, None, Path(tmp) / args.shape)
        del model
        runs = engine_parts(ckpt, args.variants, args)
    mm = {v: matmuls_alone(cfg, v, args.repeats) for v in args.variants}
    rows = []
    for v in args.variants:
        for r in runs[v]:
            run.add(variant=v, **r)
        med = {k: median([r[k] for r in runs[v]]) for k in PARTS}
        rest = med["step"] - med["layers"] - med["head"] - med["sampler"] - med["kv prepare"]
        rows.append([v] + [round(med[k], 2) for k in PARTS] + [round(rest, 2), round(mm[v], 2)])
        print(f"{v:13s} " + "  ".join(f"{k} {med[k]:.2f}" for k in PARTS) + f"  rest {rest:.2f}  matmuls alone "
              f"{mm[v]:.2f} ms/token; load {os.getloadavg()[0]:.1f}", flush=True)
    run.table(f"decode step breakdown, {args.shape}, B=1, {args.threads} thread(s), process ms per token "
              f"(medians of {args.repeats})",
              ["variant", "layers", "head", "sampler", "kv prepare", "step", "rest", "matmuls alone"], rows,
              note="layers includes the prompt's prefill amortised over the tokens; matmuls alone: the same "
                   "step's matrix shapes (layers + head) at M=1 without the model around them.")
    run.save()


if __name__ == "__main__":
    main()
