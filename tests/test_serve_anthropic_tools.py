"""Anthropic tool use end to end: the official `anthropic` client against a real server on a real
engine, loaded from a checkpoint whose chat template has a tool format (Qwen2.5's `<tool_call>`
shape, tests/helpers.py), so the server picks the hermes parser from it.

The model has random weights; `tool_choice: {"type": "tool", "name": ...}` is enforced by the grammar,
so its call is well formed whatever the weights: a `tool_use` block whose input validates against
the tool's input_schema and `stop_reason: "tool_use"`, streamed (`input_json_delta` events) and not.
The call's result then goes back as a `tool_result` block and comes out of the chat template as the
`<tool_response>` turn, and the answer is a normal text message.
"""

from __future__ import annotations

import json
import shutil

import anthropic
import httpx
import jsonschema
import pytest
import torch

from qiusuo.engine import EngineConfig, LLMEngine
from qiusuo.model import load_model
from qiusuo.serve import create_app
from qiusuo.serve.server import ServerThread

import helpers

torch.set_num_threads(1)

NAME = "tiny"
WEATHER = {"name": "get_weather", "description": "Weather in a city.", "input_schema": {
    "type": "object", "properties": {"location": {"type": "string", "maxLength": 12},
                                     "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["location", "unit"], "additionalProperties": False}}
ADD = {"name": "add", "description": "Add two numbers.", "input_schema": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}
TOOLS = [WEATHER, ADD]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
FORCED = {"type": "tool", "name": "get_weather"}
CHECKER = jsonschema.Draft202012Validator.FORMAT_CHECKER


@pytest.fixture(scope="module")
def server(make_checkpoint, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("hermes") / "ckpt"
    shutil.copytree(make_checkpoint("tiny-dense", seed=5, num_hidden_layers=1, max_position_embeddings=4096), ckpt)
    (ckpt / "chat_template.jinja").write_text(helpers.HERMES_TEMPLATE, encoding="utf-8")
    model, tok = load_model(ckpt)
    assert tok.chat_template == helpers.HERMES_TEMPLATE
    engine = LLMEngine(model.eval(), tok, EngineConfig(kv_cache_bytes=32 << 20, num_threads=1))
    with ServerThread(create_app(engine, served_model_name=NAME)) as srv:
        srv.tokenizer = tok
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)


def only_tool_use(message) -> anthropic.types.ToolUseBlock:
    """The message's one tool_use block (a thinking block may come before it; no text)."""
    kinds = [b.type for b in message.content]
    assert kinds in (["tool_use"], ["thinking", "tool_use"]), kinds
    (call,) = [b for b in message.content if b.type == "tool_use"]
    return call


def check_call(call, tool: dict) -> None:
    assert call.name == tool["name"] and call.id
    jsonschema.validate(call.input, tool["input_schema"], format_checker=CHECKER)


def test_forced_tool_use_not_streamed(client):
    m = client.messages.create(model=NAME, max_tokens=600, messages=ASK, tools=TOOLS, tool_choice=FORCED)
    check_call(only_tool_use(m), WEATHER)
    assert m.stop_reason == "tool_use" and m.stop_sequence is None and m.usage.output_tokens > 0


def test_forced_tool_use_streamed_equals_whole(client):
    """Greedy, so the streamed message is the whole one; the input arrives as many input_json_delta pieces.
    (anthropic 2.x has no `temperature` argument any more; older clients send it, so the server takes it.)"""
    kw = dict(model=NAME, max_tokens=600, messages=ASK, tools=TOOLS, tool_choice=FORCED,
              extra_body={"temperature": 0})
    whole = client.messages.create(**kw)
    with client.messages.stream(**kw) as s:
        events = list(s)
        final = s.get_final_message()
    call = only_tool_use(final)
    check_call(call, WEATHER)
    assert final.stop_reason == "tool_use" and [b.model_dump(exclude={"id"}) for b in final.content] == [
        b.model_dump(exclude={"id"}) for b in whole.content]  # each call has its own id
    assert call.id.startswith("toolu_") and call.id != only_tool_use(whole).id
    pieces = [e.delta.partial_json for e in events if e.type == "content_block_delta"
              and e.delta.type == "input_json_delta"]
    assert len(pieces) >= 5 and json.loads("".join(pieces)) == call.input
    starts = [e for e in events if e.type == "content_block_start" and e.content_block.type == "tool_use"]
    assert [(e.content_block.name, e.content_block.id) for e in starts] == [(call.name, call.id)]


def test_forced_tool_use_streamed_sampled(client):
    """Sampled (the server's default temperature, 1): every call validates (the grammar, not the
    weights, makes it well formed)."""
    for other in (WEATHER, ADD):
        with client.messages.stream(model=NAME, max_tokens=600, messages=ASK, tools=TOOLS,
                                    tool_choice={"type": "tool", "name": other["name"]}) as s:
            final = s.get_final_message()
        check_call(only_tool_use(final), other)
        assert final.stop_reason == "tool_use"


def test_any_tool_choice_calls_the_tools(client):
    """`any`: one or more calls (parallel, as Anthropic allows), each to a listed tool and valid; with
    `disable_parallel_tool_use`, exactly one. (Up to 4 calls, each up to ~300 tokens of a random
    model's JSON whitespace: max_tokens leaves room for all.)"""
    by_name = {t["name"]: t for t in TOOLS}
    for seed_turn in range(2):
        ask = [{"role": "user", "content": f"Question {seed_turn}: weather, or a sum?"}]
        m = client.messages.create(model=NAME, max_tokens=1500, messages=ask, tools=TOOLS, tool_choice={"type": "any"})
        calls = [b for b in m.content if b.type == "tool_use"]
        assert calls and {b.type for b in m.content} <= {"thinking", "tool_use"}, m.content
        assert m.stop_reason == "tool_use"
        for call in calls:
            check_call(call, by_name[call.name])
        assert len({c.id for c in calls}) == len(calls)
        one = client.messages.create(model=NAME, max_tokens=600, messages=ask, tools=TOOLS,
                                     tool_choice={"type": "any", "disable_parallel_tool_use": True})
        call = only_tool_use(one)
        check_call(call, by_name[call.name])


@pytest.mark.parametrize("stream", [False, True])
def test_tool_result_goes_back_and_the_answer_is_text(server, client, stream):
    """The call and its result go back; the template renders them (`<tool_call>`, `<tool_response>`)
    exactly as the OpenAI messages they translate to; the answer is a text message."""
    m = client.messages.create(model=NAME, max_tokens=600, messages=ASK, tools=TOOLS, tool_choice=FORCED)
    call = only_tool_use(m)
    turns = ASK + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                 "content": "18 C and sunny"}]}]
    kw = dict(model=NAME, max_tokens=40, messages=turns, tools=TOOLS, tool_choice={"type": "none"})
    if stream:
        with client.messages.stream(**kw) as s:
            answer = s.get_final_message()
    else:
        answer = client.messages.create(**kw)
    assert [b.type for b in answer.content if b.type != "thinking"] == ["text"] and answer.content[-1].text
    assert answer.stop_reason in ("end_turn", "max_tokens")
    openai_turns = ASK + [
        {"role": "assistant", "content": "", "tool_calls": [{"id": call.id, "type": "function", "function": {
            "name": call.name, "arguments": json.dumps(call.input)}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    openai_tools = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                      "parameters": t["input_schema"]}} for t in TOOLS]
    prompt = server.tokenizer.apply_chat_template(openai_turns, tools=openai_tools, tokenize=False)
    assert "<tool_response>\n18 C and sunny\n</tool_response>" in prompt and "<tool_call>" in prompt
    # the OpenAI route, given those messages, renders a prompt of the same tokens
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "model": NAME, "messages": openai_turns, "tools": openai_tools, "max_tokens": 1}, timeout=60).json()
    expected = r["usage"]["prompt_tokens"]
    assert answer.usage.input_tokens + answer.usage.cache_read_input_tokens == expected
    assert client.messages.count_tokens(model=NAME, messages=turns, tools=TOOLS).input_tokens == expected


def test_tool_choice_translation():
    """Anthropic's tool_choice -> the chat route's: `any` is "required", `tool` a named function, and
    `disable_parallel_tool_use` turns parallel calls off."""
    from qiusuo.serve.anthropic import _tools
    from qiusuo.serve.anthropic_protocol import MessagesRequest

    def body(choice):
        return _tools(MessagesRequest(model=NAME, max_tokens=1, messages=ASK, tools=TOOLS, tool_choice=choice))

    assert body({"type": "any"})["tool_choice"] == "required" and "parallel_tool_calls" not in body({"type": "any"})
    assert body({"type": "any", "disable_parallel_tool_use": True})["parallel_tool_calls"] is False
    assert body({"type": "tool", "name": "add"})["tool_choice"] == {"type": "function", "function": {"name": "add"}}
    assert body({"type": "none"})["tool_choice"] == "none" and body(None).get("tool_choice") is None
    assert [t["function"]["parameters"] for t in body(None)["tools"]] == [t["input_schema"] for t in TOOLS]
