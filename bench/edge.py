"""Edge benchmark: qiusuo's engine in fp32, bf16, int8, int8-dynamic and int4 against llama.cpp measured with its own tools.

    python bench/edge.py [--shapes smollm2-135m qwen2.5-0.5b] [--repeats 3] [--batches 8 16 32] [--threads 1] [--new-tokens 32]
        [--variants fp32 bf16 int8 int4+compile ...] [--gguf f32 f16 q8_0 q4_0]

A qiusuo variant is a precision (fp32, bf16, int8, int8-dynamic, int4), with "+compile" for
`compile=True` (its compile time is in the load time; later repeats reuse inductor's on-disk cache,
as a user's second start does). By default bf16 and the f16 GGUF run only where the CPU has native
bf16 (AVX512-BF16 / AMX, `cpu_has_native_bf16`); on AMX-BF16 qiusuo's bf16 runs on prepacked oneDNN
weights (qiusuo/model/packed.py).

Model shapes are the config.json values of SmolLM2-135M and Qwen2.5-0.5B (bench/engine.py's
REAL_SHAPES) with random weights, saved by qiusuo and exported to GGUF by qiusuo's exporter
(f32, q8_0, q4_0; f16 only where the CPU has native bf16 - not on AVX2 machines).

llama.cpp is measured as its users measure it, by its own tools built from the source that the
installed llama-cpp-python vendors (same version, so the GGUF files are read by the same loader):
`llama-bench` (prefill `-p`, single-stream decode `-n`) and `llama-batched-bench` (`-npl 1,8,16,32`
parallel sequences, 16-token prompts, `--new-tokens` each), with flash attention off and on. The
tools are built on first use into `--llama-build` (default ~/.cache/qiusuo-bench/llama.cpp-build) with
cmake, from `--llama-sdist` (default: the sdist that `pip download` fetches for the installed
version); the build's path is printed. No prefix cache on either side: llama-batched-bench's
prompts are not shared (no `-pps`) and qiusuo runs with `enable_prefix_caching=False`.

qiusuo is measured by bench/engine.py's real-shape worker, one process per side and repeat: load
time, prefill tokens/s (one 128-token prompt), single-stream decode tokens/s (prefill subtracted),
batch-B tokens/s = B x new tokens / wall time of `LLM.generate` (prefill of the 16-token prompts
included), peak RSS. The llama.cpp figures in the same columns are llama-bench's pp and tg rates and
llama-batched-bench's pl x tg / t (its t includes the prompts' prefill too); peak RSS is the tool
process's (`wait4`); load time is llama-cpp-python's `Llama()` on the same file (mmap, as the tools).

Correctness: qiusuo fp32's first 16 greedy tokens equal llama.cpp f32's (llama-cpp-python, same
prompt ids), asserted. Results: bench/results/edge-*.json via results.Run; `python bench/tables.py`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import REAL_SHAPES, RESULT, qiusuo_side_options  # noqa: E402
from results import Run, alternating, hwm_mb, median  # noqa: E402

from qiusuo.export import export_gguf  # noqa: E402
from qiusuo.model import ModelConfig, Transformer, save_model  # noqa: E402
from qiusuo.model.quantize import cpu_has_native_bf16  # noqa: E402
from qiusuo.tokenizer import Tokenizer  # noqa: E402

CHECKED = 16
QIUSUO = ("fp32", "int8", "int8-dynamic", "int4")  # on every CPU
QIUSUO_BF16 = ("bf16",)  # where the CPU has native bf16
GGUF = ("f32", "q8_0", "q4_0")
GGUF_BF16 = ("f16",)  # llama.cpp's half-precision file, paired with qiusuo bf16
# matched precision: a qiusuo precision (eager or +compile) / a GGUF type
PAIRS = (("fp32", "f32"), ("bf16", "f16"), ("int8", "q8_0"), ("int8-dynamic", "q8_0"), ("int4", "q4_0"))


def precision(variant: str) -> str:
    """A variant's precision: "int4+compile" -> "int4" (the pair it is judged in)."""
    return variant.removesuffix("+compile")
TOOLS = ("llama-bench", "llama-batched-bench")
ENGINE = Path(__file__).resolve().parent / "engine.py"


