"""`qiusuo generate` / `qiusuo chat` on a tiny checkpoint, and the reasoning/answer split they show."""

from __future__ import annotations

import argparse

import pytest
import torch

from qiusuo.cli import generate as generate_cli
from qiusuo.engine import CompletionOutput
from qiusuo.engine.reasoning import split_final
from qiusuo.model import save_model
from qiusuo.tokenizer import Tokenizer
from test_engine import make_model

torch.set_num_threads(1)
TOK = Tokenizer.builtin()


@pytest.mark.parametrize("text,prompt_opens,want", [
    ("<think>add 2 and 2</think><answer>4</answer>", False, ("add 2 and 2", "<answer>4</answer>")),
    ("add 2 and 2</think> 4", True, ("add 2 and 2", " 4")),  # <think> was in the prompt
    ("just 4", False, (None, "just 4")),
    ("<think>still going", False, ("still going", "")),
])
def test_split_final_on_text(text, prompt_opens, want):
    ids = TOK.encode(text)  # the tags are single ids, as the engine generates them
    prompt = [TOK.bos_token_id] + ([TOK.think_start_id] if prompt_opens else [])
    assert split_final(TOK, prompt, CompletionOutput(0, text, ids, finish_reason="length"))[:2] == want


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
