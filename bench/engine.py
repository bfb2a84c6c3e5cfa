"""Benchmark: qiusuo's engine against transformers, as a competent transformers user would run it.

Two workloads, both greedy in fp32 on both sides with the same weights (ours saved in HF layout and
loaded by transformers), `--repeats` runs each (default 3) in alternating order, medians reported:

1. `--workload tiny`, a request stream, on the tiny presets (~1 M parameters) or, with `--presets
   smollm2-135m dsv3-moe-130m`, on the real shapes below: N requests (default 256), prompts of 8-64 tokens, outputs of
   16-256 tokens (lengths and ids drawn with a fixed seed), ignore_eos.
   qiusuo: `LLM.generate` with max_num_seqs 256 (its default) and 32 (transformers' old batch).
   transformers: static batches (`generate`, sdpa, left padding, request order; a batch runs until
   its longest output) swept over 32/64/128/256, and its continuous batching (`generate_batch`'s
   manager, paged attention, per-request max_new_tokens); the best of them is the ratio's
   denominator. For MoE, transformers' experts implementation is set explicitly: each available one
   (grouped_mm, batched_mm, eager) is probed on a short run and the fastest is used.
   Throughput counts the requested output tokens only; CPU seconds (process_time) are reported too.
   Achieved GFLOP/s = useful model FLOPs (2 x active matmul parameters per token, MTP excluded, plus
   attention over the context) / wall time, and its fraction *of the fp32 sgemm GFLOP/s measured in
   the same run on the same threads* (not of a hardware peak).

2. `--workload real`: model shapes from real config.json values with random weights (nothing is
   downloaded): SmolLM2-135M, Qwen2.5-0.5B and a DeepSeek-V3-shaped MoE (~130 M: MLA with q_lora,
   32 routed experts top-4 in 2 of 4 groups, 1 shared expert). Per side (qiusuo fp32, qiusuo bf16,
   transformers fp32), each repeat in its own process: load time, prefill tokens/s (one prompt),
   single-stream decode tokens/s, batch-8/16/32 tokens/s (equal prompts, no padding) and peak RSS.
   Prefix caching is off on qiusuo's side (transformers has none), so repeats recompute everything.

Correctness is asserted, not assumed: every request's first 16 greedy tokens (all, if fewer) must be
the same on every side and every side must produce every requested token. Results go to
bench/results/engine-*.json (or engine_real-*.json) with every repeat's raw figures.

    python bench/engine.py [--requests 256] [--repeats 3] [--threads 1] [--presets tiny-dense tiny-moe]
    python bench/engine.py --presets smollm2-135m dsv3-moe-130m --requests 64 --out-max 48 --cb-repeats 1
        (the request stream at real shapes, bounded to ~15 min at 1 thread)
    python bench/engine.py --workload real [--shapes smollm2-135m qwen2.5-0.5b dsv3-moe-130m] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from qiusuo.engine import LLM, SamplingParams
from qiusuo.model import ModelConfig, Transformer, preset, save_model
from qiusuo.model.moe import MoE
from qiusuo.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import Run, alternating, median, peak_rss_mb  # noqa: E402

CHECKED = 16  # leading greedy tokens that must agree between the two sides
STATIC_BATCHES = (32, 64, 128, 256)
RESULT = "RESULT "

# Real shapes: the config.json values of the public checkpoints (vocab and special ids included),
# random weights. The MoE is V3's architecture scaled to ~130 M parameters.
REAL_SHAPES = {
    "smollm2-135m": dict(  # HuggingFaceTB/SmolLM2-135M
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0,
        rms_norm_eps=1e-5, max_position_embeddings=8192, bos_token_id=0, eos_token_id=0),
    "qwen2.5-0.5b": dict(  # Qwen/Qwen2.5-0.5B
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0,
        rms_norm_eps=1e-6, max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151643),
    "dsv3-moe-130m": dict(  # deepseek-ai/DeepSeek-V3's config.json, widths scaled down
        model_type="deepseek_v3", vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=8, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32, n_shared_experts=1, moe_intermediate_size=256,
        num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, scoring_func="sigmoid", num_nextn_predict_layers=0, max_position_embeddings=4096,
        rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1),
}


# ---------------------------------------------------------------------- workload and FLOPs
def workload(n: int, out_max: int, seed: int, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(10, vocab) for _ in range(rng.randint(8, 64))], rng.randint(16, out_max))
            for _ in range(n)]


def matmul_parameters(model: Transformer) -> int:
    """Weights one token multiplies through: the backbone's layers (only the K routed experts it
    uses, plus the shared ones) and the output head. The embedding is a lookup, not a matmul, and
    the MTP layers are not run at inference (counted neither here nor subtracted a second time)."""
    backbone = model.model
    n = sum(p.numel() for p in backbone.layers.parameters()) + backbone.norm.weight.numel()
    for m in backbone.modules():
        if isinstance(m, MoE):
            per_expert = m.experts.gate_up_proj[0].numel() + m.experts.down_proj[0].numel()
            n -= per_expert * (m.num_experts - m.top_k)
    return n + model.output_weight.numel()  # the head (tied or not) is a matmul


def model_flops(model: Transformer, reqs: list[tuple[list[int], int]]) -> float:
    """Forward FLOPs of the useful work: every prompt token and every fed-back output token."""
    cfg = model.config
    params = matmul_parameters(model)
    if cfg.is_deepseek:
        qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        qk = v = cfg.head_dim
    attn_per_ctx = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * (qk + v)
    total = 0.0
    for prompt, out in reqs:
        n = len(prompt) + out - 1  # tokens fed to the model
        total += n * 2 * params + attn_per_ctx * n * (n + 1) / 2
    return total


def sgemm_gflops(size: int = 1024, seconds: float = 1.0) -> float:
    """fp32 matmul GFLOP/s on this machine now, with the current torch threads: the ceiling the
    achieved-GFLOP/s fraction is taken of."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - t0) / 1e9


