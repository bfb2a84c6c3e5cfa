"""The one reasoning module (`qiusuo.engine.reasoning`) in each of the places that use it.

An R1-style chat template (one that opens `<think>` itself, as DeepSeek-R1's does) through the CLI's
streamed chat, `qiusuo eval`'s think-token counts against the server's usage `reasoning_tokens`, the
server's reasoning_content/content, and the thinking budget; tags cut across stream deltas; and a
lone `</think>`, which must never reach the answer (the CLI printed it, and the server returned it in
`content`, before the splitters were one).
"""

from __future__ import annotations

import argparse

import openai
import pytest
import torch

from qiusuo.cli import generate as generate_cli
from qiusuo.engine import LLM, EngineConfig, LLMEngine, SamplingParams
from qiusuo.engine.reasoning import (CONTENT, REASONING, ReasoningSplitter, ThinkingBudget, ThinkState,
                                     count_reasoning, split_final)
from qiusuo.eval import evaluate
from qiusuo.serve import create_app
from qiusuo.serve.server import ServerThread
from qiusuo.tasks import get as get_task
from qiusuo.tokenizer import BUILTIN_CHAT_TEMPLATE, Tokenizer
from test_serve_reasoning import ScriptedModel

torch.set_num_threads(1)

R1_STYLE = BUILTIN_CHAT_TEMPLATE.replace("<|assistant|>{% endif %}", "<|assistant|><think>{% endif %}")
TOK = Tokenizer.builtin()
R1_TOK = Tokenizer.builtin()
R1_TOK.chat_template = R1_STYLE
THINK, END, EOS = TOK.think_start_id, TOK.think_end_id, TOK.eos_token_id
ANS, END_ANS = TOK.answer_start_id, TOK.answer_end_id
ASSISTANT = TOK.token_to_id("<|assistant|>")


def b(ch: str) -> int:
    (tid,) = TOK.encode(ch)
    return tid


# From a prompt that opened the block: "xy</think><answer>7</answer>" then eos (2 reasoning tokens).
R1_SCRIPT = {THINK: b("x"), b("x"): b("y"), b("y"): END, END: ANS, ANS: b("7"), b("7"): END_ANS, END_ANS: EOS}
# From a prompt that did not: "x</think>7" — a stray close the model learned where a template opened the block.
STRAY_SCRIPT = {ASSISTANT: b("x"), b("x"): END, END: b("7"), b("7"): EOS}
MSG = [{"role": "user", "content": "2+5="}]


def engine(script, tok) -> LLMEngine:
    return LLMEngine(ScriptedModel(script).eval(), tok, EngineConfig(kv_cache_bytes=8 << 20, num_threads=1))


@pytest.fixture(scope="module")
def r1_server():
    with ServerThread(create_app(engine(R1_SCRIPT, R1_TOK), served_model_name="s")) as srv:
        yield srv, openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)


# ---------------------------------------------------------------------- the state machine
def test_think_state_counts_and_tags():
    s = ThinkState(THINK, END).scan([b("a"), THINK, b("r"), THINK, b("r"), END, b("c"), END])
    # the second <think> inside a block is text; the last </think> is a stray tag, not content
    assert (s.num_reasoning_tokens, s.inside, s.saw_block, s.closed) == (3, False, True, True)
    assert ThinkState(THINK, END, inside=True).scan([b("r"), b("r")]).num_reasoning_tokens == 2
    assert count_reasoning(TOK, [1, THINK], [b("r"), END, b("c")]) == 1
    assert count_reasoning(TOK, [1, THINK, b("\n")], [b("r"), END]) == 1  # "<think>\n" opens it too
    assert count_reasoning(TOK, [1, THINK, END], [b("r")]) == 0  # a closed block in the prompt does not


def test_lone_close_never_in_content():
    # Failed before: the server's splitter left a `</think>` it was not expecting in `content`.
    ids = [b("x"), END, b("7"), EOS]
    reasoning, content, n = split_final(TOK, [1, ASSISTANT], _out(ids, finish="stop"))
    assert "</think>" not in content and content == "x7" and n == 0
    # with the block opened by the prompt, everything before `</think>` is reasoning (R1's parser)
    assert split_final(TOK, [1, ASSISTANT, THINK], _out(ids, finish="stop")) == ("x", "7", 1)


