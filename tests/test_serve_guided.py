"""Structured outputs and tool calls end to end: the official openai client against a real server on
a real engine (a random-weight tiny model sampled at T=1, its output held by the grammar), streamed
and not. The chat template is a Qwen2.5-style one that renders `tools`, assistant `tool_calls` and
`role: "tool"` results, so the server picks the hermes (`<tool_call>`) parser from it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import openai
import pytest
import torch

from qiusuo.engine import EngineConfig, LLMEngine
from qiusuo.model import build_model
from qiusuo.serve import create_app
from qiusuo.serve.server import ServerThread

import helpers

torch.set_num_threads(1)

SCHEMAS = {k: v for k, v in json.loads((Path(__file__).parent / "data" / "json_schemas.json").read_text()).items()
           if not k.startswith("_")}
CHECKER = jsonschema.Draft202012Validator.FORMAT_CHECKER
NAME = "tiny"

HERMES_TEMPLATE = helpers.HERMES_TEMPLATE

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": SCHEMAS["weather_tool_args"]}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 999}},
    "required": ["a", "b"], "additionalProperties": False}}}
TOOL_SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "add": ADD["function"]["parameters"]}
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server():
    model, tok = build_model("tiny-dense", seed=5, num_hidden_layers=1, max_position_embeddings=2048)  # room for the tools prompt
    tok.chat_template = HERMES_TEMPLATE
    engine = LLMEngine(model.eval(), tok, EngineConfig(kv_cache_bytes=32 << 20, num_threads=1, max_num_seqs=32))
    with ServerThread(create_app(engine, served_model_name=NAME)) as srv:
        srv.engine = engine
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def check(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema, format_checker=CHECKER)


def schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


STREAMED = ["order", "anyof_contact", "string_formats", "recursive_tree", "defs_ref", "github_issue"]


def collect(stream) -> tuple[str, list, str | None, int]:
    """(content, tool calls assembled from deltas, finish_reason, number of argument deltas)."""
    content, calls, finish, arg_deltas = "", {}, None, 0
    for chunk in stream:
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        d = ch.delta
        assert not (d.content and d.tool_calls)
        content += d.content or ""
        for tc in d.tool_calls or []:
            if tc.id is not None:
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments or ""}
            elif tc.function and tc.function.arguments:
                calls[tc.index]["arguments"] += tc.function.arguments
                arg_deltas += 1
        finish = ch.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish, arg_deltas


# ---------------------------------------------------------------------- structured outputs
def test_response_format_json_schema_corpus(client):
    """Every corpus schema, T=1, n=2: all samples validate."""
    for i, name in enumerate(sorted(SCHEMAS)):
        r = client.chat.completions.create(model=NAME, messages=MSG, temperature=1.0, n=2, seed=i, max_tokens=450,
                                           response_format=schema_format(name))
        for c in r.choices:
            assert c.finish_reason == "stop", (name, c.message.content)
            check(c.message.content, SCHEMAS[name])


@pytest.mark.parametrize("name", STREAMED)
def test_response_format_json_schema_streamed(client, name):
    stream = client.chat.completions.create(model=NAME, messages=MSG, temperature=1.0, seed=3, max_tokens=450,
                                            response_format=schema_format(name), stream=True)
    content, calls, finish, _ = collect(stream)
    assert finish == "stop" and not calls
    check(content, SCHEMAS[name])


@pytest.mark.parametrize("stream", [False, True])
def test_json_object(client, stream):
    """json_object leaves strings unbounded, so a random model may be cut by max_tokens inside one: every
    sample is an object's prefix, and those that stop are objects (at least one of the seeds tried)."""
    stopped = 0
    for seed in range(4):
        kw = dict(model=NAME, messages=MSG, seed=seed, max_tokens=450, response_format={"type": "json_object"})
        if stream:
            content, _, finish, _ = collect(client.chat.completions.create(stream=True, **kw))
        else:
            r = client.chat.completions.create(**kw)
            content, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert content.lstrip().startswith("{") and finish in ("stop", "length")
        if finish == "stop":
            stopped += 1
            assert isinstance(json.loads(content), dict)
    assert stopped


@pytest.mark.parametrize("spec, ok", [
    ({"regex": r"[A-Z]{2}-[0-9]{4}"}, lambda t: re.fullmatch(r"[A-Z]{2}-[0-9]{4}", t)),
    ({"choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
    ({"grammar": 'root ::= "x=" [0-9]+ ";"'}, lambda t: re.fullmatch(r"x=[0-9]+;", t)),
    ({"json": SCHEMAS["sentiment"], "disable_any_whitespace": True}, lambda t: check(t, SCHEMAS["sentiment"]) or True),
])
def test_structured_outputs_field(client, spec, ok):
    r = client.chat.completions.create(model=NAME, messages=MSG, n=3, seed=2, max_tokens=200,
                                       extra_body={"structured_outputs": spec})
    assert all(ok(c.message.content) for c in r.choices)
    content, _, finish, _ = collect(client.chat.completions.create(model=NAME, messages=MSG, seed=2, max_tokens=200,
                                                                   stream=True, extra_body={"structured_outputs": spec}))
    assert ok(content) and finish == "stop"


def test_completions_route_guided(client):
    r = client.completions.create(model=NAME, prompt="Colour:", n=2, seed=1, max_tokens=30,
                                  extra_body={"guided_choice": ["cyan", "magenta"]})
    assert all(c.text in ("cyan", "magenta") for c in r.choices)
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt="Obj:", seed=4, max_tokens=300, stream=True,
        extra_body={"structured_outputs": {"json": SCHEMAS["address"]}}) if c.choices)
    check(text, SCHEMAS["address"])


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"structured_outputs": {"regex": "(unclosed"}}, None),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs"),
    ({"structured_outputs": {"choice": ["a"]}, "guided_regex": "a"}, "guided_regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                          "properties": {"a": {"$ref": "#/nowhere"}}}}}}, None),
])
def test_bad_constraints_are_400(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=MSG, max_tokens=5, extra_body=body)
    if param:
        assert e.value.body["param"] == param


