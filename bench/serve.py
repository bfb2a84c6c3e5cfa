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
engine process separately. Each level alternates served and offline runs `--repeats` times and
keeps each side's best (a shared machine only ever makes a run slower). Ends with one JSON line.

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
                                              kv_cache_bytes=256 << 20))


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
        tokens, buffer = 0, b""
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
                if delta.get("content") or delta.get("reasoning_content"):  # random weights may "think"
                    last = time.perf_counter()
                    first = first or last
    finally:
        writer.close()
    if first is None:
        raise RuntimeError("no token streamed")
    return {"ttft": first - t0, "tpot": (last - first) / max(tokens - 1, 1), "tokens": tokens}


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
                       kv_cache_bytes=256 << 20)
        params = [SamplingParams(**sampling(seed, max_tokens)) for seed in range(len(requests))]
        llm.chat(requests[:2], params[:2])  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        outs = llm.chat(requests, params)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        tokens = sum(o.num_completion_tokens for o in outs)
        return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "cpu_s": cpu}


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

    def wait_ready(self, timeout: float = 120) -> None:
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
        self.proc.wait(timeout=30)


def bench_preset(preset: str, levels: list[int], per_client: int, max_tokens: int, threads: int,
                 time_limit: float, repeats: int, modes: list[bool]) -> list[dict]:
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
            for server in servers:  # warm-up
                asyncio.run(run_level("127.0.0.1", server.port, preset, clients, make_messages(clients, seed=999), 8))
            # Alternate served and offline runs and keep each one's best: on a shared machine the
            # noise is other processes taking the CPU, which only ever makes a run slower.
            served: dict[str, dict] = {}
            base = None
            for _ in range(repeats):
                for server in servers:
                    api0, eng0 = server.cpu()
                    s = asyncio.run(run_level("127.0.0.1", server.port, preset, clients, requests, max_tokens))
                    api1, eng1 = server.cpu()
                    s["api_cpu_s"], s["engine_cpu_s"] = api1 - api0, eng1 - eng0
                    best = served.get(server.mode)
                    served[server.mode] = s if best is None or s["tokens_per_s"] > best["tokens_per_s"] else best
                b = offline.run(clients, requests, max_tokens)
                base = b if base is None or b["tokens_per_s"] > base["tokens_per_s"] else base
            for mode, s in served.items():
                rows.append(report_row(preset, clients, mode, len(requests), max_tokens, s, base))
    finally:
        for server in servers:
            server.close()
    return rows


def report_row(preset: str, clients: int, mode: str, num_requests: int, max_tokens: int, served: dict,
               base: dict) -> dict:
    per_token = lambda seconds: round(1e3 * seconds / max(served["tokens"], 1), 3)  # noqa: E731
    api_cpu, engine_cpu = served.pop("api_cpu_s"), served.pop("engine_cpu_s")
    row = {"preset": preset, "clients": clients, "mode": mode, "requests": num_requests, "max_tokens": max_tokens,
           **{k: round(v, 3) if isinstance(v, float) else v for k, v in served.items()},
           "offline_tokens_per_s": round(base["tokens_per_s"], 1),
           "served_over_offline": round(served["tokens_per_s"] / base["tokens_per_s"], 3),
           "token_counts_match": served["tokens"] == base["tokens"],
           # CPU time per token barely moves with other processes' load, unlike wall time
           "server_cpu_ms_per_token": per_token(api_cpu + engine_cpu),
           "api_cpu_ms_per_token": per_token(api_cpu),
           "engine_cpu_ms_per_token": per_token(engine_cpu) if mode == "process" else None,
           "offline_cpu_ms_per_token": round(1e3 * base["cpu_s"] / base["tokens"], 3)}
    engine_part = f" (API {row['api_cpu_ms_per_token']:.3f} + engine {row['engine_cpu_ms_per_token']:.3f})" \
        if mode == "process" else ""
    print(f"[{preset}, {mode}] {clients:>2} clients: TTFT p50 {row['ttft_p50_ms']:.1f} ms, p99 "
          f"{row['ttft_p99_ms']:.1f} ms, TPOT {row['tpot_ms']:.2f} ms, {row['tokens_per_s']:.0f} tok/s "
          f"served vs {row['offline_tokens_per_s']:.0f} offline ({row['served_over_offline']:.0%}), "
          f"CPU/token {row['server_cpu_ms_per_token']:.3f} ms served{engine_part} vs "
          f"{row['offline_cpu_ms_per_token']:.3f} offline, errors {row['errors']}", file=sys.stderr)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny-dense", "tiny-moe"])
    ap.add_argument("--levels", nargs="+", type=int, default=[1, 8, 32], help="concurrent clients")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the engine (both runs)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per level, served and offline alternating; best kept")
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
    rows = []
    for preset in args.presets:
        rows += bench_preset(preset, args.levels, args.requests_per_client, args.max_tokens, args.threads,
                             args.time_limit, args.repeats, modes)
    print(json.dumps({"bench": "serve", "threads": args.threads, "repeats": args.repeats,
                      "modes": ["process" if m else "thread" for m in modes],
                      "loadavg_1m": os.getloadavg()[0], "results": rows}))


if __name__ == "__main__":
    main()