def test_tags_cut_across_stream_deltas():
    """The engine holds characters back for a possible stop string, so a tag's text arrives in two
    pieces; the splitter waits for the whole tag and never mixes kinds in a delta."""
    llm = LLM(model=ScriptedModel(R1_SCRIPT).eval(), tokenizer=R1_TOK, kv_cache_bytes=8 << 20, num_threads=1)
    prompt = R1_TOK.encode(R1_TOK.apply_chat_template(MSG))
    params = SamplingParams(temperature=0, max_tokens=20, stop=["@@@@@@@@@"])  # never matches: holds 8 chars
    splitter, pieces, cut = ReasoningSplitter(R1_TOK, prompt), [], False
    for out in llm.stream(prompt, params):
        o = out.outputs[0]
        cut |= any(o.text.endswith(tag[:k]) for tag in ("</think>", "<answer>") for k in range(1, len(tag)))
        pieces += splitter.feed(o)
    assert cut, "the engine never held back part of a tag: this test no longer tests the cut"
    assert "".join(t for k, t in pieces if k == REASONING) == "xy"
    assert "".join(t for k, t in pieces if k == CONTENT) == "<answer>7</answer>"
    final = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20))[0]
    assert split_final(R1_TOK, prompt, final.outputs[0]) == ("xy", "<answer>7</answer>", 2)


