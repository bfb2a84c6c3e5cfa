"""The reasoning contract: the splitter on token-id streams, then end to end through the server with a
scripted model (a bigram table decides each next token, so outputs with think tags are exact):
reasoning vs content (streamed and not, never mixed in one delta), a `<think>` injected by the
chat template, a literal "<think>" spelled in bytes, stop strings, usage, and the thinking budget.
"""

from __future__ import annotations

import openai
import pytest
import torch

from qiusuo.engine import CompletionOutput, EngineConfig, LLMEngine
from qiusuo.model import Transformer
from qiusuo.serve import ReasoningSplitter, create_app, split_final
from qiusuo.serve.server import ServerThread
from qiusuo.tokenizer import BUILTIN_CHAT_TEMPLATE, Tokenizer

import helpers

torch.set_num_threads(1)

TOK = Tokenizer.builtin()
THINK, END_THINK, EOS = TOK.think_start_id, TOK.think_end_id, TOK.eos_token_id
ASSISTANT = TOK.token_to_id("<|assistant|>")


def b(ch: str) -> int:
    (tid,) = TOK.encode(ch)
    return tid


# After the assistant marker: "<think>" then "r" forever; after "</think>": "Ab<think>" spelled in
# bytes (plain text, not the tag), then eos.
SCRIPT = {ASSISTANT: THINK, THINK: b("r"), b("r"): b("r"), END_THINK: b("A"), b("A"): b("b"), b("b"): b("<"),
          b("<"): b("t"),
          b("t"): b("h"), b("h"): b("i"), b("i"): b("n"), b("n"): b("k"), b("k"): b(">"), b(">"): EOS}  # fmt: skip
ANSWER = "Ab<think>"


def ScriptedModel(table: dict[int, int]) -> Transformer:
    return helpers.ScriptedModel(table, TOK)


@pytest.fixture(scope="module")
def server():
    engine = LLMEngine(ScriptedModel(SCRIPT).eval(), TOK, EngineConfig(kv_cache_bytes=8 << 20, num_threads=1))
    with ServerThread(create_app(engine, served_model_name="s")) as srv:
        srv.engine = engine
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


MSG = [{"role": "user", "content": "hi"}]


# ---------------------------------------------------------------------- the splitter alone
def out(ids: list[int], text: str | None = None, finish: str | None = None, stop_reason=None) -> CompletionOutput:
    if text is None:
        text = TOK.decode([t for t in ids if t != EOS])
    return CompletionOutput(0, text, ids, finish_reason=finish, stop_reason=stop_reason)


def test_splitter_multi_token_delta_is_split():
    ids = [THINK, b("a"), b("b"), END_THINK, b("c"), EOS]
    s = ReasoningSplitter(TOK, [1, ASSISTANT])
    assert s.feed(out(ids, finish="stop")) == [("reasoning", "ab"), ("content", "c")]
    assert s.num_reasoning_tokens == 2


def test_splitter_prompt_opened_think_and_partial_tag():
    s = ReasoningSplitter(TOK, [1, ASSISTANT, THINK])  # the template opened the block
    ids = [b("x"), b("y"), END_THINK]
    full = TOK.decode(ids)  # "xy</think>"
    # the engine holds back characters: the tag is only half visible, so it waits
    assert s.feed(out(ids, text=full[:5])) == [("reasoning", "xy")]
    assert s.feed(out(ids + [b("z")], text=full + "z")) == [("content", "z")]


def test_splitter_literal_think_text_is_content():
    ids = [b(c) for c in "<think>hi"]
    reasoning, content, n = split_final(TOK, [1], out(ids, finish="length"))
    assert reasoning is None and content == "<think>hi" and n == 0


def test_splitter_unclosed_think_is_all_reasoning():
    reasoning, content, n = split_final(TOK, [1], out([THINK, b("q"), b("q")], finish="length"))
    assert (reasoning, content, n) == ("qq", "", 2)


# ---------------------------------------------------------------------- end to end
def test_reasoning_split_non_streaming(client):
    # max_tokens=10 ends inside the think block: with no answer reserve the output is all reasoning
    r = client.chat.completions.create(model="s", messages=MSG, max_tokens=3)
    m = r.choices[0].message
    assert m.reasoning_content == m.reasoning == "rr"  # 1 tag + 2 reasoning tokens (3 // 4 = 0 reserved)
    assert m.content == "" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3 and r.usage.completion_tokens_details.reasoning_tokens == 2
    assert r.choices[0].model_extra["reasoning_truncated"] is True  # it ended inside the block


