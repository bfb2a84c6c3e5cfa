"""Benchmark: qiusuo's engine against transformers' `generate` on a reasoning-shaped workload.

Workload (issue 3): N requests (default 256), prompts of 8-64 tokens, outputs of 16-256 tokens,
lengths and token ids drawn with a fixed seed, ignore_eos, greedy in both engines. Both run the
same weights: ours are saved in HF layout and loaded by transformers (sdpa attention, use_cache,
static batches of 32 in request order, left padding; each batch runs until its longest output,
which is what a static batch costs). Throughput counts the requested output tokens only.
Each engine's CPU time (process_time) is reported too: with one torch thread it is the work done,
so `cpu_ratio` stays comparable on a loaded machine where wall-clock ratios swing by 2x.

Achieved GFLOP/s = useful model FLOPs (2 x matmul parameters per token, plus attention over the
context) / wall time; the roofline fraction divides it by an fp32 sgemm GFLOP/s measured in the
same run with the same threads. Prints a table and ends with one JSON line.

    .venv/bin/python bench/engine.py [--requests 256] [--threads 2] [--quick] [--presets tiny-dense tiny-moe]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from qiusuo.engine import LLM, SamplingParams
from qiusuo.model import Transformer, preset, save_model
from qiusuo.tokenizer import Tokenizer


def workload(n: int, out_max: int, seed: int, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(10, vocab) for _ in range(rng.randint(8, 64))], rng.randint(16, out_max))
            for _ in range(n)]


def model_flops(model: Transformer, reqs: list[tuple[list[int], int]]) -> float:
    """Forward FLOPs of the useful work: every prompt token and every fed-back output token."""
    cfg = model.config
    matmul_params = model.num_parameters(active=True) - sum(p.numel() for p in model.mtp.parameters())
    matmul_params -= model.model.embed_tokens.weight.numel()  # a lookup, not a matmul
    if model.lm_head is None:
        matmul_params += model.output_weight.numel()  # the tied head is a matmul
    if cfg.is_deepseek:
        qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        qk = v = cfg.head_dim
    attn_per_ctx = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * (qk + v)
    total = 0.0
    for prompt, out in reqs:
        n = len(prompt) + out - 1  # tokens fed to the model
        total += n * 2 * matmul_params + attn_per_ctx * n * (n + 1) / 2
    return total


def sgemm_gflops(size: int = 1024, seconds: float = 1.0) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - t0) / 1e9


def run_qiusuo(model, reqs) -> tuple[float, float, int]:
    llm = LLM(model)
    llm.generate([reqs[0][0]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    params = [SamplingParams(temperature=0, max_tokens=out, ignore_eos=True, detokenize=False) for _, out in reqs]
    t0, c0 = time.perf_counter(), time.process_time()
    outs = llm.generate([p for p, _ in reqs], params)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n == sum(out for _, out in reqs), "every request must produce its max_tokens"
    return dt, cpu, n


def run_transformers(path: Path, reqs, batch_size: int = 32) -> tuple[float, float, int]:
    import transformers

    transformers.logging.set_verbosity_error()  # the load report lists the MTP weights it skips
    transformers.logging.disable_progress_bar()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    gen = dict(do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)

    def generate(batch):
        T = max(len(p) for p, _ in batch)
        ids = torch.tensor([[0] * (T - len(p)) + p for p, _ in batch])  # left padding
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p, _ in batch])
        new = max(o for _, o in batch)
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **gen)
        assert out.shape[1] == T + new

    generate(reqs[:2])  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(reqs), batch_size):
        generate(reqs[i:i + batch_size])
    return time.perf_counter() - t0, time.process_time() - c0, sum(o for _, o in reqs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both engines")
    ap.add_argument("--quick", action="store_true", help="64 requests, outputs of 16-64 tokens")
    ap.add_argument("--presets", nargs="+", default=["tiny-dense", "tiny-moe"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, out_max = (min(args.requests, 64), 64) if args.quick else (args.requests, 256)
    tok = Tokenizer.builtin()
    peak = sgemm_gflops()
    print(f"sgemm fp32 1024^3: {peak:.1f} GFLOP/s on {args.threads} threads; {n} requests, outputs 16-{out_max}")
    result = {"requests": n, "threads": args.threads, "sgemm_gflops": round(peak, 1), "presets": {}}
    for name in args.presets:
        torch.manual_seed(args.seed)
        model = Transformer(preset(name, vocab_size=tok.vocab_size, pad_token_id=0)).eval()
        reqs = workload(n, out_max, args.seed, tok.vocab_size)
        flops = model_flops(model, reqs)
        with tempfile.TemporaryDirectory() as tmp:
            save_model(model, tok, Path(tmp) / "ck")
            hf_dt, hf_cpu, hf_tokens = run_transformers(Path(tmp) / "ck", reqs)
        q_dt, q_cpu, q_tokens = run_qiusuo(model, reqs)
        row = {
            "qiusuo_tok_s": round(q_tokens / q_dt, 1), "transformers_tok_s": round(hf_tokens / hf_dt, 1),
            "ratio": round(hf_dt / q_dt, 2), "qiusuo_s": round(q_dt, 2), "transformers_s": round(hf_dt, 2),
            "qiusuo_cpu_s": round(q_cpu, 2), "transformers_cpu_s": round(hf_cpu, 2), "cpu_ratio": round(hf_cpu / q_cpu, 2),
            "qiusuo_gflops": round(flops / q_dt / 1e9, 2), "transformers_gflops": round(flops / hf_dt / 1e9, 2),
        }
        row["qiusuo_roofline"] = round(row["qiusuo_gflops"] / peak, 4)
        row["transformers_roofline"] = round(row["transformers_gflops"] / peak, 4)
        result["presets"][name] = row
        print(f"{name:>10}: qiusuo {row['qiusuo_tok_s']:8.1f} tok/s ({row['qiusuo_gflops']:.2f} GFLOP/s, "
              f"{100 * row['qiusuo_roofline']:.1f}% of sgemm) | transformers {row['transformers_tok_s']:8.1f} tok/s "
              f"({row['transformers_gflops']:.2f} GFLOP/s) | ratio {row['ratio']:.2f}x (CPU time {row['cpu_ratio']:.2f}x)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