# ---------------------------------------------------------------------- llama.cpp's tools
def build_llama_cpp(build: Path, sdist: Path | None) -> Path:
    """The bin directory holding llama-bench and llama-batched-bench: `build` is cmake's build
    directory (its `bin/` holds the tools); built on first use from the llama-cpp-python sdist of the
    installed version, unpacked next to it (`<build>-src`)."""
    bin_dir = build / "bin"
    if all((bin_dir / t).exists() for t in TOOLS):
        return bin_dir
    version = importlib.metadata.version("llama_cpp_python")
    src = build.parent / f"{build.name}-src"
    src.mkdir(parents=True, exist_ok=True)
    if sdist is None:  # the source of the installed wheel: same llama.cpp, same GGUF loader
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama_cpp_python=={version}", "--no-binary",
                        ":all:", "--no-deps", "-d", str(src)], check=True)
        sdist = next(src.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not any(src.glob("*/vendor/llama.cpp")):
        with tarfile.open(sdist) as tar:
            tar.extractall(src, filter="data")
    source = next(src.glob("*/vendor/llama.cpp"))
    print(f"building llama.cpp's {', '.join(TOOLS)} from {source} into {bin_dir} (minutes)", flush=True)
    nice = ["nice", "-n", "19"] if shutil.which("nice") else []
    subprocess.run([*nice, "cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                    "-DBUILD_SHARED_LIBS=OFF"], check=True)
    subprocess.run([*nice, "cmake", "--build", str(build), "-j", str(min(2, os.cpu_count() or 1)),
                    "--target", *TOOLS], check=True)
    return bin_dir


def run_tool(cmd: list[str], timeout: float) -> tuple[str, float]:
    """(stdout, peak RSS MiB of the tool's process). The peak is the tool's VmHWM, sampled until it
    exits (wait4's ru_maxrss would include this Python process's RSS at the fork: results.hwm_mb)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as errf:  # files: a full pipe cannot stall the tool
        proc = subprocess.Popen(cmd, stdout=out, stderr=errf)
        deadline = time.monotonic() + timeout
        peak = None
        while True:
            hwm = hwm_mb(proc.pid)  # monotonic while the tool runs; the last sample before it exits is its peak
            peak = hwm if hwm is not None and (peak is None or hwm > peak) else peak
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise TimeoutError(f"{Path(cmd[0]).name} ran over {timeout:.0f} s")
            time.sleep(0.01)
        proc.returncode = os.waitstatus_to_exitcode(status)
        errf.seek(0)
        err = errf.read().decode(errors="replace")
        out.seek(0)
        text = out.read().decode()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err[-2000:]}")
    return text, peak if peak is not None else usage.ru_maxrss / 1024


SEGFAULT = "(-11)"  # run_tool's error for a tool killed by SIGSEGV


def llama_side(bin_dir: Path, gguf: Path, threads: int, prefill_len: int, new_tokens: int, fa: int,
               timeout: float, batches: list[int], repack: bool = True) -> dict:
    """llama-bench's pp/tg rates and llama-batched-bench's batch rates for one file, flash attention fa.

    repack=False runs the tools with `--repack 0` / `--no-repack`: the weights stay in the file's
    layout instead of going to llama.cpp's extra CPU buffer types (AMX, interleaved repacks). On a
    Sapphire Rapids class Xeon the AMX one segfaults in `ggml_backend_amx_mul_mat` (q8_0 and q4_0,
    llama.cpp of llama-cpp-python 0.3.36; upstream ggml-org/llama.cpp#20824, closed unfixed), so
    `with_repack_fallback` retries a segfaulting file this way and the result records it."""
    no_repack_bench, no_repack_batched = ([], []) if repack else (["--repack", "0"], ["--no-repack"])
    text, rss1 = run_tool([str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", str(prefill_len), "-n", str(new_tokens),
                           "-t", str(threads), "-fa", str(fa), "-r", "1", "-ngl", "0", "-o", "json", *no_repack_bench],
                          timeout)
    rows = json.loads(text)
    out = {"prefill_tok_s": next(r["avg_ts"] for r in rows if r["n_prompt"] and not r["n_gen"]),
           "decode_tok_s": next(r["avg_ts"] for r in rows if r["n_gen"] and not r["n_prompt"])}
    ctx = max(batches) * (16 + new_tokens) + 64
    text, rss2 = run_tool([str(bin_dir / "llama-batched-bench"), "-m", str(gguf), "-c", str(ctx), "-b", "2048",
                           "-ub", "512", "-npp", "16", "-ntg", str(new_tokens), "-npl", ",".join(map(str, batches)),
                           "-t", str(threads), "-tb", str(threads), "-fa", "on" if fa else "off", "-ngl", "0",
                           "--output-format", "jsonl", *no_repack_batched], timeout)
    for line in text.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            out[f"batch{r['pl']}_tok_s"] = r["pl"] * r["tg"] / r["t"]  # generated tokens over prefill + decode
            out[f"batch{r['pl']}_decode_only_tok_s"] = r["speed_tg"]
    out["peak_rss_mb"] = max(rss1, rss2)
    out["repack"] = repack
    return out


def with_repack_fallback(side, no_repack: set[str], dtype: str) -> dict:
    """`side(repack)` with llama.cpp's default repacking; a GGUF type whose tools segfault with it (the
    AMX buffer type, see `llama_side`) is rerun without, and stays without for the rest of the run."""
    if dtype not in no_repack:
        try:
            return side(True)
        except RuntimeError as e:
            if SEGFAULT not in str(e):
                raise
            print(f"llama.cpp {dtype}: segfault with weight repacking (AMX buffer type); rerun with --repack 0",
                  flush=True)
            no_repack.add(dtype)
    return side(False)


def llama_load_and_greedy(gguf: Path, prompt: list[int], threads: int) -> tuple[float, list[int]]:
    """(seconds to load the file in llama-cpp-python, its first CHECKED greedy tokens for `prompt`)."""
    code = ("import json, sys, time, llama_cpp\n"
            "t = time.perf_counter()\n"
            f"llm = llama_cpp.Llama({str(gguf)!r}, n_ctx=256, n_threads={threads}, verbose=False)\n"
            "load = time.perf_counter() - t\n"
            "toks = []\n"
            f"for tok in llm.generate({prompt!r}, temp=0.0, top_k=1, reset=True):\n"
            "    toks.append(tok)\n"
            f"    if len(toks) == {CHECKED}: break\n"
            "print(json.dumps([load, toks]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"llama-cpp-python on {gguf} failed: {proc.stderr[-2000:]}")
    load, toks = json.loads(proc.stdout.strip().splitlines()[-1])
    return load, toks


# ---------------------------------------------------------------------- qiusuo
def qiusuo_side(shape: str, variant: str, ckpt: Path, args) -> dict:
    cmd = [sys.executable, str(ENGINE), "--_real", shape, f"qiusuo {variant}", str(ckpt), "--threads",
           str(args.threads), "--new-tokens", str(args.new_tokens), "--prefill-len", str(args.prefill_len),
           "--batches", *map(str, args.batches), "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.side_timeout)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT)]
    if proc.returncode or not lines:
        raise RuntimeError(f"qiusuo {variant} on {shape} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


def greedy_reference(res: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, first CHECKED tokens) of a worker's single stream, popped from its result; the
    worker's "single" entry holds one row (the stream), as its batch entries hold B rows."""
    tokens, prompt = res.pop("tokens"), res.pop("single_prompt")
    (row,) = tokens["single"]
    return prompt, row[:CHECKED]


def build_shape(shape: str, directory: Path, seed: int, gguf_types) -> tuple[Path, dict[str, Path], int]:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**REAL_SHAPES[shape])).eval()
    model.reset_parameters(seed=seed)
    tok = Tokenizer.builtin()  # GGUF carries a tokenizer; the bench feeds token ids, so any fits
    ckpt = save_model(model, tok, directory / shape)
    ggufs = {dt: export_gguf(model, tok, directory / f"{shape}-{dt}.gguf", dtype=dt) for dt in gguf_types}
    return ckpt, ggufs, model.num_parameters()


# ---------------------------------------------------------------------- main


def bench_shape(shape: str, args, run: Run, bin_dir: Path | None) -> None:
    KEYS = ["load_s", "prefill_tok_s", "decode_tok_s"] + [f"batch{b}_tok_s" for b in args.batches] + ["peak_rss_mb"]
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        # f32 always: the greedy check's reference, also when its speed is not measured (--gguf without f32)
        ckpt, ggufs, params = build_shape(shape, Path(tmp), args.seed, dict.fromkeys(["f32", *args.gguf]))
        print(f"{shape}: {params / 1e6:.1f} M parameters; GGUF sizes "
              + ", ".join(f"{dt} {p.stat().st_size / 2**20:.0f} MiB" for dt, p in ggufs.items()), flush=True)
        sides = [f"qiusuo {v}" for v in args.variants]
        if bin_dir is not None:
            sides += [f"llama.cpp {dt} fa{fa}" for dt in args.gguf for fa in args.flash_attn]
        got: dict[str, list[dict]] = {s: [] for s in sides}
        loads: dict[str, float] = {}
        no_repack: set[str] = set()  # GGUF types whose llama.cpp tools run with --repack 0 (with_repack_fallback)
        reference = None
        for r, side in alternating(sides, args.repeats):
            engine, name = side.split(" ", 1)
            try:
                if engine == "qiusuo":
                    res = qiusuo_side(shape, name, ckpt, args)
                    res.pop("shape"), res.pop("side")  # the worker echoes them; the record names them below
                    single = greedy_reference(res)
                    if name == "fp32" and reference is None:
                        reference = single
                else:
                    dt, fa = name.split(" fa")
                    res = with_repack_fallback(
                        lambda repack: llama_side(bin_dir, ggufs[dt], args.threads, args.prefill_len, args.new_tokens,
                                                  int(fa), args.side_timeout, args.batches, repack), no_repack, dt)
                    if dt not in loads:
                        loads[dt] = llama_load_and_greedy(ggufs[dt], [1], args.threads)[0]
                    res["load_s"] = loads[dt]
            except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as e:  # recorded; the other sides still run
                print(f"{shape} repeat {r}: {side} failed: {str(e)[-300:]}", flush=True)
                run.add(shape=shape, side=side, repeat=r, error=str(e)[-1000:])
                continue
            got[side].append(res)
            run.add(shape=shape, side=side, repeat=r, load_avg=os.getloadavg()[0], **res)
            print(f"{shape} repeat {r}: {side:<24} " + ", ".join(f"{k} {res.get(k, float('nan')):.1f}" for k in KEYS),
                  flush=True)
        agree = None
        if reference is not None and bin_dir is not None:  # qiusuo fp32 vs llama.cpp f32, same prompt ids, greedy
            _, theirs = llama_load_and_greedy(ggufs["f32"], reference[0], args.threads)
            agree = theirs == reference[1]
            run.add(shape=shape, check="greedy f32", qiusuo=reference[1], llama_cpp=theirs, equal=agree)
        med = {s: {k: median([x[k] for x in got[s] if k in x]) for k in KEYS} for s in sides if got[s]}
        cols = ["side", "load s", "prefill tok/s", "decode tok/s B=1"] + [f"B={b} tok/s" for b in args.batches] \
            + ["peak RSS MiB"]
        rows = [[s] + [round(med[s][k], 2 if k == "load_s" else 1) for k in KEYS] if s in med
                else [f"{s} (failed)"] + [None] * len(KEYS) for s in sides]
        run.table(f"edge {shape}: {params / 1e6:.0f} M parameters, random weights, {args.threads} thread(s) "
                  f"(medians of {args.repeats})", cols, rows,
                  note=f"prefill: one {args.prefill_len}-token prompt; B=1 decode: {args.new_tokens} tokens, prefill "
                       f"excluded (llama-bench tg{args.new_tokens}); B={'/'.join(map(str, args.batches))}: 16-token prompts + {args.new_tokens} new "
                       "tokens each, generated tokens / wall time with prefill included (llama-batched-bench pl*tg/t); "
                       "no prefix cache on either side; faN = llama.cpp flash attention off/on. "
                       + (f"llama.cpp {', '.join(sorted(no_repack))} ran with --repack 0 (weight repacking into its "
                          "AMX buffer segfaulted, ggml-org/llama.cpp#20824). " if no_repack else "")
                       + f"Greedy tokens qiusuo fp32 == llama.cpp f32 for the first {CHECKED}: {agree}.")
        ratio_rows = []
        ratio_keys = ["prefill_tok_s", "decode_tok_s"] + [f"batch{b}_tok_s" for b in args.batches]
        for q, g in PAIRS + (("best", "best"),):
            qs = [f"qiusuo {v}" for v in args.variants if q in ("best", precision(v))]
            ls = [f"llama.cpp {g} fa{fa}" for fa in args.flash_attn] if g != "best" else \
                [f"llama.cpp {d} fa{fa}" for d in args.gguf for fa in args.flash_attn]
            qs, ls = [s for s in qs if s in med], [s for s in ls if s in med]
            if not qs or not ls:
                continue
            row = [f"{q} / {g}"]
            for k in ratio_keys:
                row.append(round(max(med[s][k] for s in qs) / max(med[s][k] for s in ls), 2))
            ratio_rows.append(row)
        run.table(f"edge {shape}: qiusuo / llama.cpp (best flash-attention setting), higher is better",
                  ["pair", "prefill", "B=1 decode"] + [f"B={b}" for b in args.batches], ratio_rows,
                  note="each figure: the best qiusuo variant of the precision (eager or +compile) over "
                       "the better llama.cpp flash-attention setting; issue 15's targets: int8 / q8_0 >= 1.0, "
                       "int4 / q4_0 >= 0.8 at B=1 and B=16.")
        run.save()  # after every shape: a later shape that runs out of time keeps the earlier ones
        # asserted after saving, so the figures of a failing run stay on file for the diagnosis
        assert agree is not False, f"{shape}: llama.cpp f32 greedy tokens {theirs} != qiusuo fp32 {reference[1]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b"],
                    choices=["smollm2-135m", "qwen2.5-0.5b"])
    ap.add_argument("--variants", nargs="+", default=None,
                    help="qiusuo variants: fp32, bf16, int8, int8-dynamic, int4, any with +compile "
                         f"(default: {' '.join(QIUSUO)}, and {' '.join(QIUSUO_BF16)} where the CPU has native bf16)")
    ap.add_argument("--gguf", nargs="+", default=None, choices=list(GGUF + GGUF_BF16),
                    help=f"llama.cpp files (default: {' '.join(GGUF)}, and {' '.join(GGUF_BF16)} with native bf16)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="threads on both sides")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32],
                    help="parallel sequences of the batch measurements (B=1 is always measured)")
    ap.add_argument("--flash-attn", type=int, nargs="+", default=[0, 1], choices=[0, 1],
                    help="llama.cpp flash attention settings measured (the ratios take the better one)")
    ap.add_argument("--prefill-len", type=int, default=128)
    ap.add_argument("--side-timeout", type=float, default=1200, help="seconds one side's process may take")
    ap.add_argument("--llama-build", type=Path, default=Path.home() / ".cache" / "qiusuo-bench" / "llama.cpp-build",
                    help="cmake build directory of llama.cpp's tools (<dir>/bin; built there on first use)")
    ap.add_argument("--llama-sdist", type=Path, default=None,
                    help="llama_cpp_python sdist of the installed version (default: pip download it)")
    ap.add_argument("--tmp", default=None, help="where to write checkpoints and GGUF files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--llama", action=argparse.BooleanOptionalAction, default=True,
                    help="run the llama.cpp sides (--no-llama: qiusuo's only, e.g. while the tools build)")
    args = ap.parse_args()
    native = cpu_has_native_bf16()
    if args.variants is None:
        args.variants = list(QIUSUO[:1] + (QIUSUO_BF16 if native else ()) + QIUSUO[1:])
    if args.gguf is None:
        args.gguf = list(GGUF[:1] + (GGUF_BF16 if native else ()) + GGUF[1:])
    for v in args.variants:
        qiusuo_side_options(f"qiusuo {v}")  # a ValueError naming the variant before anything is built
    bin_dir = build_llama_cpp(args.llama_build, args.llama_sdist) if args.llama else None
    print(f"llama.cpp tools: {bin_dir}; native bf16: {cpu_has_native_bf16()} (bf16 pairs run only where it is)",
          flush=True)
    run = Run("edge", threads=args.threads, args={**vars(args), "llama_build": str(args.llama_build)})
    for shape in args.shapes:
        bench_shape(shape, args, run, bin_dir)


if __name__ == "__main__":
    main()