def test_max_tokens_inside_think_keeps_an_answer_reserve(client):
    # max_tokens=10: reserve min(256, 10 // 4) = 2, so `</think>` is forced at output token 7 and the
    # answer gets 2 tokens; finish_reason stays OpenAI's "length", usage says the reasoning was cut.
    r = client.chat.completions.create(model="s", messages=MSG, max_tokens=10)
    m, c = r.choices[0].message, r.choices[0]
    assert (m.reasoning_content, m.content, c.finish_reason) == ("r" * 6, "Ab", "length")
    assert r.usage.completion_tokens == 10 and r.usage.completion_tokens_details.reasoning_tokens == 6
    assert r.usage.completion_tokens_details.model_extra["reasoning_truncated"] is True
    assert c.model_extra["reasoning_truncated"] is True
    # the same cut streamed: the finishing chunk and the usage chunk say so
    chunks = list(client.chat.completions.create(model="s", messages=MSG, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    last = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason][0].choices[0]
    assert content == "Ab" and last.finish_reason == "length" and last.model_extra["reasoning_truncated"] is True
    assert chunks[-1].usage.completion_tokens_details.model_extra["reasoning_truncated"] is True
    # with room, the script's answer comes whole: a big max_tokens reserves 256 tokens and closes at the end
    r = client.chat.completions.create(model="s", messages=MSG, max_tokens=300)
    assert r.choices[0].message.content == ANSWER and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens_details.reasoning_tokens == 300 - 75 - 2  # reserve min(256, 75) = 75


@pytest.mark.parametrize("effort,budget", [("none", 0), ("minimal", 256)])
def test_reasoning_effort_maps_to_a_budget(client, effort, budget):
    r = client.chat.completions.create(model="s", messages=MSG, max_tokens=400, reasoning_effort=effort)
    assert r.usage.completion_tokens_details.reasoning_tokens == budget
    assert r.choices[0].message.content == ANSWER and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens_details.model_extra["reasoning_truncated"] is True
    # an explicit thinking_budget wins over the effort
    r = client.chat.completions.create(model="s", messages=MSG, max_tokens=100, reasoning_effort=effort,
                                       extra_body={"thinking_budget": 3})
    assert r.usage.completion_tokens_details.reasoning_tokens == 3


def test_unknown_reasoning_effort_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="s", messages=MSG, max_tokens=5, reasoning_effort="maximal")
    assert "reasoning_effort" in str(e.value)


def test_earlier_reasoning_under_either_name_reaches_the_template(server):
    # A template that renders an earlier turn's reasoning (as Qwen3's does): both names give the same
    # prompt; the built-in template (like DeepSeek-R1's) drops it, so the prompt does not grow.
    tok = Tokenizer.builtin()
    tok.chat_template = BUILTIN_CHAT_TEMPLATE.replace(
        "<|assistant|>{{ message['content'] }}",
        "<|assistant|>{% if message['reasoning_content'] %}<think>{{ message['reasoning_content'] }}</think>"
        "{% endif %}{{ message['content'] }}")
    engine = LLMEngine(ScriptedModel(SCRIPT).eval(), tok, EngineConfig(kv_cache_bytes=8 << 20, num_threads=1))

    def turns(**reasoning):
        return [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A", **reasoning},
                {"role": "user", "content": "again"}]

    with ServerThread(create_app(engine, served_model_name="s")) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        n = {k: c.chat.completions.create(model="s", messages=turns(**kw), max_tokens=1).usage.prompt_tokens
             for k, kw in [("none", {}), ("rc", {"reasoning_content": "xyz"}), ("r", {"reasoning": "xyz"}),
                           ("both", {"reasoning_content": "xyz", "reasoning": "other text"})]}
    assert n["rc"] == n["r"] == n["both"] == n["none"] + 2 + 3  # <think> + 3 bytes + </think>
    builtin = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    plain = builtin.chat.completions.create(model="s", messages=turns(), max_tokens=1).usage.prompt_tokens
    assert builtin.chat.completions.create(model="s", messages=turns(reasoning="xyz"),
                                           max_tokens=1).usage.prompt_tokens == plain


def test_thinking_budget_closes_the_block(client):
    r = client.chat.completions.create(model="s", messages=MSG, max_tokens=100, extra_body={"thinking_budget": 5})
    m = r.choices[0].message
    assert m.reasoning_content == "rrrrr" and m.content == ANSWER
    assert r.choices[0].finish_reason == "stop"
    # <think> + 5 + </think> + "Ab<think>" (9 byte tokens) + eos
    assert r.usage.completion_tokens == 1 + 5 + 1 + len(ANSWER) + 1
    assert r.usage.completion_tokens_details.reasoning_tokens == 5
    assert r.usage.completion_tokens_details.model_extra["reasoning_truncated"] is True


