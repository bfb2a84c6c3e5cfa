"""Ollama's API (/api/*) against a real uvicorn server on a loopback port, with the official `ollama`
client: chat and generate (NDJSON streamed and not), `think` true/false/levels, options, names
resolved as Ollama's (`adder` = `adder:latest`), model listing from the registry, the context
error that replaces Ollama's silent truncation, and errors in Ollama's `{"error": "..."}` shape.

The model is scripted (tests/helpers.py): after the assistant marker it writes `<think>`, then "r"
until the think block is closed for it, then "Ab<think>" spelled in bytes (plain text), then eos.
"""

from __future__ import annotations

import httpx
import ollama
import pytest
import torch

from qiusuo.engine import EngineConfig, LLMEngine
from qiusuo.serve import create_app
from qiusuo.serve.server import ServerThread
from qiusuo.tokenizer import Tokenizer

import helpers

torch.set_num_threads(1)

TOK = Tokenizer.builtin()
SCRIPT = helpers.think_script(TOK)
ANSWER = helpers.THINK_SCRIPT_ANSWER
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(make_checkpoint, tmp_path_factory):
    # The registry knows `adder:latest`, so /api/tags and /api/show report its size and parameters.
    from qiusuo.registry import Registry

    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("QIUSUO_HOME", str(home))
    Registry(home).import_dir(make_checkpoint(), "adder")
    engine = LLMEngine(helpers.ScriptedModel(SCRIPT, TOK).eval(), TOK,
                       EngineConfig(kv_cache_bytes=8 << 20, num_threads=1))
    with ServerThread(create_app(engine, served_model_name="adder")) as srv:
        yield srv
    mp.undo()


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url)


# ---------------------------------------------------------------------- chat
def test_chat_not_streamed_splits_thinking(server, client):
    r = client.chat(model="adder:latest", messages=MSG, stream=False, options={"num_predict": 100})
    # 100 tokens: an answer reserve of min(256, 100 // 4) = 25, so `</think>` is forced at token 74
    assert r.message.thinking == "r" * 73 and r.message.content == ANSWER
    assert r.done and r.done_reason == "stop"
    assert r.eval_count == 1 + 73 + 1 + len(ANSWER) + 1 and r.prompt_eval_count == len(
        TOK.apply_chat_template(MSG, tokenize=True))
    assert r.total_duration >= r.eval_duration >= 0
    # the client drops fields it does not know; on the wire, the last line says the reasoning was cut
    body = httpx.post(server.url + "/api/chat", json={"model": "adder", "messages": MSG, "stream": False,
                                                     "options": {"num_predict": 100}}).json()
    assert body["reasoning_truncated"] is True and body["message"]["thinking"] == "r" * 73


def test_chat_streamed_matches_and_never_mixes(client):
    whole = client.chat(model="adder", messages=MSG, stream=False, think="low", options={"num_predict": 60})
    parts = list(client.chat(model="adder", messages=MSG, stream=True, think="low", options={"num_predict": 60}))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done and parts[-1].done_reason == whole.done_reason
    for p in parts:
        assert not (p.message.thinking and p.message.content), p  # one kind per line
    assert "".join(p.message.thinking or "" for p in parts) == whole.message.thinking
    assert "".join(p.message.content for p in parts) == whole.message.content == ANSWER
    assert parts[-1].eval_count == whole.eval_count and parts[-1].prompt_eval_count == whole.prompt_eval_count


def test_think_false_closes_the_block_and_levels_budget(client):
    r = client.chat(model="adder", messages=MSG, stream=False, think=False, options={"num_predict": 100})
    assert r.message.thinking is None and r.message.content == ANSWER
    assert r.eval_count == 1 + 1 + len(ANSWER) + 1  # <think></think> then the answer
    # "low" is 1024 reasoning tokens: more than 100 - 25, so the answer reserve closes the block
    low = client.chat(model="adder", messages=MSG, stream=False, think="low", options={"num_predict": 100})
    assert low.message.thinking == "r" * 73 and low.message.content == ANSWER


def test_options_stop_num_predict_and_sampling(client):
    r = client.chat(model="adder", messages=MSG, stream=False, think=False,
                    options={"stop": ["b<"], "temperature": 0.7, "top_p": 0.9, "top_k": 5, "seed": 3,
                             "num_gpu": 99, "num_thread": 2})  # load-time options are ignored
    assert r.message.content == "A" and r.done_reason == "stop"
    r = client.chat(model="adder", messages=MSG, stream=False, options={"num_predict": 3})
    assert r.eval_count == 3 and r.done_reason == "length" and r.message.thinking == "rr"


def test_earlier_thinking_is_accepted(client):
    turns = [*MSG, {"role": "assistant", "content": "A", "thinking": "rrr"}, {"role": "user", "content": "again"}]
    r = client.chat(model="adder", messages=turns, stream=False, think=False, options={"num_predict": 20})
    assert r.message.content == ANSWER


# ---------------------------------------------------------------------- generate
def test_generate_streamed_and_not(client):
    r = client.generate(model="adder", prompt="hi", stream=False, think=False, options={"num_predict": 50})
    assert r.response == ANSWER and r.thinking is None and r.done_reason == "stop"
    prompt_ids = TOK.apply_chat_template(MSG, tokenize=True)
    assert r.context[:len(prompt_ids)] == prompt_ids and len(r.context) == len(prompt_ids) + r.eval_count
    parts = list(client.generate(model="adder", prompt="hi", stream=True, options={"num_predict": 40}))
    thinking = "".join(p.thinking or "" for p in parts)
    assert thinking == "r" * 28 and "".join(p.response for p in parts) == ANSWER  # 40: reserve 10
    assert parts[-1].done and parts[-1].context[:len(prompt_ids)] == prompt_ids


