"""`qiusuo generate` / `qiusuo chat` on a tiny checkpoint, and the reasoning/answer split they show."""

from __future__ import annotations

import argparse

import pytest
import torch

from qiusuo.cli import generate as generate_cli
from qiusuo.engine.reasoning import ReasoningStream, split_reasoning
from qiusuo.model import save_model
from qiusuo.tokenizer import Tokenizer
from test_engine import make_model

torch.set_num_threads(1)


@pytest.mark.parametrize("text,want", [
    ("<think>add 2 and 2</think><answer>4</answer>", ("add 2 and 2", "4")),
    ("add 2 and 2</think> 4", ("add 2 and 2", "4")),  # <think> was in the prompt
    ("just 4", ("", "just 4")),
    ("<think>still going", ("still going", "")),
])
def test_split_reasoning(text, want):
    assert split_reasoning(text) == want


def test_reasoning_stream_handles_tags_split_across_deltas():
    s = ReasoningStream()
    text = "<think>two plus two</think><answer>4</answer>"
    pieces = [p for i in range(0, len(text), 3) for p in s.feed(text[i:i + 3])] + s.flush()
    think = "".join(t for k, t in pieces if k == "think")
    answer = "".join(t for k, t in pieces if k == "answer")
    assert (think, answer) == ("two plus two", "4")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = Tokenizer.builtin()
    model = make_model("tiny-dense", seed=30, vocab=tok.vocab_size, eos_token_id=tok.eos_token_id)
    path = tmp_path_factory.mktemp("ck") / "model"
    save_model(model, tok, path)
    return path


def parse(argv):
    parser = argparse.ArgumentParser()
    generate_cli.register(parser.add_subparsers())
    return parser.parse_args(argv)


def test_generate_command(checkpoint, capsys):
    args = parse(["generate", "--model", str(checkpoint), "2+2?", "--max-tokens", "8", "--n", "2", "--seed", "1"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "sample 1" in out and "answer:" in out and "8 tokens" in out


def test_chat_command_streams(checkpoint, capsys, monkeypatch):
    lines = iter(["hello", "/reset", "again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    args = parse(["chat", "--model", str(checkpoint), "--max-tokens", "5", "--temperature", "0"])
    assert args.func(args) == 0
    assert "/reset" in capsys.readouterr().out


def test_bad_sampling_flag_is_a_value_error(checkpoint):
    args = parse(["generate", "--model", str(checkpoint), "x", "--top-p", "0"])
    with pytest.raises(ValueError, match="top_p"):
        args.func(args)
