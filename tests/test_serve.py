"""The server spec, against a real uvicorn server on a loopback port with the official openai client:
chat and completions (streaming and not), n > 1, seeds, usage, logprobs, the 4xx paths in OpenAI's
error shape, auth, back-pressure (429), /health while loading, metrics, and abort on disconnect.
"""

from __future__ import annotations

import json
import socket
import threading
import time

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


def make_engine(max_len: int = 2048, **kw) -> LLMEngine:
    model, tok = build_model("tiny-dense", max_position_embeddings=max_len)
    kw = {"kv_cache_bytes": 32 << 20, "num_threads": 1, **kw}
    return LLMEngine(model, tok, EngineConfig(**kw))


@pytest.fixture(scope="module")
def server():
    engine = make_engine()
    with ServerThread(create_app(engine, served_model_name=NAME)) as srv:
        srv.engine = engine
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def wait_until(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def metric(url: str, name: str, **labels) -> float:
    text = httpx.get(url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            key = line.split(" ")[0]
            if key == name or key.startswith(name + "{"):
                return float(line.split(" ")[-1])
    return 0.0


# ---------------------------------------------------------------------- the happy paths
def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server.url + "/health").status_code == 200


def test_chat_non_streaming_usage(server, client):
    r = client.chat.completions.create(model=NAME, messages=MSG, max_tokens=7, temperature=0)
    tok = server.engine.tokenizer
    prompt_len = len(tok.encode(tok.apply_chat_template(MSG)))
    assert r.object == "chat.completion" and r.model == NAME and len(r.choices) == 1
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == prompt_len
    assert 1 <= r.usage.completion_tokens <= 7
    assert r.usage.total_tokens == prompt_len + r.usage.completion_tokens
    assert r.usage.completion_tokens_details.reasoning_tokens == 0


def test_chat_streaming_matches_non_streaming(client):
    kw = dict(model=NAME, messages=MSG, max_completion_tokens=12, seed=3, temperature=0.8)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_ends_with_done(server):
    body = {"model": NAME, "messages": MSG, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    json.loads(events[-2][len("data: "):])


def test_seed_reproducible_and_n(client):
    kw = dict(model=NAME, messages=MSG, max_tokens=10, temperature=1.0, n=3)
    a = client.chat.completions.create(**kw, seed=42)
    b = client.chat.completions.create(**kw, seed=42)
    c = client.chat.completions.create(**kw, seed=43)
    texts = lambda r: [ch.message.content for ch in sorted(r.choices, key=lambda ch: ch.index)]  # noqa: E731
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)
    assert len(set(texts(a))) > 1  # the n samples differ from each other


def test_greedy_is_deterministic(client):
    kw = dict(model=NAME, messages=MSG, max_tokens=8, temperature=0)
    assert client.chat.completions.create(**kw).choices[0].message.content == \
        client.chat.completions.create(**kw, seed=5).choices[0].message.content


def test_completions_many_prompts_n_and_streaming(client):
    r = client.completions.create(model=NAME, prompt=["ab", "cd"], max_tokens=4, n=2, seed=1, logprobs=2)
    assert r.object == "text_completion" and sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    for c in r.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == len(c.logprobs.top_logprobs)
        assert all(len(t) <= 3 for t in c.logprobs.top_logprobs)  # the sampled token plus the top 2
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)
    s = list(client.completions.create(model=NAME, prompt=["ab", "cd"], max_tokens=4, n=2, seed=1, stream=True))
    for i in range(4):
        streamed = "".join(c.choices[0].text for c in s if c.choices and c.choices[0].index == i)
        assert streamed == next(c.text for c in r.choices if c.index == i)


def test_completions_token_ids_prompt(client):
    r = client.completions.create(model=NAME, prompt=[1, 20, 30, 40], max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == 4


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=NAME, messages=MSG, max_tokens=5, logprobs=True, top_logprobs=3,
                                       temperature=0)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)


# ---------------------------------------------------------------------- bad input
def post(server, path: str, **kw) -> httpx.Response:
    return httpx.post(server.url + path, timeout=30, **kw)


