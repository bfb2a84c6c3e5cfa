"""Serving benchmark: 1, 8 and 32 concurrent streaming clients over loopback against `qiusuo serve`'s
app on the tiny presets, compared with the offline engine (`LLM.chat`) on the same requests.

Per level: TTFT p50/p99 (request sent -> first streamed token), time per output token (mean gap
after the first), output tokens/s, errors, and served / offline throughput. The offline run uses
the same prompts, the same sampling (seeded, ignore_eos, fixed max_tokens: the same tokens)
and the same concurrency cap (`max_num_seqs` = clients), so the ratio is the cost of serving
(HTTP, SSE, JSON, the hand-off to the engine), not a difference in batching.

The server runs in a subprocess (as in production: the client's own work must not share its GIL);
the clients are a minimal asyncio HTTP/1.1 client in this process. The server's engine steps in
its own engine-core process by default (`--engine-process`, as `qiusuo serve`), or on a thread of
the API process (`--no-engine-process`); `--both-modes` runs a server of each kind and measures
both against the same offline runs. CPU per token is reported for the API process and the
engine process separately, and it leads the report: the served side spends CPU in two processes
(API and engine core) while the offline engine runs on one thread, so CPU per token is the
like-for-like cost; wall-clock rates follow. Each level alternates served and offline runs
`--repeats` times (order reversed on odd repeats) and reports medians. Prefix caching is off on
both sides, so no repeat reuses KV from an earlier one. Every request's token count and its
streamed text (reasoning and content deltas joined) are asserted equal to the offline engine's.
Results go to bench/results/serve-*.json. Ends with one JSON line.

    python bench/serve.py                       # both presets, 1/8/32 clients
    python bench/serve.py --presets tiny-moe --levels 32 --max-tokens 32 --both-modes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results import Run, alternating, median  # noqa: E402

THINK = ("<think>", "</think>")  # tag tokens: the served stream splits on them and drops their text


def build_engine(preset: str, threads: int, max_num_seqs: int):
    """A fresh tiny model and its engine (module level: the engine process unpickles it by name)."""
    import torch

    from qiusuo.engine import EngineConfig, LLMEngine
    from qiusuo.model import build_model

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model, tok = build_model(preset, seed=0)
    model.eval()  # as a loaded checkpoint is; in train mode every served step pays a train/eval switch
    return LLMEngine(model, tok, EngineConfig(num_threads=threads, max_num_seqs=max_num_seqs,
                                              kv_cache_bytes=256 << 20, enable_prefix_caching=False))


def serve_main(preset: str, port: int, threads: int, max_num_seqs: int, engine_process: bool) -> None:
    """The server subprocess: the engine (built here, or in its engine process), uvicorn on loopback."""
    import functools

    from qiusuo.serve import create_app
    from qiusuo.serve.server import run

    load = functools.partial(build_engine, preset, threads, max_num_seqs)
    engine = load if engine_process else load()
    run(create_app(engine, served_model_name=preset, max_queue=4096, engine_process=engine_process),
        host="127.0.0.1", port=port, log_level="warning")


def make_messages(n: int, seed: int = 0) -> list[list[dict]]:
    import random

    rng = random.Random(seed)
    return [[{"role": "user", "content": f"{rng.randint(100, 999)}+{rng.randint(100, 999)}="
              + " please" * rng.randint(0, 6)}] for _ in range(n)]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def sampling(seed: int, max_tokens: int) -> dict:
    """Seeded sampling (greedy on random weights repeats one special token, which streams no text),
    special tokens kept as text, eos ignored: every request yields exactly max_tokens tokens, the same
    ones served and offline."""
    return {"temperature": 1.0, "seed": seed, "max_tokens": max_tokens, "ignore_eos": True,
            "skip_special_tokens": False}


async def one_request(host: str, port: int, model: str, messages, seed: int, max_tokens: int) -> dict:
    """One streamed chat completion over a raw HTTP/1.1 connection: a minimal client (chunked
    transfer decoding and SSE lines only), so the client's own CPU use stays small on 2 cores."""
    body = json.dumps({"model": model, "messages": messages, **sampling(seed, max_tokens), "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        status = (await reader.readline()).split()[1]
        while (await reader.readline()) not in (b"\r\n", b""):
            pass  # headers (uvicorn streams with Transfer-Encoding: chunked)
        if status != b"200":
            raise RuntimeError(f"HTTP {status.decode()}: {(await reader.read(300)).decode(errors='replace')}")
        first = last = None
        tokens, buffer, text = 0, b"", []
        while True:
            size = int((await reader.readline()).strip() or b"0", 16)
            if size == 0:
                break
            buffer += (await reader.readexactly(size + 2))[:-2]
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if not event.startswith(b"data: ") or event == b"data: [DONE]":
                    continue
                chunk = json.loads(event[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
                piece = (delta.get("reasoning_content") or "") + (delta.get("content") or "")
                if piece:  # random weights may "think": a delta carries one of the two
                    text.append(piece)
                    last = time.perf_counter()
                    first = first or last
    finally:
        writer.close()
    if first is None:
        raise RuntimeError("no token streamed")
    return {"ttft": first - t0, "tpot": (last - first) / max(tokens - 1, 1), "tokens": tokens, "seed": seed,
            "text": "".join(text)}


async def run_level(host: str, port: int, model: str, clients: int, requests: list, max_tokens: int) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    for i, m in enumerate(requests):
        queue.put_nowait((i, m))
    results, errors = [], []

    async def worker():
        while not queue.empty():
            seed, messages = queue.get_nowait()
            try:
                results.append(await one_request(host, port, model, messages, seed, max_tokens))
            except (OSError, RuntimeError, ValueError, asyncio.IncompleteReadError) as e:
                errors.append(repr(e))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "errors": len(errors),
            "error_examples": errors[:3],
            "per_request": {r["seed"]: (r["tokens"], r["text"]) for r in results},
            "ttft_p50_ms": 1e3 * pct([r["ttft"] for r in results], 0.5),
            "ttft_p99_ms": 1e3 * pct([r["ttft"] for r in results], 0.99),
            "tpot_ms": 1e3 * statistics.fmean([r["tpot"] for r in results]) if results else float("nan")}


class Offline:
    """The offline engine on the same requests, with the same concurrency cap."""

    def __init__(self, preset: str, threads: int):
        import torch

        from qiusuo.engine import LLM
        from qiusuo.model import build_model

        torch.manual_seed(0)
        self.model, self.tok = build_model(preset, seed=0)
        self.threads, self.LLM = threads, LLM

    def run(self, clients: int, requests: list, max_tokens: int) -> dict:
        from qiusuo.engine import SamplingParams

        llm = self.LLM(self.model, self.tok, num_threads=self.threads, max_num_seqs=clients,
                       kv_cache_bytes=256 << 20, enable_prefix_caching=False)
        params = [SamplingParams(**sampling(seed, max_tokens)) for seed in range(len(requests))]
        llm.chat(requests[:2], params[:2])  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        outs = llm.chat(requests, params)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        tokens = sum(o.num_completion_tokens for o in outs)
        # The served stream carries no tag text: its reasoning and content deltas, joined in order,
        # are the offline text with the think tags taken out.
        per_request = {i: (o.num_completion_tokens, o.outputs[0].text.replace(THINK[0], "").replace(THINK[1], ""))
                       for i, o in enumerate(outs)}
        return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "cpu_s": cpu,
                "per_request": per_request}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_process_pid(pid: int) -> int:
    """The server's engine process: its child started by multiprocessing's spawn (the other child,
    multiprocessing's resource tracker, sleeps)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in f.read().split():
                with open(f"/proc/{child}/cmdline", "rb") as c:
                    if b"spawn_main" in c.read():
                        found.append(int(child))
    assert len(found) == 1, f"expected one engine process under {pid}, found {found}"
    return found[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server subprocess (API process, plus its engine process in engine-process mode)."""

    def __init__(self, preset: str, threads: int, max_num_seqs: int, engine_process: bool):
        self.mode = "process" if engine_process else "thread"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, __file__, "--_serve", preset, "--_port", str(self.port),
                                      "--threads", str(threads), "--_max_num_seqs", str(max_num_seqs),
                                      "--engine-process" if engine_process else "--no-engine-process"], env=env)
        self.engine_pid: int | None = None

    def wait_ready(self, timeout: float = 600) -> None:  # a loaded 2-core machine starts the engine slowly
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {self.mode}-mode server subprocess did not come up")
            time.sleep(0.1)
        if self.mode == "process":
            self.engine_pid = engine_process_pid(self.proc.pid)

    def cpu(self) -> tuple[float, float]:
        """(API process, engine process) CPU seconds so far; the engine's is 0 in thread mode."""
        return cpu_seconds(self.proc.pid), cpu_seconds(self.engine_pid) if self.engine_pid else 0.0

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # the bench must not leave a server behind
            self.proc.wait(timeout=30)


