"""Evaluation: metric arithmetic on known completions, and the real engine end to end."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from qiusuo import tasks
from qiusuo.cli import main
from qiusuo.engine import LLM
from qiusuo.eval import evaluate, write_report
from qiusuo.model import build_model
from qiusuo.tokenizer import Tokenizer


class ScriptedLLM:
    """Returns fixed completions (one list per problem) so the metrics can be checked exactly."""

    def __init__(self, tokenizer, completions):
        self.tokenizer, self.completions = tokenizer, completions

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, params):
        outs = []
        for texts, p in zip(self.completions, params):
            assert len(texts) == p.n
            outs.append(SimpleNamespace(outputs=[
                SimpleNamespace(text=t, token_ids=self.tokenizer.encode(t) + [self.tokenizer.eos_token_id],
                                finish_reason="stop") for t in texts]))
        return outs


def test_metrics_on_known_completions():
    tok = Tokenizer.builtin()
    task = tasks.get("arithmetic", template="compact")
    problems = task.generate(2, seed=0, split="test")
    a0, a1 = problems[0].answer, problems[1].answer
    right0 = f"<think>1+1=2</think><answer>{a0}</answer>"
    blurt_wrong0 = "<think></think><answer>1</answer>"
    right1 = f"<think>2+2=4</think><answer>{a1}</answer>"
    wrong1 = "<think>2+2=5</think><answer>7</answer>"
    malformed = "no tags at all"
    llm = ScriptedLLM(tok, [[right0, blurt_wrong0, blurt_wrong0, right0],
                            [wrong1, wrong1, malformed, right1]])
    r = evaluate(llm, task, problems, samples=4, temperature=1.0)
    m = r.metrics
    assert m["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert m["pass@2"] == pytest.approx(((1 - 1 / 6) + (1 - 3 / 6)) / 2)  # 1 - C(n-c,2)/C(4,2)
    assert m["pass@4"] == 1.0
    assert m["maj@4"] == pytest.approx(0.5)  # problem 0: tie between right and wrong, first seen wins
    assert m["format_rate"] == pytest.approx(7 / 8)
    assert m["empty_think_rate"] == pytest.approx(2 / 8)
    assert m["mean_completion_tokens"] == pytest.approx(
        sum(len(tok.encode(t)) + 1 for t in [right0, blurt_wrong0, blurt_wrong0, right0, wrong1, wrong1, malformed, right1]) / 8)
    # think tokens as the server's usage counts them: inside the block, tags excluded
    assert [s["think_tokens"] for s in r.records[0]["samples"]] == [5, 0, 0, 5]
    assert r.records[0]["samples"][0]["answer_tokens"] == len(tok.encode(right0)) + 1 - 5


def test_bad_eval_settings():
    task = tasks.get("arithmetic", template="compact")
    llm = ScriptedLLM(Tokenizer.builtin(), [])
    with pytest.raises(ValueError, match="greedy"):
        evaluate(llm, task, task.generate(1, 0, "test"), samples=2, temperature=0.0)
    with pytest.raises(ValueError, match="no problems"):
        evaluate(llm, task, [], samples=1)


def test_evaluate_through_the_engine(tmp_path):
    model, tok = build_model("tiny-dense", seed=0)
    task = tasks.get("arithmetic", template="compact")
    problems = task.generate(6, seed=1, split="test", difficulty=[2, 3])
    llm = LLM(model=model, tokenizer=tok)
    r = evaluate(llm, task, problems, samples=2, temperature=1.0, max_tokens=12, seed=3)
    assert len(r.records) == 6 and all(len(x["samples"]) == 2 for x in r.records)
    assert 0.0 <= r.metrics["pass@1"] <= r.metrics["pass@2"] <= 1.0
    assert r.metrics["truncation_rate"] > 0.5  # a random model rarely emits eos within 12 tokens
    again = evaluate(llm, task, problems, samples=2, temperature=1.0, max_tokens=12, seed=3)
    assert [s["text"] for x in again.records for s in x["samples"]] == [s["text"] for x in r.records for s in x["samples"]]
    path = write_report(r, tmp_path)
    report = json.loads(path.read_text())
    assert set(report["by_difficulty"]) == {"2", "3"}
    assert (tmp_path / "accuracy.png").stat().st_size > 1000


def test_eval_command(tmp_path, capsys, make_checkpoint):
    code = main(["eval", "--model", str(make_checkpoint("tiny-moe")), "--task", "arithmetic", "--n", "4",
                 "--max-tokens", "8", "--out", str(tmp_path / "ev"), "--threads", "1"])
    assert code == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["num_problems"] == 4 and "pass@1" in report["metrics"]
    assert "pass@1" in capsys.readouterr().out