def test_thinking_budget_zero_and_sampling(client):
    r = client.chat.completions.create(model="s", messages=MSG, max_tokens=50, temperature=1.0, seed=7, n=2,
                                       logprobs=True, top_logprobs=2, extra_body={"thinking_budget": 0})
    for c in r.choices:
        assert c.message.reasoning_content == "" and c.message.content == ANSWER
        forced = c.logprobs.content[1]  # </think>, forced right after <think>: every other token is -inf
        assert forced.token == "</think>" and forced.logprob == 0.0
        assert [t.logprob for t in forced.top_logprobs] == [0.0, -9999.0]  # clamped: JSON has no -inf


def test_streaming_split_never_mixes(client):
    kw = dict(model="s", messages=MSG, max_tokens=100, extra_body={"thinking_budget": 4})
    full = client.chat.completions.create(**kw)
    # stop=["XYZ"] never matches but makes the engine hold back 2 characters: tags arrive cut in half
    for extra in ({}, {"stop": ["XYZ"]}):
        chunks = list(client.chat.completions.create(**kw, **extra, stream=True,
                                                     stream_options={"include_usage": True}))
        reasoning, content = "", ""
        for c in chunks[1:]:
            if not c.choices:
                continue
            d = c.choices[0].delta.model_dump(exclude_none=True)
            assert not ("content" in d and ("reasoning_content" in d or "reasoning" in d)), d
            assert d.get("reasoning_content") == d.get("reasoning")
            reasoning += d.get("reasoning_content", "")
            content += d.get("content", "")
        assert reasoning == full.choices[0].message.reasoning_content == "rrrr"
        assert content == full.choices[0].message.content == ANSWER
        assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 4


def test_stop_string_in_answer(client):
    # Stop strings match the engine's text, tags included ("thi" would stop at "<think>"), so "b<".
    r = client.chat.completions.create(model="s", messages=MSG, max_tokens=100, stop=["b<"],
                                       extra_body={"thinking_budget": 2})
    assert r.choices[0].message.content == "A" and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.reasoning_content == "rr"


def test_template_injected_think(server):
    # A template that opens the think block itself (DeepSeek-R1's newer template): the model then
    # emits only reasoning and `</think>`, never `<think>` (vLLM #12999).
    tok = Tokenizer.builtin()
    tok.chat_template = BUILTIN_CHAT_TEMPLATE.replace("<|assistant|>{% endif %}", "<|assistant|><think>{% endif %}")
    script = {THINK: b("q"), b("q"): b("q"), END_THINK: b("A"), b("A"): EOS}
    engine = LLMEngine(ScriptedModel(script).eval(), tok, EngineConfig(kv_cache_bytes=8 << 20, num_threads=1))
    with ServerThread(create_app(engine, served_model_name="s")) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model="s", messages=MSG, max_tokens=50, extra_body={"thinking_budget": 3})
        assert r.choices[0].message.reasoning_content == "qqq" and r.choices[0].message.content == "A"
        assert r.usage.completion_tokens_details.reasoning_tokens == 3
        chunks = list(c.chat.completions.create(model="s", messages=MSG, max_tokens=50, stream=True,
                                                extra_body={"thinking_budget": 3}))
        pieces = [("content", d.content) if d.content else ("reasoning", d.reasoning_content)
                  for ch in chunks[1:] if ch.choices for d in [ch.choices[0].delta]
                  if d.content or getattr(d, "reasoning_content", None)]
        kinds = [k for i, (k, _) in enumerate(pieces) if i == 0 or pieces[i - 1][0] != k]
        assert kinds == ["reasoning", "content"]  # chunks may group tokens, but the order is kept
        assert "".join(t for k, t in pieces if k == "reasoning") == "qqq"


def test_completions_keep_tags_and_count_reasoning(client):
    prompt = TOK.apply_chat_template(MSG)
    r = client.completions.create(model="s", prompt=prompt, max_tokens=6)
    assert r.choices[0].text == "<think>" + "r" * 5
    assert r.usage.completion_tokens_details.reasoning_tokens == 5


def test_reasoning_metrics(server, client):
    import httpx

    client.chat.completions.create(model="s", messages=MSG, max_tokens=100, extra_body={"thinking_budget": 3})
    text = httpx.get(server.url + "/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("qiusuo:reasoning_tokens_total"))
    assert float(line.split()[-1]) >= 3