def check_same(preset: str, clients: int, mode: str, served: dict, offline: dict, requests: int,
               max_tokens: int) -> None:
    """Served and offline runs produced the same tokens: every request's count, and its text."""
    got, want = served["per_request"], offline["per_request"]
    assert len(got) == len(want) == requests, (
        f"[{preset}, {mode}] {clients} clients: {len(got)} served and {len(want)} offline results for {requests} requests")
    for i in sorted(want):
        (n, text), (n_off, text_off) = got[i], want[i]
        assert n == n_off == max_tokens, (
            f"[{preset}, {mode}] request {i}: {n} tokens served, {n_off} offline, {max_tokens} requested")
        assert text == text_off, f"[{preset}, {mode}] request {i}: streamed text {text!r} != offline text {text_off!r}"


def bench_preset(preset: str, levels: list[int], per_client: int, max_tokens: int, threads: int,
                 time_limit: float, repeats: int, modes: list[bool], run: Run) -> list[dict]:
    servers = [Server(preset, threads, max(levels), engine_process) for engine_process in modes]
    rows = []
    offline = Offline(preset, threads)
    try:
        for server in servers:
            server.wait_ready()
        started = time.monotonic()
        for clients in levels:
            if time.monotonic() - started > time_limit:
                print(f"[{preset}] time limit reached; skipping {clients} clients", file=sys.stderr)
                continue
            requests = make_messages(clients * per_client, seed=clients)
            for server in servers:  # warm-up, on other prompts
                asyncio.run(run_level("127.0.0.1", server.port, preset, clients, make_messages(clients, seed=999), 8))
            # Served and offline alternate (served first on even repeats, offline first on odd ones) and
            # the medians are reported. Prefix caching is off on both sides, so no repeat reuses another's KV.
            served: dict[str, list[dict]] = {server.mode: [] for server in servers}
            base: list[dict] = []
            for r, side in alternating(["served", "offline"], repeats):
                if side == "offline":
                    b = offline.run(clients, requests, max_tokens)
                    base.append(b)
                    run.add(preset=preset, clients=clients, side="offline", repeat=r, wall_s=b["wall_s"],
                            tokens=b["tokens"], cpu_s=b["cpu_s"])
                    continue
                for server in servers:
                    api0, eng0 = server.cpu()
                    s = asyncio.run(run_level("127.0.0.1", server.port, preset, clients, requests, max_tokens))
                    api1, eng1 = server.cpu()
                    s["api_cpu_s"], s["engine_cpu_s"] = api1 - api0, eng1 - eng0
                    served[server.mode].append(s)
                    run.add(preset=preset, clients=clients, side=f"served ({server.mode})", repeat=r,
                            **{k: v for k, v in s.items() if k != "per_request"})
            for mode, runs in served.items():
                for s in runs:
                    for b in base:
                        check_same(preset, clients, mode, s, b, len(requests), max_tokens)
                rows.append(report_row(preset, clients, mode, len(requests), max_tokens, runs, base))
    finally:
        for server in servers:
            server.close()
    return rows