# ---------------------------------------------------------------------- 1. the CLI's streamed chat
def test_cli_chat_streams_r1_template_reasoning_apart(monkeypatch):
    # Failed before: the CLI's text splitter started outside the think block, so the reasoning was
    # printed as the answer, followed by a literal "</think>".
    llm = LLM(model=ScriptedModel(R1_SCRIPT).eval(), tokenizer=R1_TOK, kv_cache_bytes=8 << 20, num_threads=1)
    monkeypatch.setattr(generate_cli, "_load",
                        lambda args: (llm, SamplingParams, dict(temperature=0.0, max_tokens=20)))
    printed: list[tuple[str, str | None]] = []
    monkeypatch.setattr("rich.console.Console.print",
                        lambda self, *objs, style=None, **kw: printed.append(("".join(map(str, objs)), style)))
    lines = iter(["2+5=", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    parser = argparse.ArgumentParser()
    generate_cli.register(parser.add_subparsers())
    args = parser.parse_args(["chat", "--model", "unused"])
    assert args.func(args) == 0
    dim = "".join(t for t, style in printed if style == "dim")
    plain = "".join(t for t, style in printed if style is None and not t.startswith("[dim]"))
    assert dim == "xy"
    assert plain.strip() == "7" and "</think>" not in plain


def test_cli_generate_splits_with_the_prompt(monkeypatch, capsys):
    llm = LLM(model=ScriptedModel(R1_SCRIPT).eval(), tokenizer=R1_TOK, kv_cache_bytes=8 << 20, num_threads=1)
    monkeypatch.setattr(generate_cli, "_load",
                        lambda args: (llm, SamplingParams, dict(temperature=0.0, max_tokens=20)))
    parser = argparse.ArgumentParser()
    generate_cli.register(parser.add_subparsers())
    args = parser.parse_args(["generate", "--model", "unused", "2+5="])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "reasoning:\nxy\nanswer:\n7\n" in out and "</think>" not in out


# ---------------------------------------------------------------------- 2. eval == the server's usage
def test_eval_think_tokens_equal_server_reasoning_tokens(r1_server):
    _, client = r1_server
    llm = LLM(model=ScriptedModel(R1_SCRIPT).eval(), tokenizer=R1_TOK, kv_cache_bytes=8 << 20, num_threads=1)
    task = get_task("arithmetic", template="chat")  # prompts rendered by the tokenizer's (R1-style) template
    problems = task.generate(3, seed=0, split="test")
    result = evaluate(llm, task, problems, max_tokens=20)
    for problem, record in zip(problems, result.records):
        r = client.chat.completions.create(model="s", messages=problem.messages, max_tokens=20, temperature=0)
        # Failed before: eval counted up to and including `</think>` (3), the server 2.
        assert record["samples"][0]["think_tokens"] == r.usage.completion_tokens_details.reasoning_tokens == 2
        assert record["samples"][0]["empty_think"] is False
    assert result.metrics["mean_think_tokens"] == 2


# ---------------------------------------------------------------------- 3. the server
def test_server_splits_r1_template(r1_server):
    _, client = r1_server
    r = client.chat.completions.create(model="s", messages=MSG, max_tokens=20)
    m = r.choices[0].message
    assert (m.reasoning_content, m.content) == ("xy", "<answer>7</answer>")
    assert r.usage.completion_tokens_details.reasoning_tokens == 2
    chunks = list(client.chat.completions.create(model="s", messages=MSG, max_tokens=20, stream=True,
                                                 stop=["@@@@@@@@@"]))  # held-back text: tags cut
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (reasoning, content) == ("xy", "<answer>7</answer>")


def test_server_drops_a_lone_close():
    with ServerThread(create_app(engine(STRAY_SCRIPT, TOK), served_model_name="s")) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model="s", messages=MSG, max_tokens=20)
        assert r.choices[0].message.content == "x7"  # failed before: "x</think>7"
        chunks = list(client.chat.completions.create(model="s", messages=MSG, max_tokens=20, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "x7"


# ---------------------------------------------------------------------- 4. the thinking budget
def test_thinking_budget_with_r1_template(r1_server):
    _, client = r1_server
    r = client.chat.completions.create(model="s", messages=MSG, max_tokens=20, extra_body={"thinking_budget": 1})
    m = r.choices[0].message
    assert (m.reasoning_content, m.content) == ("x", "<answer>7</answer>")  # `</think>` forced after "x"
    assert r.usage.completion_tokens_details.reasoning_tokens == 1


def test_thinking_budget_counts_as_usage_does():
    budget = ThinkingBudget(2, THINK, END, opened_by_prompt=True)
    assert budget.num_reasoning_tokens([b("a")]) == 1
    assert budget.num_reasoning_tokens([b("a"), END]) is None
    # a second block after the budget is spent closes at once: the budget is the sample's total
    ids = [b("a"), b("a"), END, THINK]
    assert budget.num_reasoning_tokens(ids) == 2
    forced = budget(ids, torch.zeros(TOK.vocab_size))
    assert forced[END] == 0 and torch.isinf(forced[b("a")])
    # a literal "<think>" spelled in bytes opens nothing
    assert ThinkingBudget(0, THINK, END).num_reasoning_tokens([b(c) for c in "<think>"]) is None


def test_thinking_budget_close_at_and_cut():
    # close_at=3: an open block is closed once the output is 3 tokens long, whatever the budget
    limit = ThinkingBudget(None, THINK, END, opened_by_prompt=False, close_at=3)
    logits = torch.zeros(TOK.vocab_size)
    assert limit([THINK, b("a")], logits) is logits  # too short: untouched, nothing scanned
    assert limit([THINK, b("a"), b("a")], logits)[END] == 0 and torch.isinf(limit([THINK, b("a"), b("a")], logits)[1])
    assert limit([THINK, b("a"), END], logits) is logits  # closed: the answer is free
    # cut: a forced `</think>` or an output that ends inside the block; a block the model closed itself is not cut
    assert limit.cut([THINK, b("a"), b("a"), END, b("x")], "stop")
    assert not limit.cut([THINK, b("a"), END, b("x"), b("x")], "length")
    assert limit.cut([THINK, b("a")], "length") and not limit.cut([THINK, b("a")], "stop")
    budget = ThinkingBudget(1, THINK, END)
    assert budget.cut([THINK, b("a"), END], "stop") and not ThinkingBudget(2, THINK, END).cut([THINK, b("a"), END], "stop")


def _out(ids, text=None, finish=None):
    from qiusuo.engine import CompletionOutput

    if text is None:
        text = TOK.decode([t for t in ids if t != EOS])
    return CompletionOutput(0, text, ids, finish_reason=finish)
