"""Hostile clients against a real `qiusuo serve`: what each attack costs a concurrent small request.

The server is `python -m qiusuo serve` on a saved tiny-dense checkpoint (engine process, as
shipped), in a subprocess. A "victim" thread sends small chat requests (max_tokens=8) one after
another and records their latency; first alone (idle), then while attackers repeat one hostile
request (each attack bounded in attempts and seconds). Attackers and honest readers are processes
of their own, so their client-side work (megabytes built, sent and parsed in Python) never holds the
victim's GIL: the victim measures the server, not its own process.

- stop:       400k stop strings in a ~3.6 MiB body (the engine scanned them all on every token);
- logprobs:   n=64, top_logprobs=20, max_tokens=400 in 152 bytes (31 MiB out, +450 MB RSS before);
- batch:      64 prompts x n=64 completions (admitted as 64 queue places before, not 4096);
- stalled:    streaming requests for the whole context whose client never reads (output held as
              cumulative copies before: O(tokens^2) memory). n=3 x top_logprobs=20 makes the reply
              ~10 MB: loopback's autotuned kernel buffers swallow a 1 MB reply whole, so with
              fewer the server's sends never stall at all;
- long:       a 1 MiB chat message (tokenized on the event loop before it is refused as too long);
- readers:    the control for `stalled`: the same streaming requests, read by honest clients (what
              two long concurrent generations cost a small request anyway).

Then `--kills` times: kill -9 the engine process under load; counted as survived when a new request
succeeds within --recovery-s (180 s). Per attack: attempts, status codes, bytes received, the victim's p50/p99
and p99 / idle p99, the API and engine processes' RSS. Results through bench/results.py.

    python bench/hostile.py                      # this tree
    PYTHONPATH=/tmp/old python bench/hostile.py  # another tree of qiusuo (same flags) for "before"
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import Run, load_average, median  # noqa: E402

NAME = "tiny"
SMALL = {"model": NAME, "messages": [{"role": "user", "content": "2+2="}], "max_tokens": 8, "ignore_eos": True,
         "temperature": 0}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(-(-q * len(xs) // 1)) - 1))] if xs else float("nan")  # nearest rank


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def engine_pid(api_pid: int) -> int | None:
    """The engine-core child (a spawned python, not multiprocessing's resource tracker)."""
    for c in children(api_pid):
        try:
            cmd = Path(f"/proc/{c}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmd:
            return c
    return None


class Server:
    def __init__(self, ckpt: Path, port: int, threads: int):
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(Path(tempfile.gettempdir()) / f"hostile-server-{port}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "qiusuo", "serve", "--model", str(ckpt), "--port",
                                      str(port), "--served-model-name", NAME, "--threads", str(threads),
                                      "--log-level", "warning"], stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_healthy(600)  # a busy shared machine: the engine child imports torch for minutes

    def wait_healthy(self, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return time.monotonic() - t0
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the server was not healthy within {timeout} s")

    def rss(self) -> dict[str, float | None]:
        return {"api_mb": rss_mb(self.proc.pid), "engine_mb": rss_mb(engine_pid(self.proc.pid))}

    def close(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def victim(url: str, count: int, stop: threading.Event | None = None) -> list[float]:
    """Latencies (s) of `count` small chat requests, one after another (a failed one counts as 60 s)."""
    out = []
    with httpx.Client(timeout=60) as c:
        for _ in range(count):
            if stop is not None and stop.is_set():
                break
            t0 = time.monotonic()
            try:
                ok = c.post(url + "/v1/chat/completions", json=SMALL).status_code == 200
            except httpx.HTTPError:
                ok = False
            out.append(time.monotonic() - t0 if ok else 60.0)
    return out


# ---------------------------------------------------------------------- the attacks
def stop_body() -> bytes:
    return ('{"model": "tiny", "max_tokens": 16, "ignore_eos": true, "messages": [{"role": "user", "content": '
            '"hi"}], "stop": [' + ",".join(f'"{i:06d}"' for i in range(400_000)) + "]}").encode()


def long_body() -> bytes:
    return json.dumps({"model": NAME, "max_tokens": 4, "messages": [{"role": "user", "content": "ab " * (1 << 18)}]
                       }).encode()


ATTACKS = {
    "stop": ("/v1/chat/completions", stop_body),
    "logprobs": ("/v1/chat/completions", lambda: json.dumps(
        {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "n": 64, "logprobs": True,
         "top_logprobs": 20, "max_tokens": 400}).encode()),
    "batch": ("/v1/completions", lambda: json.dumps(
        {"model": NAME, "prompt": [[1, 2, 3]] * 64, "n": 64, "max_tokens": 16, "ignore_eos": True}).encode()),
    "long": ("/v1/chat/completions", long_body),
}


def attack(url: str, name: str, stop, deadline: float, max_attempts: int, out) -> None:
    """One attacker (its own process): repeat attack `name` until stopped, the deadline or
    `max_attempts`; its records go to the queue `out` at the end."""
    path, make = ATTACKS[name]
    body, records = make(), []
    with httpx.Client(timeout=120) as c:
        while not stop.is_set() and time.monotonic() < deadline and len(records) < max_attempts:
            t0 = time.monotonic()
            try:
                r = c.post(url + path, content=body, headers={"content-type": "application/json"})
                records.append({"status": r.status_code, "bytes": len(r.content), "s": time.monotonic() - t0})
            except httpx.HTTPError as e:
                records.append({"status": type(e).__name__, "bytes": 0, "s": time.monotonic() - t0})
    out.put(records)


def stream_body(max_tokens: int) -> bytes:
    return json.dumps({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
                       "ignore_eos": True, "stream": True, "n": 3, "logprobs": True, "top_logprobs": 20}).encode()


def honest_reader(url: str, max_tokens: int, out) -> None:
    """One honest streaming client (its own process); its record goes to the queue `out`."""
    t0 = time.monotonic()
    with httpx.Client(timeout=300) as c, c.stream("POST", url + "/v1/chat/completions", content=stream_body(
            max_tokens), headers={"content-type": "application/json"}) as r:
        n = sum(len(chunk) for chunk in r.iter_bytes())
    out.put([{"status": r.status_code, "bytes": n, "s": time.monotonic() - t0}])


def stalled_readers(url: str, count: int, max_tokens: int) -> list[socket.socket]:
    """Streaming requests whose clients never read (tiny receive buffers: the server's sends stall)."""
    host, port = url.removeprefix("http://").split(":")
    socks = []
    body = stream_body(max_tokens)
    for _ in range(count):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((host, int(port)))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        socks.append(s)
    return socks


def run_attack(srv: Server, name: str, args) -> dict:
    """One attack phase. Attacking and reading clients run in processes of their own (spawned), so
    that their client-side work (building, sending and parsing megabytes in Python) never holds the
    victim's GIL: the victim's latency is the server's."""
    ctx = multiprocessing.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    rss_before = srv.rss()
    socks: list[socket.socket] = []
    procs = []
    if name == "stalled":
        socks = stalled_readers(srv.url, args.attackers, args.stalled_tokens)
    elif name == "readers":
        procs = [ctx.Process(target=honest_reader, args=(srv.url, args.stalled_tokens, out), daemon=True)
                 for _ in range(args.attackers)]
    else:
        deadline = time.monotonic() + 5 + args.attack_seconds  # (+ a spawned child's start-up)
        procs = [ctx.Process(target=attack, args=(srv.url, name, stop, deadline, args.max_attempts, out),
                             daemon=True) for _ in range(args.attackers)]
    for proc in procs:
        proc.start()
    time.sleep(0.5 if not procs else 3.0)  # the attack is under way (spawned children import httpx first)
    lat = victim(srv.url, args.victims)
    rss_during = srv.rss()
    stop.set()
    records = []
    for _ in procs:
        try:
            records += out.get(timeout=150 if name != "readers" else 300)
        except queue.Empty:
            records.append({"status": "no report", "bytes": 0, "s": float("nan")})
    for proc in procs:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    for s in socks:
        s.close()
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    return {"attack": name, "attempts": len(socks) if name == "stalled" else len(procs) if name == "readers"
            else len(records), "statuses": statuses,
            "max_response_bytes": max((r["bytes"] for r in records), default=0),
            "attack_s_median": median([r["s"] for r in records]), "victim_s": lat,
            "p50": median(lat), "p99": pct(lat, 0.99), "rss_before": rss_before, "rss_during": rss_during}


def run_kills(srv: Server, kills: int, args_recovery_s: float) -> list[dict]:
    out = []
    for _ in range(kills):
        stop = threading.Event()
        bg = threading.Thread(target=victim, args=(srv.url, 10_000, stop), daemon=True)
        bg.start()
        time.sleep(1.0)
        pid = engine_pid(srv.proc.pid)
        if pid is None:
            out.append({"killed": None, "survived": False, "why": "no engine process"})
            stop.set()
            break
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        recovered = None
        with httpx.Client(timeout=60) as c:
            while time.monotonic() - t0 < args_recovery_s:
                try:
                    if c.post(srv.url + "/v1/chat/completions", json=SMALL).status_code == 200:
                        recovered = time.monotonic() - t0
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        stop.set()
        bg.join(90)
        out.append({"killed": pid, "survived": recovered is not None, "recovery_s": recovered})
        if recovered is None:
            break
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", default="stop,logprobs,batch,stalled,long")
    p.add_argument("--attackers", type=int, default=2, help="concurrent hostile clients per attack")
    p.add_argument("--victims", type=int, default=40, help="small requests measured per phase")
    p.add_argument("--attack-seconds", type=float, default=60.0)
    p.add_argument("--max-attempts", type=int, default=200)
    p.add_argument("--stalled-tokens", type=int, default=1900)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--recovery-s", type=float, default=180.0, help="a kill is survived when a request succeeds within it")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--label", default="", help="a name for the tree measured (e.g. before/after)")
    args = p.parse_args()

    import qiusuo
    from qiusuo.model import build_model, save_model

    run = Run("hostile", threads=args.threads, args={**vars(args), "qiusuo": qiusuo.__file__})
    model, tok = build_model("tiny-dense", max_position_embeddings=2048, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_model(model, tok, Path(tmp) / "tiny")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        srv = Server(ckpt, port, args.threads)
        try:
            victim(srv.url, 5)  # warm
            idle = victim(srv.url, args.victims)
            run.add(attack="idle", victim_s=idle, p50=median(idle), p99=pct(idle, 0.99), rss=srv.rss())
            print(f"idle: p50 {median(idle) * 1000:.0f} ms, p99 {pct(idle, 0.99) * 1000:.0f} ms", flush=True)
            for name in [a for a in args.attacks.split(",") if a]:
                r = run.add(**run_attack(srv, name, args))
                r["p99_over_idle"] = r["p99"] / pct(idle, 0.99)
                print(f"{name}: {r['attempts']} attempts {r['statuses']}, max response {r['max_response_bytes']} B; "
                      f"victim p50 {r['p50'] * 1000:.0f} ms p99 {r['p99'] * 1000:.0f} ms "
                      f"({r['p99_over_idle']:.2f}x idle); RSS {r['rss_before']} -> {r['rss_during']}", flush=True)
                try:
                    srv.wait_healthy(60)
                except RuntimeError:  # the attack sank it: say so, and give the next attack a fresh server
                    r["server_died"] = True
                    print(f"{name}: the server did not recover within 60 s; restarting it", flush=True)
                    srv.close()
                    srv = Server(ckpt, port, args.threads)
            kills = run_kills(srv, args.kills, args.recovery_s) if args.kills else []
            for k in kills:
                run.add(attack="kill", **k)
            print(f"engine kills survived: {sum(k['survived'] for k in kills)}/{len(kills)} "
                  f"{[k.get('recovery_s') for k in kills]}", flush=True)
        finally:
            srv.close()
    attacks = [r for r in run.records if r["attack"] not in ("idle", "kill")]
    run.save(summary={"label": args.label, "idle_p99_s": pct(idle, 0.99), "load": load_average(),
                      "attacks": {r["attack"]: {"attempts": r["attempts"], "statuses": r["statuses"],
                                                "p99_over_idle": r["p99_over_idle"],
                                                "server_died": r.get("server_died", False)} for r in attacks},
                      "kills_survived": sum(k["survived"] for k in kills), "kills": len(kills)})


if __name__ == "__main__":
    main()