def report_row(preset: str, clients: int, mode: str, num_requests: int, max_tokens: int, served: list[dict],
               base: list[dict]) -> dict:
    """Medians over the repeats. CPU per token leads: the served side spends it in two processes
    (API and engine core), the offline engine in one thread; wall-clock figures follow."""
    med = lambda runs, key: median([r[key] for r in runs])  # noqa: E731
    tokens = served[0]["tokens"]
    per_token = lambda seconds: round(1e3 * seconds / max(tokens, 1), 3)  # noqa: E731
    api_cpu, engine_cpu = med(served, "api_cpu_s"), med(served, "engine_cpu_s")
    offline_cpu = round(1e3 * med(base, "cpu_s") / base[0]["tokens"], 3)
    row = {"preset": preset, "clients": clients, "mode": mode, "requests": num_requests, "max_tokens": max_tokens,
           "server_cpu_ms_per_token": per_token(api_cpu + engine_cpu),
           "api_cpu_ms_per_token": per_token(api_cpu),
           "engine_cpu_ms_per_token": per_token(engine_cpu) if mode == "process" else None,
           "offline_cpu_ms_per_token": offline_cpu,
           "cpu_served_over_offline": round(per_token(api_cpu + engine_cpu) / offline_cpu, 3),
           "tokens": tokens, "errors": sum(r["errors"] for r in served),
           "error_examples": [e for r in served for e in r["error_examples"]][:3],
           **{k: round(med(served, k), 3) for k in ("wall_s", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_ms")},
           "offline_tokens_per_s": round(med(base, "tokens_per_s"), 1), "repeats": len(served),
           "token_counts_match": True, "texts_match": True}  # check_same asserted both before this row
    row["served_over_offline"] = round(row["tokens_per_s"] / row["offline_tokens_per_s"], 3)
    engine_part = f" (API {row['api_cpu_ms_per_token']:.3f} + engine {row['engine_cpu_ms_per_token']:.3f})" \
        if mode == "process" else ""
    print(f"[{preset}, {mode}] {clients:>2} clients: CPU/token {row['server_cpu_ms_per_token']:.3f} ms served"
          f"{engine_part} vs {row['offline_cpu_ms_per_token']:.3f} offline; TTFT p50 {row['ttft_p50_ms']:.1f} ms, "
          f"p99 {row['ttft_p99_ms']:.1f} ms, TPOT {row['tpot_ms']:.2f} ms, {row['tokens_per_s']:.0f} tok/s served vs "
          f"{row['offline_tokens_per_s']:.0f} offline ({row['served_over_offline']:.0%}), errors {row['errors']}",
          file=sys.stderr)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny-dense", "tiny-moe"])
    ap.add_argument("--levels", nargs="+", type=int, default=[1, 8, 32], help="concurrent clients")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the engine (both runs)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per level, served and offline alternating; medians")
    ap.add_argument("--time-limit", type=float, default=300, help="seconds per preset before levels are skipped")
    ap.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                    help="the server's engine in its own process (default, as `qiusuo serve`) or on a thread")
    ap.add_argument("--both-modes", action="store_true",
                    help="measure an engine-process server and a thread server in the same run")
    ap.add_argument("--_serve", help=argparse.SUPPRESS)
    ap.add_argument("--_port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_max_num_seqs", type=int, default=256, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._serve:
        return serve_main(args._serve, args._port, args.threads, args._max_num_seqs, args.engine_process)
    import torch

    torch.set_num_threads(args.threads)
    modes = [True, False] if args.both_modes else [args.engine_process]
    run = Run("serve", threads=args.threads, args={k: v for k, v in vars(args).items() if not k.startswith("_")})
    rows = []
    for preset in args.presets:
        rows += bench_preset(preset, args.levels, args.requests_per_client, args.max_tokens, args.threads,
                             args.time_limit, args.repeats, modes, run)
    run.table("Served vs offline: CPU per output token first (medians of the repeats)",
              ["preset", "clients", "engine", "served CPU ms/token", "API ms", "engine-core ms", "offline CPU ms/token",
               "served/offline CPU", "served tok/s", "offline tok/s", "served/offline tok/s", "TTFT p50 ms",
               "TTFT p99 ms", "TPOT ms", "errors"],
              [[r["preset"], r["clients"], r["mode"], r["server_cpu_ms_per_token"], r["api_cpu_ms_per_token"],
                r["engine_cpu_ms_per_token"], r["offline_cpu_ms_per_token"], r["cpu_served_over_offline"],
                r["tokens_per_s"], r["offline_tokens_per_s"], r["served_over_offline"], r["ttft_p50_ms"],
                r["ttft_p99_ms"], r["tpot_ms"], r["errors"]] for r in rows],
              note=f"{args.requests_per_client} requests per client, {args.max_tokens} tokens each (seeded sampling, "
                   f"ignore_eos), {args.threads} engine thread(s), prefix caching off on both sides; token counts "
                   "and streamed text asserted equal to the offline engine's.")
    run.save(summary={"rows": rows})
    print(json.dumps({"bench": "serve", "threads": args.threads, "repeats": args.repeats,
                      "modes": ["process" if m else "thread" for m in modes],
                      "loadavg_1m": os.getloadavg()[0], "results": rows}))


if __name__ == "__main__":
    main()