def test_generate_system_raw_and_context(client):
    with_system = client.generate(model="adder", prompt="hi", system="be brief", stream=False, think=False,
                                  options={"num_predict": 20})
    plain = client.generate(model="adder", prompt="hi", stream=False, think=False, options={"num_predict": 20})
    assert with_system.prompt_eval_count > plain.prompt_eval_count and with_system.response == ANSWER
    # raw: the prompt is the text the model reads, no template
    raw = client.generate(model="adder", prompt="hi<|assistant|>", raw=True, stream=False, think=False,
                          options={"num_predict": 20})
    assert raw.response == ANSWER and raw.prompt_eval_count == len(TOK.encode("hi<|assistant|>")) + 1  # + bos
    # context: the ids of the earlier exchange go first
    more = client.generate(model="adder", prompt="again", context=plain.context, stream=False, think=False,
                           options={"num_predict": 20})
    assert more.prompt_eval_count > len(plain.context) and more.context[:len(plain.context)] == plain.context


def test_load_calls(client):
    assert client.generate(model="adder").done_reason == "load"
    assert client.chat(model="adder", messages=[]).done_reason == "load"


# ---------------------------------------------------------------------- the context: an error, never a cut
def test_prompt_longer_than_the_context_is_an_error(client):
    long = "hello " * 600  # well past the model's 512 tokens
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="adder", messages=[{"role": "user", "content": long}], stream=False)
    assert e.value.status_code == 400 and "context" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="adder", prompt="hello " * 40, stream=False, options={"num_ctx": 16})
    assert e.value.status_code == 400 and "num_ctx" in e.value.error
    # within num_ctx, the output is bounded by what the context leaves
    r = client.chat(model="adder", messages=MSG, stream=False, options={"num_ctx": 20})
    assert r.prompt_eval_count + r.eval_count <= 20 and r.done_reason == "length"


# ---------------------------------------------------------------------- models
def test_tags_show_ps_version(server, client):
    (m,) = client.list().models
    assert m.model == "adder:latest" and m.size > 0 and m.details.format == "safetensors"
    assert m.details.parameter_size  # from the registry's parameter count
    show = client.show("adder:latest")
    assert show.capabilities == ["completion", "thinking"]  # no "tools" until the chat route takes them
    assert show.modelinfo["general.parameter_count"] > 0 and "<|assistant|>" in show.template
    assert any(k.endswith(".context_length") and v == 512 for k, v in show.modelinfo.items())
    (running,) = client.ps().models
    assert running.model == "adder:latest" and running.context_length == 512
    v = httpx.get(server.url + "/api/version").json()
    assert v["version"].count(".") == 2 and "qiusuo_version" in v


# ---------------------------------------------------------------------- errors, in Ollama's shape
def test_unknown_model_is_404(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="other:latest", messages=MSG, stream=False)
    assert e.value.status_code == 404 and "adder:latest" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.show("adder:v2")
    assert e.value.status_code == 404


@pytest.mark.parametrize("fmt", [
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
    "json",
])
def test_format_holds_the_answer_to_json(client, fmt):
    """Ollama's `format` reaches the chat route as response_format: the grammar engine holds the answer
    (after the think block) to JSON, to the schema when one is given, streamed and not."""
    import json

    import jsonschema

    kwargs = dict(model="adder", messages=MSG, format=fmt, think=False, options={"num_predict": 48, "seed": 3})
    answers = [client.chat(stream=False, **kwargs).message.content,
               "".join(part.message.content or "" for part in client.chat(stream=True, **kwargs))]
    for text in answers:
        value = json.loads(text)
        if isinstance(fmt, dict):
            jsonschema.validate(value, fmt)
        else:
            assert isinstance(value, dict)


@pytest.mark.parametrize("kwargs,needle", [
    # the tiny checkpoint's chat template has no tool-call format: refused, naming tools
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tool"),
    ({"options": {"repeat_penalty": 1.3}}, "repeat_penalty"),
    ({"options": {"temperature": 7}}, "temperature"),
])
def test_unsupported_fields_are_400_naming_them(client, kwargs, needle):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="adder", messages=MSG, stream=False, **kwargs)
    assert e.value.status_code == 400 and needle in e.value.error


def test_error_shapes_on_raw_http(server):
    r = httpx.post(server.url + "/api/chat", json={"messages": MSG})  # no model
    assert r.status_code == 400 and isinstance(r.json()["error"], str) and "model" in r.json()["error"]
    r = httpx.post(server.url + "/api/chat", content=b"{not json")
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    r = httpx.post(server.url + "/api/pull", json={"model": "x"})
    assert r.status_code == 404 and "qiusuo models" in r.json()["error"]
    r = httpx.post(server.url + "/api/generate", json={"model": "adder", "prompt": "hi", "images": ["aGk="]})
    assert r.status_code == 400 and r.json() == {"error": "images is not supported by this server; leave it unset"}
    # the stream's own media type
    with httpx.stream("POST", server.url + "/api/chat", json={"model": "adder", "messages": MSG,
                                                             "options": {"num_predict": 3}}) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = list(r.iter_lines())
    assert len(lines) >= 2 and '"done":true' in lines[-1].replace(" ", "")


def test_metrics_count_the_surface(server, client):
    def count() -> float:
        for line in httpx.get(server.url + "/metrics").text.splitlines():
            if line.startswith("qiusuo:api_requests_total") and 'api="ollama"' in line:
                return float(line.split()[-1])
        return -1.0

    before = count()
    client.chat(model="adder", messages=MSG, stream=False, options={"num_predict": 2})
    assert count() == before + 1