# ---------------------------------------------------------------------- tools
def test_tool_choice_required(client):
    r = client.chat.completions.create(model=NAME, messages=MSG, tools=[WEATHER, ADD], tool_choice="required",
                                       seed=7, n=4, max_tokens=1000, parallel_tool_calls=False)
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.tool_calls, c.message
        for tc in c.message.tool_calls:
            check(tc.function.arguments, TOOL_SCHEMAS[tc.function.name])
            assert tc.id.startswith("call_") and tc.type == "function"


def test_named_function_streamed_equals_whole(client):
    """The same seed streamed and not: the arguments cut across many deltas reassemble to the whole one."""
    kw = dict(model=NAME, messages=MSG, tools=[WEATHER, ADD], seed=13, max_tokens=400,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**kw).choices[0]
    content, calls, finish, arg_deltas = collect(client.chat.completions.create(stream=True, **kw))
    assert whole.finish_reason == finish == "tool_calls"
    (tc,) = whole.message.tool_calls
    assert [c["name"] for c in calls] == [tc.function.name] == ["get_weather"]
    assert calls[0]["arguments"] == tc.function.arguments
    check(tc.function.arguments, TOOL_SCHEMAS["get_weather"])
    assert arg_deltas >= 10 and not content and not whole.message.content


FORCED_AUTO = (r'Sure\.<tool_call>\n\{"name": "add", "arguments": \{"a": [1-9][0-9]?, "b": [1-9]\}\}\n</tool_call>')


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_auto_parses_the_answer(client, stream):
    """tool_choice auto: the (grammar-forced) answer holds text and a call; the parser splits them."""
    kw = dict(model=NAME, messages=MSG, tools=[WEATHER, ADD], seed=1, max_tokens=200,
              extra_body={"structured_outputs": {"regex": FORCED_AUTO}})
    if stream:
        content, calls, finish, arg_deltas = collect(client.chat.completions.create(stream=True, **kw))
        assert arg_deltas >= 5
    else:
        c = client.chat.completions.create(**kw).choices[0]
        content, finish = c.message.content, c.finish_reason
        calls = [{"name": t.function.name, "arguments": t.function.arguments} for t in c.message.tool_calls]
    assert content == "Sure." and finish == "tool_calls"
    (call,) = calls
    assert call["name"] == "add" and set(json.loads(call["arguments"])) == {"a", "b"}


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_none_leaves_text(client, stream):
    kw = dict(model=NAME, messages=MSG, tools=[ADD], tool_choice="none", seed=1, max_tokens=200,
              extra_body={"structured_outputs": {"regex": FORCED_AUTO}})
    if stream:
        content, calls, finish, _ = collect(client.chat.completions.create(stream=True, **kw))
    else:
        c = client.chat.completions.create(**kw).choices[0]
        content, calls, finish = c.message.content, c.message.tool_calls or [], c.finish_reason
    assert content.startswith("Sure.<tool_call>") and not calls and finish == "stop"


def test_tool_results_rendered_through_template(server, client):
    """An assistant turn with tool_calls and a role 'tool' result go through the chat template."""
    messages = MSG + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]
    r = client.chat.completions.create(model=NAME, messages=messages, tools=[ADD], max_tokens=2, seed=0)
    tok = server.engine.tokenizer
    expected = tok.apply_chat_template(
        [MSG[0], {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
         {"role": "tool", "tool_call_id": "call_1", "content": "3"}], tools=[ADD])
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' in expected
    assert "<tool_response>\n3\n</tool_response>" in expected
    assert r.usage.prompt_tokens == len(tok.encode(expected))


@pytest.mark.parametrize("kw, param", [
    ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"tools": [ADD], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [ADD], "tool_choice": "sometimes"}, "tool_choice"),
])
def test_bad_tool_requests_are_400(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=MSG, max_tokens=5, **kw)
    assert e.value.body["param"] == param


def test_metrics(server, client):
    import httpx

    client.chat.completions.create(model=NAME, messages=MSG, max_tokens=100, seed=0,
                                   response_format=schema_format("sentiment"))
    client.chat.completions.create(model=NAME, messages=MSG, max_tokens=200, seed=0, tools=[ADD], tool_choice="required")
    text = httpx.get(server.url + "/metrics").text
    assert re.search(r'qiusuo:structured_output_requests_total\{kind="json",model_name="tiny"\} [1-9]', text)
    assert re.search(r'qiusuo:tool_call_requests_total\{model_name="tiny",tool_choice="required"\} [1-9]', text)
    assert re.search(r'qiusuo:grammar_tokens_total\{model_name="tiny"\} [1-9]', text)
    assert re.search(r'qiusuo:grammar_time_seconds_total\{model_name="tiny"\} [0-9.e-]+', text)
    assert re.search(r'qiusuo:tool_calls_total\{model_name="tiny"\} [1-9]', text)
