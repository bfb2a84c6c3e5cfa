"""Edge benchmark: one checkpoint in qiusuo's engine (fp32, bf16, int8; eager and compiled) and in llama.cpp (GGUF).

    .venv/bin/python bench/edge.py [--preset tiny-moe | --model DIR] [--tokens 128] [--batch 16]

Measures, on this machine:
- single-stream decode tokens/s (one greedy request, short prompt, `--tokens` new tokens);
- batch throughput: `--batch` parallel greedy sequences, generated tokens / wall time.
  qiusuo: `LLM.generate` on all prompts (continuous batching). llama.cpp: llama-cpp-python's
  high-level `Llama` is single-sequence, so the batch run uses its low-level API
  (`llama_batch` with one sequence id per request, `n_seq_max = batch`, one `llama_decode` per step
  for all sequences): the same scheme as llama.cpp's `batched` example;
- file sizes: safetensors (fp32) and GGUF f32 / f16 / q8_0.
qiusuo's `+compile` and `+max-autotune` variants run the decode step under torch.compile
(`EngineConfig.compile`, the latter also autotuning the matmul kernels); the
engine compiles when it starts, which the rates exclude and `startup_s` reports (the inductor
cache on disk makes the second engine's start shorter).
Each configuration runs with 1 and 2 threads (the machine has 2 shared cores), `--repeats` timed
runs each, and reports the best, on both sides; llama.cpp runs both before and after qiusuo's
variants (which take minutes to compile), so a busy neighbour during one side's runs does not
decide the ratio. Prints a table and, last, one JSON line with every figure and the ratios the issue sets
(qiusuo batch >= llama.cpp batch; qiusuo single >= half of llama.cpp single).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PROMPT = "Q: what is 12+34? think step by step.\nA:"


# ---------------------------------------------------------------------- qiusuo
def qiusuo_run(ckpt: Path, tok, variant: str, one: list[list[int]], many: list[list[int]], n: int,
               threads: int, repeats: int) -> tuple[float, float, float]:
    """(single-stream tok/s, batch tok/s, engine start seconds) of one engine: variant is fp32, bf16, int8, int8-dynamic, int4, or
    fp32/bf16 + "+compile" or "+max-autotune" (EngineConfig.compile: the decode step under torch.compile)."""
    from qiusuo.engine import LLM, SamplingParams

    name, _, mode = variant.partition("+")
    start = time.perf_counter()
    llm = LLM(str(ckpt), dtype="bfloat16" if name == "bf16" else "float32",
              quantization=name if name in ("int8", "int8-dynamic", "int4") else None,
              compile={"": False, "compile": True}.get(mode, mode), num_threads=threads, kv_cache_bytes=256 << 20)
    startup = time.perf_counter() - start
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)
    rates = []
    for prompts in (one, many):
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
        best_rate = 0.0
        for _ in range(repeats):
            t = time.perf_counter()
            outs = llm.generate(prompts, params)
            best_rate = max(best_rate, sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t))
        rates.append(best_rate)
    return rates[0], rates[1], startup


# ---------------------------------------------------------------------- llama.cpp
def llama_single(path: Path, prompt: list[int], n: int, threads: int) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    for _, _ in zip(range(4), llm.generate(prompt, temp=0.0, top_k=1, reset=True)):  # warm-up
        pass
    t = time.perf_counter()
    count = 0
    for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        count += 1
        if count == n:
            break
    return count / (time.perf_counter() - t)


def llama_batch(path: Path, prompts: list[list[int]], n: int, threads: int) -> float:
    """Greedy decode of len(prompts) sequences in one llama_batch per step (low-level API)."""
    import llama_cpp as lc

    llm = lc.Llama(str(path), n_ctx=64, verbose=False)  # only to load the model
    B = len(prompts)
    cp = lc.llama_context_default_params()
    cp.n_ctx = B * (max(map(len, prompts)) + n + 8)  # a multiple of n_seq_max: each sequence gets n_ctx / B
    cp.n_batch = cp.n_ubatch = max(cp.n_ctx, 512)
    cp.n_seq_max = B
    cp.n_threads = cp.n_threads_batch = threads
    ctx = lc.llama_init_from_model(llm._model.model, cp)
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(llm._model.model))
    batch = lc.llama_batch_init(cp.n_batch, 0, B)

    def decode(items):  # items: (token, pos, seq, want_logits)
        batch.n_tokens = len(items)
        for i, (tok, pos, seq, want) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, want
        assert lc.llama_decode(ctx, batch) == 0

    def argmax(i):
        ptr = lc.llama_get_logits_ith(ctx, i)
        return int(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (n_vocab,)).argmax())

    try:
        t = time.perf_counter()
        items, last_rows = [], []
        for s, p in enumerate(prompts):
            items += [(tok, pos, s, pos == len(p) - 1) for pos, tok in enumerate(p)]
            last_rows.append(len(items) - 1)
        decode(items)
        nxt = [argmax(r) for r in last_rows]
        pos = [len(p) for p in prompts]
        generated = B
        for _ in range(n - 1):
            decode([(nxt[s], pos[s], s, True) for s in range(B)])
            nxt = [argmax(s) for s in range(B)]
            pos = [q + 1 for q in pos]
            generated += B
        return generated / (time.perf_counter() - t)
    finally:
        lc.llama_batch_free(batch)
        lc.llama_free(ctx)


def best(fn, *args, repeats: int) -> tuple[float, int]:
    """(best rate, its thread count) over 1 and 2 threads, `repeats` runs each."""
    return max((fn(*args, threads), threads) for threads in (1, 2) for _ in range(repeats))


def llama_all(ggufs: dict[str, Path], one: list[list[int]], many: list[list[int]], n: int,
              repeats: int) -> dict[str, dict]:
    """Each GGUF's best (tok/s, threads), single stream and batch."""
    return {f"llama.cpp_{dt}": {"single": best(llama_single, path, one[0], n, repeats=repeats),
                                "batch": best(llama_batch, path, many, n, repeats=repeats)}
            for dt, path in ggufs.items()}


