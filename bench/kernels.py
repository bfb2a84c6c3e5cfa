"""Which matmul kernel serves a decode step fastest on this CPU: one step's matmuls at batch M, by kernel.

    python bench/kernels.py [--shape smollm2-135m] [--batches 1 16] [--threads 1] [--repeats 5]

A real config.json shape's (bench/engine.py's REAL_SHAPES) decoder matrices as the engine runs them
(q/k/v fused, gate/up fused, o, down; every layer its own weights, so they stream from memory as in
the model) plus the output head, random weights, timed in process CPU time (steadier than wall time
on a shared machine), medians of --repeats, the kernels interleaved. Kernels:

- fp32: `F.linear` (MKL sgemm).
- bf16: `F.linear` on bf16 weights and activations (oneDNN; on AMX-BF16 its AMX matmul, which
  reorders the plain weight into its tile layout on every call).
- bf16 prepacked: the weight reordered once (`qiusuo.model.packed.PackedLinear`, what `LLM` uses for
  bf16 on AMX-BF16 CPUs).
- int8 weight-only: `_weight_int8pack_mm` with bf16 activations (`quantization="int8"`).
- int8 -> bf16 dequant: the int8 weight converted to bf16 per call, then a bf16 matmul (scale after).
- int8-dynamic fbgemm: `quantized::linear_dynamic` on fbgemm's packed weight (`quantization="int8-dynamic"`;
  8-bit activations where the CPU has AVX512-VNNI, else 7).
- int8-dynamic onednn: the same op on oneDNN's packed weight (AMX-INT8 where the CPU has it).
- int4: `_weight_int4pack_mm_for_cpu`, groups of 32, bf16 activations (`quantization="int4"`).

The head is int8 in every int4 and int8 variant, as quantize.py keeps it. The CPU's relevant flags,
torch's CPU capability and the ISA oneDNN reports are recorded with the results (bench/results/kernels-*.json).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import REAL_SHAPES  # noqa: E402
from results import Run, median  # noqa: E402

from qiusuo.model.packed import PackedLinear, cpu_has_amx_bf16  # noqa: E402
from qiusuo.model.quantize import cpu_has_native_bf16, cpu_has_vnni, make_weight, quantize_per_channel  # noqa: E402

KERNELS = ("fp32", "bf16", "bf16 prepacked", "int8 weight-only", "int8 -> bf16 dequant", "int8-dynamic fbgemm",
           "int8-dynamic onednn", "int4")


def onednn_dynamic(w: torch.Tensor):
    q, scale = quantize_per_channel(w)
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "onednn"  # the packed weight's type decides the kernel at call time
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            qt = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(len(scale), dtype=torch.int64), 0)
        packed = torch.ops.quantized.linear_prepack(qt, None)
    finally:
        torch.backends.quantized.engine = engine
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed, False)


def build(kernel: str, w: torch.Tensor, head: bool):
    """x (M, K) fp32 -> y (M, N), as the engine's layer for `kernel` would compute it."""
    if kernel == "fp32":
        return lambda x: F.linear(x, w)
    if kernel == "bf16":
        wb = w.bfloat16()
        return lambda x: F.linear(x.bfloat16(), wb)
    if kernel == "bf16 prepacked":
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16)
        lin.weight.data = w.bfloat16()
        p = PackedLinear([lin])
        return lambda x: p(x.bfloat16())
    if kernel == "int8 -> bf16 dequant":
        m = make_weight(w, "int8")
        return lambda x: F.linear(x.bfloat16(), m.qweight.to(torch.bfloat16)) * m.scale_bf16
    if kernel == "int8-dynamic onednn":
        return onednn_dynamic(w)
    mode = {"int8 weight-only": "int8", "int8-dynamic fbgemm": "int8-dynamic", "int4": "int4"}[kernel]
    return make_weight(w, "int8" if head and mode == "int4" else mode)


