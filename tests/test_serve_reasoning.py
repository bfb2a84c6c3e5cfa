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
from qiusuo.model import Transformer, preset
from qiusuo.serve import ReasoningSplitter, create_app, split_final
from qiusuo.serve.server import ServerThread
from qiusuo.tokenizer import BUILTIN_CHAT_TEMPLATE, Tokenizer

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


class ScriptedModel(Transformer):
    """A tiny transformer whose next token is `table[previous token]`, whatever its weights say.

    The real forward still runs (the engine's paged cache is written as usual); only the logits are
    replaced, so greedy and seeded sampling both follow the script.
    """

    def __init__(self, table: dict[int, int]):
        super().__init__(preset("tiny-dense", vocab_size=TOK.vocab_size, bos_token_id=TOK.bos_token_id,
                                eos_token_id=EOS, pad_token_id=TOK.pad_token_id, num_hidden_layers=1))
        self.table = table

    def hidden_states(self, input_ids, positions=None, cache=None):
        h = super().hidden_states(input_ids, positions, cache=cache)
        last = positions.argmax(dim=1)  # (B,) the last real position of each (right-padded) row
        self._prev = input_ids[torch.arange(input_ids.shape[0]), last].tolist()
        return h

    def logits(self, h):
        out = torch.full((h.shape[0], self.config.vocab_size), -20.0)  # (B, V)
        for row, prev in enumerate(self._prev):
            out[row, self.table.get(prev, EOS)] = 20.0
        return out


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
    r = client.chat.completions.create(model="s", messages=MSG, max_tokens=10)
    m = r.choices[0].message
    assert m.reasoning_content == m.reasoning == "r" * 9  # 1 tag + 9 reasoning tokens
    assert m.content == "" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 10 and r.usage.completion_tokens_details.reasoning_tokens == 9


def test_thinking_budget_closes_the_block(client):
    r = client.chat.completions.create(model="s", messages=MSG, max_tokens=100, extra_body={"thinking_budget": 5})
    m = r.choices[0].message
    assert m.reasoning_content == "rrrrr" and m.content == ANSWER
    assert r.choices[0].finish_reason == "stop"
    # <think> + 5 + </think> + "Ab<think>" (9 byte tokens) + eos
    assert r.usage.completion_tokens == 1 + 5 + 1 + len(ANSWER) + 1
    assert r.usage.completion_tokens_details.reasoning_tokens == 5


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