# ---------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny-moe")
    ap.add_argument("--model", default=None, help="checkpoint directory (overrides --preset)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs per configuration and thread count; the best is kept, on both sides "
                         "(a shared machine only ever makes a run slower)")
    args = ap.parse_args()

    from qiusuo.export import export_gguf
    from qiusuo.model import build_model, load_model, save_model

    model, tok = load_model(args.model) if args.model else build_model(args.preset, seed=0)
    model.eval()
    tmp = Path(tempfile.mkdtemp(prefix="qiusuo-edge-"))
    save_model(model, tok, tmp / "ckpt")
    sizes = {"safetensors_fp32": (tmp / "ckpt" / "model.safetensors").stat().st_size}
    ggufs = {}
    for dt in ("f32", "f16", "q8_0"):
        ggufs[dt] = export_gguf(model, tok, tmp / f"m-{dt}.gguf", dtype=dt)
        sizes[f"gguf_{dt}"] = ggufs[dt].stat().st_size

    one = [tok.encode(PROMPT, add_special_tokens=True)]
    many = [tok.encode(f"{PROMPT} ({i})", add_special_tokens=True) for i in range(args.batch)]
    # llama.cpp runs before and after qiusuo's variants (minutes of compiling) and keeps its best:
    # a neighbour busy during one side's runs must not hand the other side the win.
    llama_before = llama_all(ggufs, one, many, args.tokens, args.repeats)
    results: dict[str, dict] = {}
    for variant in ("fp32", "bf16", "int8", "int8-dynamic", "int4", "fp32+compile", "fp32+max-autotune", "bf16+max-autotune"):
        runs = {threads: qiusuo_run(tmp / "ckpt", tok, variant, one, many, args.tokens, threads, args.repeats)
                for threads in (1, 2)}
        t1 = max(runs, key=lambda t: runs[t][0])
        t2 = max(runs, key=lambda t: runs[t][1])
        results[f"qiusuo_{variant}"] = {"single_tok_s": runs[t1][0], "single_threads": t1,
                                        "batch_tok_s": runs[t2][1], "batch_threads": t2,
                                        "startup_s": max(r[2] for r in runs.values())}

    llama_after = llama_all(ggufs, one, many, args.tokens, args.repeats)
    for k, before in llama_before.items():
        after = llama_after[k]
        single, batch = (max(before[m], after[m]) for m in ("single", "batch"))
        results[k] = {"single_tok_s": single[0], "single_threads": single[1], "batch_tok_s": batch[0],
                      "batch_threads": batch[1], "single_tok_s_before_after": [before["single"][0], after["single"][0]],
                      "batch_tok_s_before_after": [before["batch"][0], after["batch"][0]]}

    print(f"{'engine':<22}{'single tok/s':>14}{'batch tok/s':>14}   (threads)")
    for k, v in results.items():
        print(f"{k:<22}{v['single_tok_s']:>14.1f}{v['batch_tok_s']:>14.1f}   ({v['single_threads']}, {v['batch_threads']})")
    print("file sizes (bytes):", sizes)
    best_q = max(results[k]["batch_tok_s"] for k in results if k.startswith("qiusuo"))
    best_l = max(results[k]["batch_tok_s"] for k in results if k.startswith("llama"))
    best_q1 = max(results[k]["single_tok_s"] for k in results if k.startswith("qiusuo"))
    best_l1 = max(results[k]["single_tok_s"] for k in results if k.startswith("llama"))
    ratios = {"batch_qiusuo_over_llama": best_q / best_l, "single_qiusuo_over_llama": best_q1 / best_l1}
    summary = {"bench": "edge", "preset": args.model or args.preset, "tokens": args.tokens, "batch": args.batch,
               "repeats": args.repeats,
               "torch": torch.__version__, "results": results, "sizes": sizes, "ratios": ratios}
    print(json.dumps(_rounded(summary)))


def _rounded(x):
    if isinstance(x, float):
        return round(x, 2)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


if __name__ == "__main__":
    main()
