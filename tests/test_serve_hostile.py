"""Hostile requests, run for real against a real server (uvicorn on loopback, thread-mode engine):
each one is a request that one authenticated client could send to slow or sink everyone else,
and each test failed before its limit existed.

- 400k stop strings in a ~4 MiB body (the engine scanned every one of them on every token);
- n x max_tokens x (1 + top_logprobs) amplification (152 bytes in, 31 MiB out before);
- admission by sequences, not requests (64 prompts x n=64 took 64 queue places);
- a reader that stops reading: its output is held as merged deltas, O(tokens), not a queue of
  cumulative copies, O(tokens^2);
- request bodies over a limit sized from the context: 413 on the Content-Length before any of the
  body is read, or as soon as a chunked body passes it (a 3.6 MB body of stop strings, refused
  only after parsing, cost the event loop 0.1-0.5 s per request).

The engine-process crash (kill -9 under load) is in test_serve_process.py; the API key from a file
or the environment, and the exit on a load error, in test_serve_cli.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import tracemalloc

import httpx
import pytest
import torch

from qiusuo.engine import EngineConfig, LLMEngine, SamplingParams
from qiusuo.model import build_model
from qiusuo.serve import create_app
from qiusuo.serve.config import body_limit_for_context
from qiusuo.serve.core_client import EngineCoreClient
from qiusuo.serve.protocol import MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
from qiusuo.serve.server import ServerThread

torch.set_num_threads(1)

NAME = "tiny"
MSG = [{"role": "user", "content": "What is 2+2?"}]
BUDGET = 512


def make_engine(max_len: int = 2048, **kw) -> LLMEngine:
    model, tok = build_model("tiny-dense", max_position_embeddings=max_len)
    return LLMEngine(model, tok, EngineConfig(**{"kv_cache_bytes": 32 << 20, "num_threads": 1, **kw}))


@pytest.fixture(scope="module")
def server():
    engine = make_engine()
    # a body limit large enough for the limits behind it (stop caps, prompt length) to be reached
    with ServerThread(create_app(engine, served_model_name=NAME, max_output_budget=BUDGET, max_queue=8,
                                 max_body_bytes=8 << 20)) as srv:
        srv.engine = engine
        yield srv


def post(srv, path: str, body: dict | bytes, timeout: float = 60) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(srv.url + path, content=body, headers={"content-type": "application/json"}, timeout=timeout)
    return httpx.post(srv.url + path, json=body, timeout=timeout)


def error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text[:500]
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"}
    return e


# ---------------------------------------------------------------------- stop strings
def test_400k_stop_strings_in_a_4_mib_body_are_refused(server):
    body = ('{"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "stop": ['
            + ",".join(f'"{i:06d}"' for i in range(400_000)) + "]}").encode()
    assert 3 << 20 < len(body) < 4 << 20
    for path in ("/v1/chat/completions", "/v1/completions"):
        raw = body if path.endswith("chat/completions") else body.replace(b'"messages": [{"role": "user", '
                                                                          b'"content": "hi"}]', b'"prompt": "hi"')
        e = error(post(server, path, raw), 400)
        assert e["param"] == "stop" and "at most 16" in e["message"]
    assert not server.engine.has_unfinished_requests()


def test_stop_caps_boundaries(server):
    base = {"model": NAME, "messages": MSG, "max_tokens": 2}
    ok = [f"s{i}" for i in range(MAX_STOP_STRINGS)]
    assert post(server, "/v1/chat/completions", {**base, "stop": ok}).status_code == 200
    error(post(server, "/v1/chat/completions", {**base, "stop": ok + ["one more"]}), 400)
    assert post(server, "/v1/chat/completions", {**base, "stop": "x" * MAX_STOP_CHARS}).status_code == 200
    e = error(post(server, "/v1/chat/completions", {**base, "stop": ["x" * (MAX_STOP_CHARS + 1)]}), 400)
    assert e["param"] == "stop" and f"at most {MAX_STOP_CHARS}" in e["message"]
    e = error(post(server, "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 2,
                                              "stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}), 400)
    assert e["param"] == "stop_token_ids"


# ---------------------------------------------------------------------- the output budget
def test_logprob_amplification_is_refused(server):
    """The 152-byte request that produced a 31 MiB response: n=64, top_logprobs=20, max_tokens=400."""
    body = {"model": NAME, "messages": MSG, "n": 64, "logprobs": True, "top_logprobs": 20, "max_tokens": 400}
    e = error(post(server, "/v1/chat/completions", body), 400)
    assert e["code"] == "request_too_large" and e["param"] == "max_tokens" and str(BUDGET) in e["message"]
    body = {"model": NAME, "prompt": ["a", "b"], "n": 2, "logprobs": 1, "max_tokens": BUDGET // 8 + 1}
    assert error(post(server, "/v1/completions", body), 400)["code"] == "request_too_large"
    body["max_tokens"] = BUDGET // 8  # 2 prompts x n=2 x (1 + 1): exactly the budget
    r = post(server, "/v1/completions", {**body, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4 * (BUDGET // 8)


def test_unset_max_tokens_is_lowered_to_the_budget(server):
    body = {"model": NAME, "messages": MSG, "n": 4, "logprobs": True, "top_logprobs": 3, "ignore_eos": True}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200
    per_sample = BUDGET // (4 * (1 + 3))
    assert [len(c["logprobs"]["content"]) for c in r.json()["choices"]] == [per_sample] * 4
    assert all(c["finish_reason"] == "length" for c in r.json()["choices"])
    e = error(post(server, "/v1/chat/completions", {**body, "max_completion_tokens": per_sample + 1}), 400)
    assert e["param"] == "max_completion_tokens"


# ---------------------------------------------------------------------- admission by sequences
def test_admission_counts_sequences():
    engine = make_engine(max_num_seqs=1)
    with ServerThread(create_app(engine, served_model_name=NAME, max_queue=4)) as srv:
        e = error(post(srv, "/v1/chat/completions", {"model": NAME, "messages": MSG, "n": 5, "max_tokens": 2}), 400)
        assert e["code"] == "too_many_sequences"
        e = error(post(srv, "/v1/completions", {"model": NAME, "prompt": ["a", "b", "c"], "n": 2, "max_tokens": 2}),
                  400)
        assert e["code"] == "too_many_sequences"
        # one stream holds the engine's only slot; a request with n=3 waits (3 of the 4 places)
        c = httpx.Client(timeout=60)
        body = {"model": NAME, "messages": MSG, "max_tokens": 1500, "ignore_eos": True, "stream": True}
        running = c.send(c.build_request("POST", srv.url + "/v1/chat/completions", json=body), stream=True)
        lines = running.iter_lines()
        next(line for line in lines if line.startswith("data: ") and '"role"' not in line)
        waiting = threading.Thread(target=post, args=(srv, "/v1/chat/completions",
                                                      {"model": NAME, "messages": MSG, "n": 3, "max_tokens": 2}))
        waiting.start()
        state = srv.server.config.app.state.qiusuo
        deadline = time.monotonic() + 30
        while state.num_waiting_seqs != 3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        e = error(post(srv, "/v1/chat/completions", {"model": NAME, "messages": MSG, "n": 2, "max_tokens": 2}), 429)
        assert e["code"] == "server_busy" and "3 sequences are waiting" in e["message"]
        running.close()
        c.close()
        waiting.join(60)
        assert state.num_waiting_seqs == 0 and state.num_waiting == 0


# ---------------------------------------------------------------------- a reader that stops reading
def test_stalled_reader_holds_one_merged_delta():
    """1000 tokens generated while nobody reads: the stream holds the deltas merged (O(tokens) memory),
    and the reader then gets everything in one output. A queue of cumulative outputs held ~1000^2/2
    token-id copies (4 MB of lists here; O(T^2))."""
    engine = make_engine()

    async def main() -> tuple[int, list]:
        client = EngineCoreClient.make_client(engine, multiprocess=False)
        client.start(asyncio.get_running_loop())
        await client.ready()
        params = SamplingParams(max_tokens=1000, ignore_eos=True, seed=0)
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        stream = client.submit("stalled", [1, 2, 3], params)
        await stream.accepted()
        while client.snapshot.num_running_seqs or engine.has_unfinished_requests():
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)  # the last step's message reaches the loop
        grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
        tracemalloc.stop()
        outs = [out async for out in stream]
        await asyncio.to_thread(client.close)
        return grown, outs

    grown, outs = asyncio.run(main())
    assert len(outs) == 1 and outs[0].finished and len(outs[0].outputs[0].token_ids) == 1000
    assert outs[0].outputs[0].delta_token_ids == outs[0].outputs[0].token_ids
    assert grown < 1 << 20, f"{grown} bytes held for 1000 tokens"


def test_a_reader_that_reads_nothing_is_disconnected_and_its_request_aborted():
    """A streaming client that never reads (a 4 KiB receive buffer, no recv): once the kernel's
    buffers are full (loopback's autotuned send buffer holds megabytes: the response here is ~10 MB,
    3 samples x 1900 tokens x 20 logprobs) the sends stall, but before `stream_send_timeout_s`
    existed the engine generated all of max_tokens for it (an engine slot and its compute, paid
    for by an open socket). Now the connection is closed after the timeout and the request
    aborted: the engine stops long before max_tokens."""
    engine = make_engine()
    with ServerThread(create_app(engine, served_model_name=NAME, stream_send_timeout_s=1.0)) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        body = json.dumps({"model": NAME, "messages": MSG, "max_tokens": 1900, "ignore_eos": True, "stream": True,
                           "n": 3, "logprobs": True, "top_logprobs": 20}).encode()
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((host, int(port)))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        try:
            deadline = time.monotonic() + 600
            while metric_value(srv, "qiusuo:request_success_total", 'finished_reason="abort"') < 1:
                assert time.monotonic() < deadline, "the stalled stream was never aborted"
                assert metric_value(srv, "qiusuo:request_success_total", 'finished_reason="length"') == 0, \
                    "the engine generated all of max_tokens for a reader that read nothing"
                time.sleep(0.2)
            wait = time.monotonic() + 30
            while engine.has_unfinished_requests():
                assert time.monotonic() < wait
                time.sleep(0.05)
            s.settimeout(30)  # the server closed the connection: what it had sent, then EOF
            received = b""
            while chunk := s.recv(65536):
                received += chunk
            assert received.startswith(b"HTTP/1.1 200") and b"data: " in received
            assert b"[DONE]" not in received
        finally:
            s.close()
        # the server goes on serving
        assert post(srv, "/v1/chat/completions", {"model": NAME, "messages": MSG, "max_tokens": 2}).status_code == 200


def metric_value(srv, name: str, label: str) -> float:
    for line in httpx.get(srv.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + "{") and label in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---------------------------------------------------------------------- a prompt too long to tokenize
def test_overlong_text_is_refused_before_tokenizing(server, monkeypatch):
    """768k characters: tokenizing them held the GIL for 6 s (every other request waited) only to
    answer 400 context_length_exceeded. A token covers at most `max_token_chars` characters, so a
    longer text cannot fit: it is refused before the tokenizer sees it."""
    tok = server.engine.tokenizer
    seen: list[int] = []
    real_encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text, *a, **kw: (seen.append(len(text)), real_encode(text, *a, **kw))[1])
    text = "ab " * (1 << 18)
    e = error(post(server, "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": text}],
                                                    "max_tokens": 2}), 400)
    assert e["code"] == "context_length_exceeded" and e["param"] == "messages"
    e = error(post(server, "/v1/completions", {"model": NAME, "prompt": ["hi", text], "max_tokens": 2}), 400)
    assert e["code"] == "context_length_exceeded" and e["param"] == "prompt"
    assert seen == [], f"the tokenizer was given {seen} characters"
    # a prompt that fits is still served
    assert post(server, "/v1/completions", {"model": NAME, "prompt": "ab " * 50, "max_tokens": 2}).status_code == 200
    assert seen and max(seen) < 1000


# ---------------------------------------------------------------------- the body limit
def raw_request(srv, head: bytes, body_parts: list[bytes] = (), timeout: float = 30) -> tuple[int, bytes]:
    """Send a request head and some body bytes on a raw socket WITHOUT finishing the body, then read
    the answer: a status comes back only if the server answered before reading the whole body."""
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head)
        for part in body_parts:
            s.sendall(part)
        data = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
                head_out, sep, body = data.partition(b"\r\n\r\n")
                fields = dict(line.lower().split(b": ", 1) for line in head_out.split(b"\r\n")[1:] if sep)
                if sep and len(body) >= int(fields.get(b"content-length", b"0")):
                    break
        except socket.timeout:
            return 0, data  # no answer: the server is waiting for the rest of the body
    head_out, _, body = data.partition(b"\r\n\r\n")
    return int(head_out.split(b" ")[1]), body


def test_body_limit_is_sized_from_the_context_and_enforced_before_reading():
    """The default limit is 64 KiB + 32 bytes per context token (128 KiB for this 2k context). A body
    over it is refused on its Content-Length before one byte of it is read, and a chunked body as soon
    as the bytes received pass it; before, the limit was a fixed 4 MiB, so the 3.6 MB body of 400k
    stop strings was read, parsed (0.1-0.5 s holding the GIL) and only then refused."""
    engine = make_engine(max_len=2048)
    with ServerThread(create_app(engine, served_model_name=NAME)) as srv:
        limit = body_limit_for_context(2048)
        assert limit == (64 << 10) + 32 * 2048
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        # the stop-string attack's Content-Length, and no body at all: answered at once
        status, body = raw_request(srv, head + b"Content-Length: 3600115\r\n\r\n")
        assert status == 413, "the server waited for a body it should have refused on its Content-Length"
        e = json.loads(body)["error"]
        assert e["code"] == "request_too_large" and str(limit) in e["message"] and set(e) == {
            "message", "type", "param", "code"}
        # chunked, no Content-Length: three 64 KiB chunks and no last chunk; answered once past the limit
        chunk = b"%x\r\n" % (64 << 10) + b" " * (64 << 10) + b"\r\n"
        status, _ = raw_request(srv, head + b"Transfer-Encoding: chunked\r\n\r\n", [chunk] * 3)
        assert status == 413, "the server kept reading a chunked body past the limit"
        # the body that the attack really sends: refused, never parsed
        stop = ('{"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "stop": ['
                + ",".join(f'"{i:06d}"' for i in range(400_000)) + "]}").encode()
        assert error(post(srv, "/v1/chat/completions", stop), 413)["code"] == "request_too_large"
        # the boundary: a valid body of exactly `limit` bytes is served, one byte more is not
        ok = json.dumps({"model": NAME, "messages": MSG, "max_tokens": 2}).encode()
        padded = ok[:-1] + b" " * (limit - len(ok)) + b"}"
        assert len(padded) == limit and post(srv, "/v1/chat/completions", padded).status_code == 200
        error(post(srv, "/v1/chat/completions", padded[:-1] + b" }"), 413)
        # a prompt filling the whole context, as token ids of the largest id, fits under the default
        ids = json.dumps({"model": NAME, "prompt": [engine.tokenizer.vocab_size - 1] * 2047, "max_tokens": 1})
        assert len(ids) < limit and post(srv, "/v1/completions", ids.encode()).status_code == 200
        assert not engine.has_unfinished_requests()


def test_an_explicit_body_limit_wins_and_is_validated():
    engine = make_engine(max_len=2048)
    with ServerThread(create_app(engine, served_model_name=NAME, max_body_bytes=4096)) as srv:
        small = json.dumps({"model": NAME, "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
        assert "4096-byte limit" in error(post(srv, "/v1/chat/completions", small), 413)["message"]
    with pytest.raises(ValueError, match="max_body_bytes=10: must be >= 1024"):
        create_app(engine, served_model_name=NAME, max_body_bytes=10)