def step_shapes(cfg: dict) -> list[tuple[int, int]]:
    D, I = cfg["hidden_size"], cfg["intermediate_size"]
    hd = D // cfg["num_attention_heads"]
    return [((cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * hd, D), (D, D), (2 * I, D), (D, I)]


def random_weights(cfg: dict, g: torch.Generator) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
    """fp32 random weights of one decode step's matrices, every layer its own, and the output head's."""
    weights = [[torch.randn(N, K, generator=g) * 0.02 for N, K in step_shapes(cfg)]
               for _ in range(cfg["num_hidden_layers"])]
    return weights, torch.randn(cfg["vocab_size"], cfg["hidden_size"], generator=g) * 0.02


def time_matmuls(kernel: str, weights: list[list[torch.Tensor]], head_w: torch.Tensor, cfg: dict,
                 batches: list[int], repeats: int, g: torch.Generator) -> dict[int, list[float]]:
    """Process CPU ms of one step's matmuls (every layer's, then the head) with `kernel`, `repeats` times
    per batch size M after an untimed warm-up pass (first-call allocations)."""
    shapes, D = step_shapes(cfg), cfg["hidden_size"]
    layers = [[build(kernel, w, False) for w in lw] for lw in weights]
    head = build(kernel, head_w, True)
    times: dict[int, list[float]] = {}
    for M in batches:
        xs = {K: torch.randn(M, K, generator=g) for K in (D, cfg["intermediate_size"])}
        times[M] = []
        for r in range(repeats + 1):
            t = time.process_time()
            for layer in layers:
                for f, (N, K) in zip(layer, shapes):
                    f(xs[K])
            head(xs[D])
            if r:
                times[M].append((time.process_time() - t) * 1e3)
    return times


def onednn_isa() -> str:
    """The ISA line oneDNN prints for a bf16 matmul here (ONEDNN_VERBOSE), e.g. brg_matmul:avx10_1_512_amx."""
    code = ("import torch, torch.nn.functional as F; torch.set_num_threads(1); "
            "F.linear(torch.randn(4, 64, dtype=torch.bfloat16), torch.randn(64, 64, dtype=torch.bfloat16))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "ONEDNN_VERBOSE": "1"}).stdout
    return next((x.split(",")[6] for x in out.splitlines() if ",exec,cpu,matmul," in x), "no oneDNN matmul")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m", choices=["smollm2-135m", "qwen2.5-0.5b"])
    ap.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = REAL_SHAPES[args.shape]
    isa = onednn_isa()
    run = Run("kernels", threads=args.threads, args=vars(args))
    g = torch.Generator().manual_seed(0)
    weights, head_w = random_weights(cfg, g)
    times: dict[tuple[str, int], list[float]] = {}
    for kernel in args.kernels:  # built one at a time (the Qwen2.5-0.5B shape's weights are 2 GB in fp32)
        for M, ms in time_matmuls(kernel, weights, head_w, cfg, args.batches, args.repeats, g).items():
            times[(kernel, M)] = ms
            run.add(kernel=kernel, batch=M, cpu_ms=ms, load_avg=os.getloadavg()[0])
            print(f"{kernel:<22} M={M:<3} {median(ms):8.1f} ms CPU per step (load {os.getloadavg()[0]:.1f})", flush=True)
    base = {M: median(times[("fp32", M)]) for M in args.batches} if "fp32" in args.kernels else None
    rows = []
    for k in args.kernels:
        row = [k] + [round(median(times[(k, M)]), 1) for M in args.batches]
        if base:
            row += [round(base[M] / median(times[(k, M)]), 2) for M in args.batches]
        rows.append(row)
    cols = ["kernel"] + [f"M={M} ms" for M in args.batches] + ([f"M={M} vs fp32" for M in args.batches] if base else [])
    run.table(f"kernels {args.shape}: one decode step's matmuls (layers + head), process CPU ms, {args.threads} "
              f"thread(s), medians of {args.repeats}", cols, rows,
              note=f"oneDNN's bf16 matmul here: {isa}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}; "
                   f"native bf16 {cpu_has_native_bf16()}, AMX-BF16 {cpu_has_amx_bf16()}, AVX512-VNNI {cpu_has_vnni()} "
                   "(read from /proc/cpuinfo). Weights cold: every layer its own.")
    run.save()


if __name__ == "__main__":
    main()