def check_same(name: str, tokens: list[list[int]], reference: list[list[int]], reqs) -> None:
    """Every request: all requested tokens produced, the first CHECKED equal to the reference side's."""
    assert len(tokens) == len(reference) == len(reqs), f"{name}: {len(tokens)} outputs for {len(reqs)} requests"
    for i, ((_, out), got, ref) in enumerate(zip(reqs, tokens, reference)):
        assert len(got) == out, f"{name}: request {i} produced {len(got)} tokens, {out} requested"
        k = min(CHECKED, out)
        assert got[:k] == ref[:k], (f"{name}: request {i}'s greedy tokens differ from qiusuo's within the first "
                                    f"{k}: {got[:k]} vs {ref[:k]}")


# ---------------------------------------------------------------------- tiny workload: the sides
def qiusuo_side(model, max_num_seqs: int):
    def run(reqs):
        llm = LLM(model, max_num_seqs=max_num_seqs)  # a fresh engine: an empty prefix cache every repeat
        llm.generate([reqs[0][0]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
        params = [SamplingParams(temperature=0, max_tokens=out, ignore_eos=True, detokenize=False) for _, out in reqs]
        t0, c0 = time.perf_counter(), time.process_time()
        outs = llm.generate([p for p, _ in reqs], params)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        return dt, cpu, [list(o.outputs[0].token_ids) for o in outs]
    return run


def load_hf(path: Path, dtype=torch.float32, experts: str | None = None):
    import transformers

    transformers.logging.set_verbosity_error()  # the load report lists the MTP weights it skips
    transformers.logging.disable_progress_bar()
    kw = {"experts_implementation": experts} if experts else {}
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=dtype, **kw).eval()


def hf_static(hf, reqs, batch_size: int) -> tuple[float, float, list[list[int]]]:
    """Static batches of `batch_size` in request order, left padding; a batch runs to its longest output."""
    gen = dict(do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
    tokens: list[list[int]] = []
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(reqs), batch_size):
        batch = reqs[i:i + batch_size]
        T = max(len(p) for p, _ in batch)
        ids = torch.tensor([[0] * (T - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p, _ in batch])
        new = max(o for _, o in batch)
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **gen)
        assert out.shape[1] == T + new
        tokens += [out[j, T:T + o].tolist() for j, (_, o) in enumerate(batch)]
    return time.perf_counter() - t0, time.process_time() - c0, tokens


def hf_continuous(hf, reqs) -> tuple[float, float, list[list[int]]]:
    """transformers' continuous batching: its manager (paged KV cache, `generate_batch`'s engine) with
    each request's own max_new_tokens; eos disabled so every request runs to its length."""
    from transformers import GenerationConfig

    gc = GenerationConfig(do_sample=False, max_new_tokens=max(o for _, o in reqs), eos_token_id=-1, pad_token_id=0)
    with hf.continuous_batching_context_manager(generation_config=gc, block=True, timeout=30) as manager:
        # timed from here: the manager's start-up (cache sizing, warm-up) is paid once by a server
        t0, c0 = time.perf_counter(), time.process_time()
        for i, (p, o) in enumerate(reqs):
            manager.add_request(input_ids=p, request_id=str(i), max_new_tokens=o)
        done: dict[int, list[int]] = {}
        deadline = time.monotonic() + 3600
        while len(done) < len(reqs):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                if result.error:  # the manager reports a failed forward per request instead of raising
                    raise RuntimeError(f"transformers' continuous batching failed: {result.error[-300:]}")
                done[int(result.request_id)] = list(result.generated_tokens)
            elif result is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching thread stopped early")
            if time.monotonic() > deadline:
                raise RuntimeError("transformers' continuous batching did not finish within an hour")
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return dt, cpu, [done[i] for i in range(len(reqs))]


def hf_side(hf, mode):
    def run(reqs):
        with torch.inference_mode():  # warm-up
            hf.generate(torch.tensor([reqs[0][0]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
        return hf_continuous(hf, reqs) if mode == "cb" else hf_static(hf, reqs, mode)
    return run


def static_sweep(n: int) -> list[int]:
    """transformers' static batch sizes worth trying for n requests: each of STATIC_BATCHES below n,
    and the first that holds all n in one batch (larger ones run the same single batch)."""
    below = [b for b in STATIC_BATCHES if b < n]
    return list(dict.fromkeys(below + [next((b for b in STATIC_BATCHES if b >= n), STATIC_BATCHES[-1])]))


def best_experts_implementation(path: Path, reqs, size: int = 16, max_tokens: int = 24) -> tuple[str, dict[str, float | str]]:
    """The fastest of transformers' MoE experts implementations on a short probe (`size` requests of
    at most `max_tokens` outputs, one static batch), each checked against eager's tokens; those that
    fail are reported with their error."""
    probe = [(p, min(o, max_tokens)) for p, o in reqs[:size]]
    times: dict[str, float | str] = {}
    reference = None
    for impl in ("eager", "batched_mm", "grouped_mm"):
        try:
            hf = load_hf(path, experts=impl)
            hf_static(hf, [(p, 2) for p, _ in probe], size)  # warm-up at the probe's batch (first-call allocations)
            dt, _, tokens = hf_static(hf, probe, size)
            reference = reference or tokens
            check_same(f"transformers experts={impl}", tokens, reference, probe)
            times[impl] = round(dt, 4)
        except (ValueError, RuntimeError, NotImplementedError, AssertionError, TypeError) as e:
            times[impl] = f"unavailable: {type(e).__name__}: {str(e)[:160]}"
    ok = {k: v for k, v in times.items() if isinstance(v, float)}
    return min(ok, key=ok.get), times


def bench_tiny(args, run: Run, tok: Tokenizer, peak: float) -> None:
    n, out_max = (min(args.requests, 64), 64) if args.quick else (args.requests, args.out_max)
    summary_rows, flops_rows = [], []
    for name in args.presets:
        torch.manual_seed(args.seed)
        if name in REAL_SHAPES:  # a real config.json shape, random weights, its own vocabulary
            model = Transformer(ModelConfig(**REAL_SHAPES[name]))
            model.reset_parameters(seed=args.seed)
            model.eval()
        else:
            model = Transformer(preset(name, vocab_size=tok.vocab_size, pad_token_id=0)).eval()
        reqs = workload(n, out_max, args.seed, model.config.vocab_size)
        flops = model_flops(model, reqs)
        requested = sum(o for _, o in reqs)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ck"
            save_model(model, None if name in REAL_SHAPES else tok, path)
            experts = None
            if model.config.is_deepseek:
                experts, probe = best_experts_implementation(path, reqs, *((16, 24) if n > 32 else (8, 12)))
                run.add(preset=name, kind="experts_probe", seconds=probe, chosen=experts)
                print(f"{name}: transformers experts implementations (short probe, s): {probe}; using {experts}")
            hf = load_hf(path, experts=experts)
            sides = {"qiusuo": qiusuo_side(model, 256), "qiusuo max_num_seqs=32": qiusuo_side(model, 32)}
            sides.update({f"transformers static {b}": hf_side(hf, b) for b in static_sweep(n)})
            if args.continuous_batching:
                sides["transformers continuous batching"] = hf_side(hf, "cb")
            times: dict[str, list[tuple[float, float]]] = {s: [] for s in sides}
            reference: list[list[int]] | None = None
            failed: dict[str, str] = {}
            for r, side in alternating(list(sides), args.repeats):
                if side in failed or (side.endswith("continuous batching") and r >= args.cb_repeats):
                    continue
                try:
                    dt, cpu, tokens = sides[side](reqs)
                except (RuntimeError, ValueError, NotImplementedError, TypeError) as e:  # the peer's CB on CPU
                    failed[side] = f"{type(e).__name__}: {str(e)[:200]}"
                    print(f"{name}: {side} failed: {failed[side]}")
                    run.add(preset=name, side=side, repeat=r, error=failed[side])
                    continue
                if side == "qiusuo" and reference is None:
                    reference = tokens
                if reference is not None:
                    check_same(f"{name} {side}", tokens, reference, reqs)
                times[side].append((dt, cpu))
                run.add(preset=name, side=side, repeat=r, wall_s=round(dt, 4), cpu_s=round(cpu, 4),
                        tokens=requested, first_tokens=[t[:CHECKED] for t in tokens[:4]])
                print(f"{name} repeat {r}: {side:<34} {dt:7.2f} s wall {cpu:7.2f} s cpu  {requested / dt:8.1f} tok/s",
                      flush=True)
            med = {s: (median([t for t, _ in v]), median([c for _, c in v])) for s, v in times.items() if v}
            peer = {s: v for s, v in med.items() if s.startswith("transformers")}
            best_peer = min(peer, key=lambda s: peer[s][0])
            q = med["qiusuo"]
            for s, (dt, cpu) in med.items():
                gf = flops / dt / 1e9
                summary_rows.append([name, s, round(requested / dt, 1), round(dt, 3), round(cpu, 3),
                                     round(gf, 2), round(100 * gf / peak, 2), len(times[s])])
            for s, err in failed.items():
                summary_rows.append([name, f"{s} (failed: {err[:80]})", None, None, None, None, None, 0])
            flops_rows.append([name, f"{matmul_parameters(model):,}", experts or "–", best_peer,
                               round(med[best_peer][0] / q[0], 2), round(med[best_peer][1] / q[1], 2),
                               round(med["transformers static 32"][0] / q[0], 2)
                               if "transformers static 32" in med else None])
        save_tiny(run, args, n, out_max, peak, summary_rows, flops_rows)  # after every preset


def save_tiny(run: Run, args, n: int, out_max: int, peak: float, summary_rows: list, flops_rows: list) -> None:
    run.data["tables"] = []
    run.table("Request stream: tokens/s (medians of the repeats; GFLOP/s and % of this run's measured fp32 sgemm)",
              ["preset", "side", "tok/s", "wall s", "CPU s", "GFLOP/s", "% of sgemm", "repeats"], summary_rows)
    run.table("Request stream: ratio against transformers' best set-up (wall and CPU), and against the old static-32",
              ["preset", "matmul params/token", "transformers experts impl", "transformers best", "ratio wall",
               "ratio CPU", "ratio vs static 32 (old bench)"], flops_rows,
              note=f"{n} requests, prompts 8-64, outputs 16-{out_max}, greedy, fp32, {args.threads} thread(s); "
                   f"sgemm fp32 1024^3 measured at {peak:.1f} GFLOP/s.")
    run.save(summary={"sgemm_gflops": round(peak, 1)})


# ---------------------------------------------------------------------- real shapes: one process per side and repeat
QUANT_MODES = ("int8", "int8-dynamic", "int4")


def qiusuo_side_options(side: str) -> tuple[str, str | None, bool]:
    """(dtype, quantization, compile) of a side named "qiusuo <precision>[+compile]": precision fp32,
    bf16 or a quantization mode (bench/edge.py's variants); "+compile" is `compile=True`. (A quantized
    model computes in float32: the loader refuses bf16 with quantization.)"""
    name = side.split(" ", 1)[1]
    compile_ = name.endswith("+compile")
    name = name.removesuffix("+compile")
    if name not in ("fp32", "bf16") + QUANT_MODES:
        raise ValueError(f"qiusuo side {side!r}: precision fp32, bf16 or {'/'.join(QUANT_MODES)}, optionally +compile")
    return "bfloat16" if name == "bf16" else "float32", name if name in QUANT_MODES else None, compile_


def real_worker(shape: str, side: str, ckpt: str, threads: int, new_tokens: int, prefill_len: int,
                batches: list[int], seed: int) -> dict:
    torch.set_num_threads(threads)
    vocab = REAL_SHAPES[shape]["vocab_size"]
    rng = random.Random(seed)
    prefill_prompt = [rng.randrange(10, vocab) for _ in range(prefill_len)]
    short = [[rng.randrange(10, vocab) for _ in range(16)] for _ in range(max(batches))]
    out: dict = {"shape": shape, "side": side}
    t0 = time.perf_counter()
    if side.startswith("qiusuo"):
        dtype, quant, compile_ = qiusuo_side_options(side)
        llm = LLM(ckpt, dtype=dtype, num_threads=threads, max_num_seqs=max(batches), enable_prefix_caching=False,
                  max_model_len=max(prefill_len, 16 + new_tokens) + 1, kv_cache_bytes=None, quantization=quant,
                  compile=compile_)
        out["load_s"] = time.perf_counter() - t0

        def gen(prompts, n):
            params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)
            return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
    else:
        hf = load_hf(Path(ckpt), dtype=torch.bfloat16 if side.endswith("bf16") else torch.float32)
        out["load_s"] = time.perf_counter() - t0

        def gen(prompts, n):
            ids = torch.tensor(prompts)  # equal lengths: no padding
            with torch.inference_mode():
                o = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                                eos_token_id=None, use_cache=True)
            return o[:, ids.shape[1]:].tolist()

    def timed(prompts, n):
        t = time.perf_counter()
        tokens = gen(prompts, n)
        return time.perf_counter() - t, tokens

    gen([short[0]], 2)  # warm-up
    dt, _ = timed([prefill_prompt], 1)
    out["prefill_tok_s"] = prefill_len / dt
    t1, _ = timed([short[0]], 1)
    tn, single = timed([short[0]], new_tokens + 1)
    out["decode_tok_s"] = new_tokens / max(tn - t1, 1e-9)  # the prefill and the first token subtracted
    out["tokens"] = {"single": single}
    out["single_prompt"] = short[0]  # bench/edge.py replays it on llama.cpp
    for b in batches:
        dt, tokens = timed(short[:b], new_tokens)
        out[f"batch{b}_tok_s"] = b * new_tokens / dt
        out["tokens"][f"batch{b}"] = tokens
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def build_real(shape: str, directory: Path, seed: int) -> tuple[Path, int, int]:
    torch.manual_seed(seed)
    cfg = ModelConfig(**REAL_SHAPES[shape])
    model = Transformer(cfg)
    model.reset_parameters(seed=seed)
    path = save_model(model.eval(), None, directory / shape)
    return path, model.num_parameters(), matmul_parameters(model)


def bench_real(args, run: Run) -> None:
    sides = ["qiusuo fp32", "qiusuo bf16", "transformers fp32"] + (["transformers bf16"] if args.hf_bf16 else [])
    batches = [8, 16, 32]
    cols = ["side", "load s", "prefill tok/s", "decode tok/s (1 stream)"] + [f"batch-{b} tok/s" for b in batches] \
        + ["peak RSS MiB"]
    for shape in args.shapes:
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            path, params, active = build_real(shape, Path(tmp), args.seed)
            print(f"{shape}: {params / 1e6:.1f} M parameters ({active / 1e6:.1f} M matmul per token), "
                  f"checkpoint {sum(f.stat().st_size for f in path.iterdir()) / 2**20:.0f} MiB", flush=True)
            got: dict[str, list[dict]] = {s: [] for s in sides}
            reference: dict | None = None
            for r, side in alternating(sides, args.repeats):
                cmd = [sys.executable, __file__, "--_real", shape, side, str(path), "--threads", str(args.threads),
                       "--new-tokens", str(args.new_tokens), "--prefill-len", str(args.prefill_len),
                       "--seed", str(args.seed)]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.side_timeout)
                except subprocess.TimeoutExpired:  # recorded, and the other sides still run
                    print(f"{shape} repeat {r}: {side} took over {args.side_timeout:.0f} s; skipped", flush=True)
                    run.add(kind="real", shape=shape, side=side, repeat=r, error=f"over {args.side_timeout:.0f} s")
                    continue
                lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT)]
                if proc.returncode or not lines:
                    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
                    raise SystemExit(f"{shape} {side} failed (exit {proc.returncode}); its output is above")
                res = json.loads(lines[-1][len(RESULT):])
                tokens = res.pop("tokens")
                res.pop("single_prompt", None)
                got[side].append(res)
                run.add(kind="real", repeat=r, load_before=os.getloadavg()[0], first_tokens=tokens["single"][:CHECKED],
                        **res)
                if side == "qiusuo fp32" and reference is None:
                    reference = tokens  # repeat 0 runs the sides in order: qiusuo fp32 first
                if side.endswith("fp32"):
                    for key, rows in tokens.items():
                        rows, refs = ([rows], [reference[key]]) if key == "single" else (rows, reference[key])
                        for i, (a, b) in enumerate(zip(rows, refs)):
                            assert len(a) == len(b) and a[:CHECKED] == b[:CHECKED], (
                                f"{shape}: {side}'s greedy tokens ({key}, row {i}) differ from qiusuo fp32's: "
                                f"{a[:CHECKED]} vs {b[:CHECKED]}")
                print(f"{shape} repeat {r}: {side:<18} load {res['load_s']:.2f} s, prefill {res['prefill_tok_s']:.0f}, "
                      f"decode {res['decode_tok_s']:.1f}, batch {[round(res[f'batch{b}_tok_s'], 1) for b in batches]} "
                      f"tok/s, RSS {res['peak_rss_mb']:.0f} MiB", flush=True)
            keys = ["load_s", "prefill_tok_s", "decode_tok_s"] + [f"batch{b}_tok_s" for b in batches] + ["peak_rss_mb"]
            rows = [[s] + [round(median([x[k] for x in got[s]]), 2 if k == "load_s" else 1) for k in keys]
                    if got[s] else [f"{s} (timed out)"] + [None] * len(keys) for s in sides]
            run.table(f"{shape}: {params / 1e6:.0f} M parameters, random weights (medians of {args.repeats})", cols, rows,
                      note=f"prompt {args.prefill_len} tokens for prefill; 16-token prompts and {args.new_tokens} new "
                           f"tokens for decode (single stream: prefill subtracted) and batches (prefill included); "
                           f"{args.threads} thread(s); greedy tokens of qiusuo fp32 and transformers fp32 asserted "
                           f"equal for the first {CHECKED}.")
            run.save()  # after every shape: a later shape that runs out of time keeps the earlier ones


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=("tiny", "real"), default="tiny")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both engines")
    ap.add_argument("--out-max", type=int, default=256, help="tiny: longest output (outputs are 16..out-max tokens)")
    ap.add_argument("--quick", action="store_true", help="tiny: 64 requests, outputs of 16-64 tokens")
    ap.add_argument("--presets", nargs="+", default=["tiny-dense", "tiny-moe"],
                    help=f"tiny workload's models: qiusuo presets, or real shapes ({', '.join(REAL_SHAPES)})")
    ap.add_argument("--continuous-batching", action=argparse.BooleanOptionalAction, default=True,
                    help="tiny: also run transformers' continuous batching (generate_batch's manager)")
    ap.add_argument("--cb-repeats", type=int, default=3,
                    help="tiny: repeats of transformers' continuous batching (its slowest side; fewer saves time)")
    ap.add_argument("--shapes", nargs="+", default=list(REAL_SHAPES), choices=list(REAL_SHAPES))
    ap.add_argument("--new-tokens", type=int, default=32, help="real: tokens per request for decode and batches")
    ap.add_argument("--prefill-len", type=int, default=128, help="real: prompt tokens of the prefill measurement")
    ap.add_argument("--hf-bf16", action="store_true", help="real: also transformers in bf16")
    ap.add_argument("--side-timeout", type=float, default=900, help="real: seconds one side's process may take")
    ap.add_argument("--tmp", default=None, help="real: where to write the checkpoints (default: the system's tmp)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32], help="real worker: batch sizes")
    ap.add_argument("--_real", nargs=3, metavar=("SHAPE", "SIDE", "CKPT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args._real:
        shape, side, ckpt = args._real
        res = real_worker(shape, side, ckpt, args.threads, args.new_tokens, args.prefill_len, args.batches, args.seed)
        print(RESULT + json.dumps(res), flush=True)
        return
    run = Run("engine" if args.workload == "tiny" else "engine_real", threads=args.threads, args=vars(args))
    if args.workload == "tiny":
        peak = sgemm_gflops()
        print(f"sgemm fp32 1024^3: {peak:.1f} GFLOP/s on {args.threads} thread(s)")
        bench_tiny(args, run, Tokenizer.builtin(), peak)
    else:
        bench_real(args, run)


if __name__ == "__main__":
    main()
