"""The server with its engine in an engine-core process (`create_app(..., engine_process=True)`),
against a real uvicorn server and the official openai client: chat streamed and not, n > 1,
seeded tokens and logprobs equal to thread mode's, the reasoning split and thinking budget,
abort on disconnect, /health before the child is ready and after a failed load, a killed child
(in-flight requests get an error event, the child is respawned and serves again; a respawn that
cannot load is fatal), and no child left after shutdown.

Loaders are module-level functions (the child unpickles them by name and imports this module).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from qiusuo.engine import EngineConfig, LLMEngine
from qiusuo.model import build_model
from qiusuo.serve import create_app
from qiusuo.serve.server import ServerThread

torch.set_num_threads(1)

NAME = "tiny"
MSG = [{"role": "user", "content": "What is 2+2?"}]


# ---------------------------------------------------------------------- loaders (run in the child)
def load_tiny(max_len: int = 2048) -> LLMEngine:
    torch.set_num_threads(1)
    model, tok = build_model("tiny-dense", max_position_embeddings=max_len)
    return LLMEngine(model, tok, EngineConfig(kv_cache_bytes=32 << 20, num_threads=1))


def load_scripted() -> LLMEngine:
    from test_serve_reasoning import SCRIPT, TOK, ScriptedModel

    torch.set_num_threads(1)
    return LLMEngine(ScriptedModel(SCRIPT).eval(), TOK, EngineConfig(kv_cache_bytes=8 << 20, num_threads=1))


def load_when(flag: str) -> LLMEngine:
    while not os.path.exists(flag):  # the test decides when loading ends
        time.sleep(0.02)
    return load_tiny(256)


def load_broken() -> LLMEngine:
    raise FileNotFoundError("no checkpoint at /nowhere")


# ---------------------------------------------------------------------- fixtures and helpers
def wait_until(cond, timeout: float = 180.0) -> None:  # a spawned child imports torch: slow on a busy machine
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def health(url: str) -> int:
    return httpx.get(url + "/health").status_code


def serve(loader, **options) -> ServerThread:
    srv = ServerThread(create_app(loader, served_model_name=NAME, engine_process=True, **options))
    srv.state = srv.server.config.app.state.qiusuo
    return srv


@pytest.fixture(scope="module")
def server():
    with serve(functools.partial(load_tiny)) as srv:
        wait_until(lambda: health(srv.url) == 200)
        yield srv


@pytest.fixture(scope="module")
def thread_server():
    with ServerThread(create_app(load_tiny(), served_model_name=NAME)) as srv:
        yield srv


def client_of(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def open_stream(url: str, max_tokens: int):
    """A streaming chat request, returned once its first token arrived (keep `lines` referenced)."""
    c = httpx.Client(timeout=60)
    body = {"model": NAME, "messages": MSG, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    resp = c.send(c.build_request("POST", url + "/v1/chat/completions", json=body), stream=True)
    assert resp.status_code == 200
    lines = resp.iter_lines()
    for line in lines:
        if line.startswith("data: ") and '"role"' not in line:
            break
    return c, resp, lines


# ---------------------------------------------------------------------- create_app's checks
def test_engine_process_needs_a_picklable_loader():
    with pytest.raises(ValueError, match="picklable zero-argument loader"):
        create_app(load_tiny(256), served_model_name=NAME, engine_process=True)
    with pytest.raises(ValueError, match="does not pickle"):
        create_app(lambda: load_tiny(256), served_model_name=NAME, engine_process=True)

    def nested():
        return load_tiny(256)

    with pytest.raises(ValueError, match="does not pickle"):
        create_app(nested, served_model_name=NAME, engine_process=True)
    create_app(functools.partial(load_tiny, 256), served_model_name=NAME, engine_process=True)  # fine


# ---------------------------------------------------------------------- the happy paths
def test_chat_streaming_matches_non_streaming(server):
    client = client_of(server)
    kw = dict(model=NAME, messages=MSG, max_completion_tokens=12, seed=3, temperature=0.8)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens >= 1
    assert server.state.engine.process.is_alive() and server.state.engine.process.pid != os.getpid()


def test_seeded_n_samples_equal_thread_mode(server, thread_server):
    kw = dict(model=NAME, messages=MSG, max_tokens=10, temperature=1.0, n=3, seed=42, logprobs=True,
              top_logprobs=2)
    texts = lambda r: [ch.message.content for ch in sorted(r.choices, key=lambda ch: ch.index)]  # noqa: E731
    tokens = lambda r: [[e.token for e in ch.logprobs.content] for ch in r.choices]  # noqa: E731
    lps = lambda r: [e.logprob for ch in r.choices for e in ch.logprobs.content]  # noqa: E731
    proc = client_of(server).chat.completions.create(**kw)
    thread = client_of(thread_server).chat.completions.create(**kw)
    assert [ch.index for ch in proc.choices] == [0, 1, 2] and len(set(texts(proc))) > 1
    assert texts(proc) == texts(thread)
    assert tokens(proc) == tokens(thread)
    assert lps(proc) == pytest.approx(lps(thread), abs=1e-5)
    assert proc.usage.completion_tokens == thread.usage.completion_tokens


def test_streamed_completions_with_logprobs_equal_thread_mode(server, thread_server):
    kw = dict(model=NAME, prompt=["ab", "cd"], max_tokens=6, n=2, seed=1, logprobs=2)

    def streamed(srv):  # per sample: the text and the logprobs (chunks may coalesce differently)
        texts: dict[int, str] = {}
        lps: dict[int, list[float]] = {}
        for c in client_of(srv).completions.create(**kw, stream=True):
            for ch in c.choices:
                texts[ch.index] = texts.get(ch.index, "") + ch.text
                lps.setdefault(ch.index, []).extend(ch.logprobs.token_logprobs if ch.logprobs else [])
        return texts, lps

    (proc_texts, proc_lps), (thread_texts, thread_lps) = streamed(server), streamed(thread_server)
    assert proc_texts == thread_texts and len(proc_texts) == 4
    for i in range(4):  # batch composition may differ (when the two prompts' adds meet a step): float noise
        assert proc_lps[i] == pytest.approx(thread_lps[i], abs=1e-4) and len(proc_lps[i]) == 6
    full = client_of(server).completions.create(**kw)
    assert sorted(c.index for c in full.choices) == [0, 1, 2, 3]
    assert full.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in full.choices)


def test_reasoning_split_and_thinking_budget():
    with serve(functools.partial(load_scripted)) as srv:
        wait_until(lambda: health(srv.url) == 200)
        client = client_of(srv)
        r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=100,
                                           extra_body={"thinking_budget": 5})
        message = r.choices[0].message
        assert message.reasoning_content == "rrrrr" and message.content == "Ab<think>"
        assert r.usage.completion_tokens_details.reasoning_tokens == 5
        # stop=["XYZ"] never matches but holds back 2 characters: tags reach the API process cut in half
        chunks = list(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=100, stream=True, stop=["XYZ"],
                                                     extra_body={"thinking_budget": 3}))
        deltas = [c.choices[0].delta.model_dump() for c in chunks if c.choices]
        assert "".join(d.get("reasoning_content") or "" for d in deltas) == "rrr"
        assert "".join(d.get("content") or "" for d in deltas) == "Ab<think>"
        assert not any(d.get("content") and d.get("reasoning_content") for d in deltas)


# ---------------------------------------------------------------------- abort, health, failure
def test_disconnect_aborts(server):
    snap = lambda: server.state.engine.snapshot  # noqa: E731
    c, resp, _lines = open_stream(server.url, 1900)
    wait_until(lambda: snap().num_running_seqs == 1)
    resp.close()
    c.close()
    wait_until(lambda: snap().num_running_seqs == snap().num_waiting_seqs == snap().num_used_blocks == 0)
    assert snap().extra["num_running"] == 0


def test_health_503_until_ready_and_no_child_after_close(tmp_path):
    flag = tmp_path / "go"
    srv = serve(functools.partial(load_when, str(flag)))
    with srv:
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": NAME, "messages": MSG})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        flag.touch()
        wait_until(lambda: health(srv.url) == 200)
        assert client_of(srv).chat.completions.create(model=NAME, messages=MSG, max_tokens=2).choices
        child = srv.state.engine.process
        assert child.is_alive()
    assert not child.is_alive() and child.exitcode == 0  # it left on EOF, and was reaped


def test_load_error_is_reported():
    with serve(functools.partial(load_broken)) as srv:
        wait_until(lambda: srv.state.load_error is not None)
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and "no checkpoint at /nowhere" in r.json()["message"]
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": NAME, "messages": MSG})
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]


def test_step_messages_larger_than_the_pipe_buffer():
    """n=64 with top_logprobs=20: one engine step's message is larger than a pipe's 64 KiB. Before: under
    uvloop (uvicorn's default loop) the pipe was non-blocking, `recv_bytes` stopped half-way through a
    message, the API process took that for the engine's death and failed the request (the 152-byte
    request of the hostile bench killed the engine this way)."""
    with serve(functools.partial(load_tiny, 2048), max_output_budget=1 << 20) as srv:
        wait_until(lambda: health(srv.url) == 200)
        assert srv.server.config.loop in ("auto", "uvloop")
        body = {"model": NAME, "messages": MSG, "n": 64, "logprobs": True, "top_logprobs": 20, "max_tokens": 100,
                "ignore_eos": True}
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=600)
        assert r.status_code == 200, r.text[:300]
        assert r.json()["usage"]["completion_tokens"] == 6400
        assert metric(srv.url, "qiusuo:engine_restarts_total") == 0


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not exported")


def chat_until_ok(url: str, timeout: float) -> float:
    """Seconds until a small chat request succeeds (503 while the engine restarts)."""
    t0 = time.monotonic()
    while True:
        r = httpx.post(url + "/v1/chat/completions", json={"model": NAME, "messages": MSG, "max_tokens": 2},
                       timeout=60)
        if r.status_code == 200:
            return time.monotonic() - t0
        assert r.status_code == 503, r.text
        assert time.monotonic() - t0 < timeout, f"no success within {timeout} s: {r.json()}"
        time.sleep(0.1)


def test_killed_engine_process_is_restarted_under_load():
    """kill -9 on the engine child with requests streaming (twice): every request in flight ends with an
    error event (never hangs), and new requests succeed again within 180 s (5 s on a quiet machine)
    on a respawned child. Before: the API process answered 503 forever after the first kill."""
    with serve(functools.partial(load_tiny, 2048)) as srv:
        wait_until(lambda: health(srv.url) == 200)
        engine = srv.state.engine
        for kill in (1, 2):
            streams = [open_stream(srv.url, 1900) for _ in range(3)]
            child = engine.process
            os.kill(child.pid, signal.SIGKILL)
            for c, _resp, lines in streams:
                rest = [line for line in lines if line.startswith("data: ")]  # ends instead of hanging
                assert rest[-1] == "data: [DONE]"
                error = json.loads(rest[-2][len("data: "):])["error"]
                assert "engine process exited (exit code -9)" in error["message"]
                c.close()
            assert child.exitcode == -signal.SIGKILL
            assert chat_until_ok(srv.url, timeout=180) < 180  # ~5 s on a quiet machine; a respawn imports torch
            assert health(srv.url) == 200 and engine.process.pid != child.pid and engine.is_alive()
            assert metric(srv.url, "qiusuo:engine_restarts_total") == kill
        # the restarted engine serves normally: streaming equals non-streaming
        client = client_of(srv)
        kw = dict(model=NAME, messages=MSG, max_tokens=8, seed=5, temperature=0.9)
        full = client.chat.completions.create(**kw).choices[0].message.content
        assert "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                       if c.choices) == full
    assert not engine.process.is_alive()  # and none left after shutdown


def load_once(flag: str) -> LLMEngine:
    """Loads the first time; every later call (a respawn) fails, as if the checkpoint had been deleted."""
    if os.path.exists(flag):
        raise FileNotFoundError("the checkpoint is gone")
    Path(flag).touch()
    return load_tiny(256)


def test_failed_reload_is_fatal(tmp_path):
    """A child that dies is respawned; a respawn that cannot LOAD is fatal (503 with the error here;
    `qiusuo serve` exits 1, see test_cli_serve_load_error_exits_1)."""
    with serve(functools.partial(load_once, str(tmp_path / "loaded"))) as srv:
        wait_until(lambda: health(srv.url) == 200)
        os.kill(srv.state.engine.process.pid, signal.SIGKILL)
        wait_until(lambda: srv.state.engine.dead is not None)
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and "the checkpoint is gone" in r.json()["message"]
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": NAME, "messages": MSG, "max_tokens": 2})
        assert r.status_code == 503 and "the checkpoint is gone" in r.json()["error"]["message"]


def test_child_exits_when_the_api_process_dies():
    """No orphans: SIGKILL the API process; its engine process sees EOF on its command pipe and exits."""
    code = (f"import asyncio, functools, sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "from qiusuo.serve.core_client import EngineCoreClient\n"
            "import test_serve_process as t\n"
            "async def main():\n"
            "    e = EngineCoreClient.make_client(functools.partial(t.load_tiny, 256), multiprocess=True)\n"
            "    e.start(asyncio.get_running_loop())\n"
            "    await e.ready()\n"
            "    print(e.process.pid, flush=True)\n"
            "    await asyncio.sleep(120)\n"
            "asyncio.run(main())\n")
    api = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(api.stdout.readline())
        os.kill(api.pid, signal.SIGKILL)
        api.wait(30)

        def gone() -> bool:
            try:
                return Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
            except FileNotFoundError:
                return True

        wait_until(gone, timeout=30)
    finally:
        if api.poll() is None:
            api.kill()