@pytest.mark.parametrize("body, status, param", [
    ({"model": NAME, "messages": []}, 400, "messages"),
    ({"model": NAME, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ({"model": NAME, "messages": MSG, "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": NAME, "messages": MSG, "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": NAME, "messages": MSG, "n": 0}, 400, "n"),
    ({"model": NAME, "messages": MSG, "temperature": 7}, 400, "temperature"),
    ({"model": NAME, "messages": MSG, "presence_penalty": 1.0}, 400, "presence_penalty"),
    ({"model": NAME, "messages": "hello"}, 400, "messages"),
    ({"model": NAME, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
    ({"model": "gpt-4", "messages": MSG}, 404, "model"),
    ({"messages": MSG}, 400, "model"),
])  # fmt: skip
def test_bad_chat_requests(server, body, status, param):
    r = post(server, "/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


@pytest.mark.parametrize("body", [
    {"model": NAME, "prompt": []},
    {"model": NAME, "prompt": [10**7]},
    {"model": NAME, "prompt": "x", "echo": True},
    {"model": NAME, "prompt": "x", "logprobs": 9},
])  # fmt: skip
def test_bad_completion_requests(server, body):
    r = post(server, "/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_malformed_json_unknown_route_and_huge_body(server, client):
    r = post(server, "/v1/chat/completions", content=b'{"model": "tiny", "messages": [', headers={
        "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "json_invalid"
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    big = json.dumps({"model": NAME, "messages": [{"role": "user", "content": "x" * (10 << 20)}]})
    r = post(server, "/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # ...and the server keeps serving everyone else
    assert client.chat.completions.create(model=NAME, messages=MSG, max_tokens=2).choices


def test_chunked_body_over_limit_is_413(server):
    def body():  # no Content-Length: the limit is enforced while the body streams in
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(80):
            yield b"x" * (64 << 10)
        yield b'"}]}'

    r = post(server, "/v1/chat/completions", content=body(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSG)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[])


# ---------------------------------------------------------------------- auth, health, back-pressure
def test_api_key():
    with ServerThread(create_app(make_engine(256), served_model_name=NAME, api_key="sekret")) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200
        for path in ("/v1/models", "/metrics"):
            r = httpx.get(srv.url + path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0)
        assert good.chat.completions.create(model=NAME, messages=MSG, max_tokens=2).choices


def test_health_503_while_loading():
    release = threading.Event()

    def load():
        release.wait(30)
        return make_engine(256)

    with ServerThread(create_app(load, served_model_name=NAME)) as srv:
        assert httpx.get(srv.url + "/health").status_code == 503
        r = post(srv, "/v1/chat/completions", json={"model": NAME, "messages": MSG})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        release.set()
        wait_until(lambda: httpx.get(srv.url + "/health").status_code == 200)
        r = post(srv, "/v1/chat/completions", json={"model": NAME, "messages": MSG, "max_tokens": 2})
        assert r.status_code == 200


def _open_stream(url: str, max_tokens: int):
    """A streaming request that runs until closed; returns once its first token arrived. Keep the
    returned line iterator referenced: dropping it closes the connection."""
    c = httpx.Client(timeout=60)
    body = {"model": NAME, "messages": MSG, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    resp = c.send(c.build_request("POST", url + "/v1/chat/completions", json=body), stream=True)
    assert resp.status_code == 200
    lines = resp.iter_lines()
    for line in lines:  # the role chunk, then a chunk only once a token has text
        if line.startswith("data: ") and '"role"' not in line:
            break
    return c, resp, lines


def test_queue_full_429_with_retry_after():
    engine = make_engine(max_num_seqs=1)
    with ServerThread(create_app(engine, served_model_name=NAME, max_queue=1)) as srv:
        c1, running, _lines = _open_stream(srv.url, 1500)  # holds the only running slot
        waiting = threading.Thread(target=post, args=(srv, "/v1/chat/completions"),
                                   kwargs={"json": {"model": NAME, "messages": MSG, "max_tokens": 2}}, daemon=True)
        waiting.start()  # takes the only waiting place
        wait_until(lambda: metric(srv.url, "qiusuo:num_requests_waiting") == 1)
        r = post(srv, "/v1/chat/completions", json={"model": NAME, "messages": MSG, "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "server_busy"
        running.close()
        c1.close()  # the running request is aborted, the waiting one runs, the queue drains
        waiting.join(30)
        wait_until(lambda: not engine.has_unfinished_requests())
        assert metric(srv.url, "qiusuo:request_rejected_total") == 1


def test_disconnect_aborts_and_frees_cache(server):
    engine = server.engine
    before = metric(server.url, "qiusuo:request_success_total", finished_reason="abort")
    c, resp, _lines = _open_stream(server.url, 1900)
    assert engine.has_unfinished_requests()
    resp.close()
    c.close()
    wait_until(lambda: not engine.has_unfinished_requests() and engine.block_manager.num_used_blocks == 0)
    assert metric(server.url, "qiusuo:request_success_total", finished_reason="abort") == before + 1
    assert metric(server.url, "qiusuo:generation_tokens_total") < 10_000  # it did not run to the end


def test_non_streaming_disconnect_aborts(server):
    engine = server.engine
    body = json.dumps({"model": NAME, "messages": MSG, "max_tokens": 1900, "ignore_eos": True}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_until(lambda: engine.has_unfinished_requests())
    wait_until(lambda: not engine.has_unfinished_requests() and engine.block_manager.num_used_blocks == 0)


def test_metrics_names(server, client):
    client.chat.completions.create(model=NAME, messages=MSG, max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ("qiusuo:time_to_first_token_seconds_bucket", "qiusuo:time_per_output_token_seconds_count",
                 "qiusuo:e2e_request_latency_seconds_sum", "qiusuo:num_requests_running",
                 "qiusuo:num_requests_waiting", "qiusuo:kv_cache_usage_perc", "qiusuo:prompt_tokens_total",
                 "qiusuo:generation_tokens_total", "qiusuo:reasoning_tokens_total",
                 'qiusuo:request_success_total{finished_reason="length",model_name="tiny"}'):
        assert name in text, name
    assert metric(server.url, "qiusuo:e2e_request_latency_seconds_count") >= 1


def test_cli_serve_subprocess(make_checkpoint):
    """`qiusuo serve` end to end: a saved checkpoint, /health 503 then 200, the openai client, Ctrl-C."""
    import signal
    import subprocess
    import sys

    ckpt = make_checkpoint(max_position_embeddings=256, num_hidden_layers=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import argparse, sys; from qiusuo.cli import serve; p = argparse.ArgumentParser(); "
            "serve.register(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--model", str(ckpt), "--port", str(port),
                             "--served-model-name", "cli", "--threads", "1", "--kv-cache-bytes", str(8 << 20),
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"

        def health() -> int:
            try:
                return httpx.get(url + "/health").status_code
            except httpx.TransportError:
                return 0

        wait_until(lambda: health() == 200 or proc.poll() is not None, timeout=90)
        assert proc.poll() is None, proc.stdout.read().decode()
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert c.chat.completions.create(model="cli", messages=MSG, max_tokens=3).usage.completion_tokens >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def test_health_stays_public_under_a_route_prefix():
    """Regression: mounted under a prefix (Ray Serve's route_prefix) with an API key,
    /<prefix>/health asked for the key because Auth compared the path with the prefix in it."""
    import asyncio

    from qiusuo.serve.app import Auth

    seen = []

    async def app(scope, receive, send):
        seen.append(scope["path"])

    async def call(path, root):
        sent = []

        async def send(message):
            sent.append(message)

        await Auth(app, "k")({"type": "http", "path": path, "root_path": root, "headers": []}, None, send)
        return sent

    assert asyncio.run(call("/tiny/health", "/tiny")) == [] and seen == ["/tiny/health"]
    assert asyncio.run(call("/health", "")) == []
    denied = asyncio.run(call("/tiny/v1/models", "/tiny"))
    assert denied[0]["status"] == 401


def test_engine_thread_failure_fails_requests_in_flight():
    """An engine bug on the thread transport: the request in flight ends with an error event (it does
    not hang), /health says error, new requests get 503 (the engine object is not reused)."""
    engine = make_engine(256)
    real_step, calls = engine.step, [0]

    def failing_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] > 10:
            raise RuntimeError("boom in step")
        return real_step(*args, **kwargs)

    engine.step = failing_step
    with ServerThread(create_app(engine, served_model_name=NAME)) as srv:
        body = {"model": NAME, "messages": MSG, "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert "boom in step" in json.loads(lines[-2][len("data: "):])["error"]["message"]
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 503 and "boom in step" in h.json()["message"]
        r = post(srv, "/v1/chat/completions", json={"model": NAME, "messages": MSG, "max_tokens": 2})
        assert r.status_code == 503 and "boom in step" in r.json()["error"]["message"]
