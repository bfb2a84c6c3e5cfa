"""Anthropic's Messages API (/v1/messages) against a real uvicorn server on a loopback port, with the
official `anthropic` client: thinking blocks with a budget, streamed events in Anthropic's order,
system prompts, stop sequences, usage, the `x-api-key` header, and errors in Anthropic's shape.

The model is scripted (tests/helpers.py), as in test_serve_ollama.py: `<think>`, "r" until the
block is closed for it, then "Ab<think>" spelled in bytes, then eos.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest
import torch

from qiusuo.engine import EngineConfig, LLMEngine
from qiusuo.serve import create_app
from qiusuo.serve.anthropic_response import StreamTranslator
from qiusuo.serve.server import ServerThread
from qiusuo.tokenizer import Tokenizer

import helpers

torch.set_num_threads(1)

TOK = Tokenizer.builtin()
SCRIPT = helpers.think_script(TOK)
ANSWER = helpers.THINK_SCRIPT_ANSWER
KEY = "sk-test"
MSG = [{"role": "user", "content": "hi"}]
THINKING = {"type": "enabled", "budget_tokens": 5}


@pytest.fixture(scope="module")
def server():
    engine = LLMEngine(helpers.ScriptedModel(SCRIPT, TOK).eval(), TOK,
                       EngineConfig(kv_cache_bytes=8 << 20, num_threads=1))
    with ServerThread(create_app(engine, served_model_name="adder", api_key=KEY)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)  # sends x-api-key


def test_message_with_thinking_block(client):
    m = client.messages.create(model="adder", max_tokens=100, messages=MSG, thinking=THINKING)
    assert [blk.type for blk in m.content] == ["thinking", "text"]
    assert m.content[0].thinking == "rrrrr" and len(m.content[0].signature) == 64
    assert m.content[1].text == ANSWER and m.stop_reason == "end_turn" and m.stop_sequence is None
    assert m.role == "assistant" and m.model == "adder" and m.id.startswith("msg_")
    assert m.usage.output_tokens == 1 + 5 + 1 + len(ANSWER) + 1
    assert m.usage.input_tokens == len(TOK.apply_chat_template(MSG, tokenize=True))
    assert m.usage.output_tokens_details.thinking_tokens == 5
    assert m.usage.model_extra["reasoning_truncated"] is True  # the budget closed the block


def test_stream_events_in_order_and_same_message(client):
    whole = client.messages.create(model="adder", max_tokens=100, messages=MSG, thinking=THINKING)
    with client.messages.stream(model="adder", max_tokens=100, messages=MSG, thinking=THINKING) as s:
        events = list(s)
        final = s.get_final_message()
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    raw = [(e.type, getattr(e, "index", None), getattr(getattr(e, "delta", None), "type", None))
           for e in events if e.type.startswith("content_block")]
    assert raw[0] == ("content_block_start", 0, None) and ("content_block_delta", 0, "signature_delta") in raw
    assert raw.index(("content_block_stop", 0, None)) < raw.index(("content_block_start", 1, None))
    assert raw[-1] == ("content_block_stop", 1, None)
    assert [blk.model_dump() for blk in final.content] == [blk.model_dump() for blk in whole.content]
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens


def test_stream_without_thinking_config_still_shows_reasoning_and_disabled_hides_it(client):
    with client.messages.stream(model="adder", max_tokens=40, messages=MSG) as s:
        final = s.get_final_message()  # 40 tokens: reserve 10, so `</think>` is forced at token 29
    assert [blk.type for blk in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "r" * 28 and final.content[1].text == ANSWER
    off = client.messages.create(model="adder", max_tokens=40, messages=MSG, thinking={"type": "disabled"})
    assert [blk.type for blk in off.content] == ["text"] and off.content[0].text == ANSWER
    assert off.usage.output_tokens == 1 + 1 + len(ANSWER) + 1
    omitted = client.messages.create(model="adder", max_tokens=40, messages=MSG,
                                     thinking={**THINKING, "display": "omitted"})
    assert omitted.content[0].thinking == "" and omitted.content[0].signature


def test_system_prompt_stop_sequences_and_max_tokens(client):
    plain = client.messages.create(model="adder", max_tokens=30, messages=MSG, thinking=THINKING)
    sys_ = client.messages.create(model="adder", max_tokens=30, messages=MSG, thinking=THINKING,
                                  system=[{"type": "text", "text": "be brief"}])
    assert sys_.usage.input_tokens > plain.usage.input_tokens and sys_.content[1].text == ANSWER
    stop = client.messages.create(model="adder", max_tokens=30, messages=MSG, thinking=THINKING,
                                  stop_sequences=["b<"])
    assert stop.stop_reason == "stop_sequence" and stop.stop_sequence == "b<" and stop.content[1].text == "A"
    with client.messages.stream(model="adder", max_tokens=30, messages=MSG, thinking=THINKING,
                                stop_sequences=["b<"]) as s:
        streamed = s.get_final_message()
    assert streamed.stop_reason == "stop_sequence" and streamed.stop_sequence == "b<"
    short = client.messages.create(model="adder", max_tokens=3, messages=MSG)
    assert short.stop_reason == "max_tokens" and short.content[0].thinking == "rr"


def test_earlier_turns_with_thinking_and_count_tokens(client):
    turns = [*MSG, {"role": "assistant", "content": [{"type": "thinking", "thinking": "rr", "signature": "x"},
                                                     {"type": "text", "text": "A"}]},
             {"role": "user", "content": [{"type": "text", "text": "again"}]}]
    m = client.messages.create(model="adder", max_tokens=30, messages=turns, thinking={"type": "disabled"})
    assert m.content[0].text == ANSWER
    n = client.messages.count_tokens(model="adder", messages=turns)
    assert n.input_tokens == m.usage.input_tokens


# ---------------------------------------------------------------------- errors, in Anthropic's shape
def test_errors_are_typed(server, client):
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="claude-opus", max_tokens=10, messages=MSG)
    assert "adder" in e.value.body["error"]["message"] and e.value.body["type"] == "error"
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="adder", max_tokens=10, messages=MSG, thinking={"type": "enabled",
                                                                                    "budget_tokens": 10})
    assert "budget_tokens" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="adder", max_tokens=10, messages=MSG,
                               tools=[{"name": "f", "input_schema": {"type": "object"}}])
    # translated to OpenAI's tools; this checkpoint's chat template has no tool-call format, so the chat
    # route refuses them, naming the flag that would choose one
    assert "--tool-call-parser" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="adder", max_tokens=10, messages=[{"role": "user", "content": "hi " * 600}])
    assert e.value.body["error"]["type"] == "invalid_request_error" and "context" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="adder", max_tokens=10, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "aGk="}}]}])
    assert "image" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError) as e:
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model="adder", max_tokens=5, messages=MSG)
    assert e.value.body["error"]["type"] == "authentication_error"
    # a body the schema refuses (no max_tokens), on the wire
    r = httpx.post(server.url + "/v1/messages", headers={"x-api-key": KEY}, json={"model": "adder", "messages": MSG})
    assert r.status_code == 400 and r.json()["type"] == "error" and "max_tokens" in r.json()["error"]["message"]


def test_stream_translator_tool_calls_and_kinds():
    # Tool-call deltas as the chat route will stream them once it supports tools: a tool_use block
    # whose input arrives as input_json_delta pieces; indices count up across kinds.
    t = StreamTranslator("m", "msg_1", 7)
    chunks = [{"choices": [{"delta": {"reasoning_content": "why"}}]},
              {"choices": [{"delta": {"content": "ok"}}]},
              {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "call_1",
                                                      "function": {"name": "f", "arguments": '{"a"'}}]}}]},
              {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": ': 1}'}}]}}]},
              {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]}]
    events = [t.start()] + [e for c in chunks for e in t.feed(c)] + t.end(
        {"prompt_tokens": 7, "completion_tokens": 9, "completion_tokens_details": {"reasoning_tokens": 1}}, None)
    data = [json.loads(e.split("data: ", 1)[1]) for e in events]
    starts = [(d["index"], d["content_block"]["type"]) for d in data if d["type"] == "content_block_start"]
    assert starts == [(0, "thinking"), (1, "text"), (2, "tool_use")]
    partial = "".join(d["delta"]["partial_json"] for d in data if d["type"] == "content_block_delta"
                      and d["delta"]["type"] == "input_json_delta")
    assert json.loads(partial) == {"a": 1}
    assert data[-2]["delta"]["stop_reason"] == "tool_use" and data[-1]["type"] == "message_stop"
    assert [d["type"] for d in data].count("content_block_stop") == 3


def test_error_shapes_under_a_route_prefix():
    """Under Ray Serve's route_prefix (`qiusuo deploy` mounts this same app), the path the app sees
    carries the prefix: the error shape is still chosen by the route inside the app."""
    import asyncio

    from qiusuo.serve.app import Auth

    async def app(scope, receive, send):
        raise AssertionError("not reached without the key")

    async def call(path, root):
        sent = []

        async def send(message):
            sent.append(message)

        await Auth(app, "k")({"type": "http", "path": path, "root_path": root, "headers": []}, None, send)
        return sent[0]["status"], json.loads(sent[1]["body"])

    assert asyncio.run(call("/tiny/api/chat", "/tiny")) == (401, {"error": "Incorrect or missing API key: send "
                                                                  "`Authorization: Bearer <key>` (or `x-api-key: "
                                                                  "<key>`)."})
    status, body = asyncio.run(call("/tiny/v1/messages", "/tiny"))
    assert status == 401 and body["type"] == "error" and body["error"]["type"] == "authentication_error"
    status, body = asyncio.run(call("/tiny/v1/chat/completions", "/tiny"))
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_deploy_replica_serves_the_same_app():
    # qiusuo deploy's replica hands Serve the app `create_app` builds, so the routes are the same
    # (read as text: importing the replica needs Ray; test_deploy_ray.py calls both APIs through it)
    from pathlib import Path

    import qiusuo.deploy
    from qiusuo.serve import create_app

    assert "create_app(engine" in (Path(qiusuo.deploy.__file__).parent / "replica.py").read_text()
    paths = set(create_app(lambda: None, served_model_name="m").openapi()["paths"])
    assert {"/api/chat", "/api/generate", "/api/tags", "/api/show", "/api/ps", "/api/version", "/v1/messages",
            "/v1/messages/count_tokens", "/v1/chat/completions"} <= paths
