"""Checkpoints render chat prompts exactly as their training stage encoded the task's prompts.

`qiusuo.tasks.prompts` is the one place: `prompt_ids` (what pretrain, GRPO, distill and eval feed
the model) and `chat_template` (what their checkpoints carry) must agree for every task template;
each stage writes that template into every checkpoint (step and final); SFT on chat records keeps
the template it rendered them with. Failed before: checkpoints carried the `<|user|>...<|assistant|>`
template the built-in tasks never train on.
"""

from __future__ import annotations

import json

import pytest
import torch

from qiusuo.model import build_model, save_model
from qiusuo.tasks import get as get_task
from qiusuo.tasks.prompts import chat_template, prompt_ids, user_message
from qiusuo.tokenizer import BUILTIN_CHAT_TEMPLATE, Tokenizer, prompt_chat_template
from qiusuo.train.config import GRPOConfig, PretrainConfig, SFTConfig
from qiusuo.train.grpo import GRPO
from qiusuo.train.pretrain import Pretrain
from qiusuo.train.sft import SFT

torch.set_num_threads(1)
FAST = dict(threads=1, progress=False)
TOK = Tokenizer.builtin()


def rendered_ids(tok: Tokenizer, template: str | None, messages) -> list[int]:
    return tok.encode(tok.apply_chat_template(messages, chat_template=template))


@pytest.mark.parametrize("name", ["arithmetic", "countdown", "linear_equations"])
@pytest.mark.parametrize("template", ["compact", "r1", "chat"])
@pytest.mark.parametrize("think_in_prompt", [False, True])
def test_chat_template_renders_the_training_prompt(name, template, think_in_prompt):
    task = get_task(name, template=template, think_in_prompt=think_in_prompt)
    for p in task.generate(5, seed=0, split="test"):
        msg = [{"role": "user", "content": user_message(task, p)}]
        assert rendered_ids(TOK, chat_template(task, TOK), msg) == prompt_ids(TOK, task, p)
    if template == "compact":  # the bare question, no role markers: what a user types
        p = task.generate(1, seed=0)[0]
        assert user_message(task, p) == p.prompt.removesuffix("<think>") and "<|" not in user_message(task, p)


def test_compact_prompt_is_the_raw_prompt():
    task = get_task("arithmetic", template="compact")
    text = TOK.apply_chat_template([{"role": "user", "content": "347+285="}], chat_template=chat_template(task, TOK))
    assert text == "<bos>347+285="
    assert TOK.encode(text) == TOK.encode("347+285=", add_special_tokens=True)  # what /v1/completions sends


def test_bare_template_turns_and_roles():
    t = prompt_chat_template(generation_prompt="<think>")
    turns = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "<answer>2</answer>"},
             {"role": "user", "content": "2+2="}]
    assert TOK.apply_chat_template(turns, chat_template=t) == "<bos>1+1=<answer>2</answer><eos>2+2=<think>"
    assert TOK.apply_chat_template(turns[:1], chat_template=t, add_generation_prompt=False) == "<bos>1+1="
    with pytest.raises(ValueError, match="trained on bare prompts, with no system role"):
        TOK.apply_chat_template([{"role": "system", "content": "be nice"}, turns[0]], chat_template=t)
    # R1-Zero's sentence rule: strip, then a period unless the question ends with . ? !
    r1 = prompt_chat_template("User: ", " Assistant:", sentence=True)
    assert TOK.apply_chat_template([{"role": "user", "content": " What is 2 + 2 "}], chat_template=r1) == \
        "<bos>User: What is 2 + 2. Assistant:"
    # quotes and braces in the text are literal, not Jinja
    odd = prompt_chat_template('say "{{ x }}" ', "'")
    assert TOK.apply_chat_template([{"role": "user", "content": "q"}], chat_template=odd) == '<bos>say "{{ x }}" q\''


def saved_template(path) -> str:
    return Tokenizer.from_dir(path).chat_template


def test_pretrain_checkpoints_carry_the_task_template(tmp_path):
    cfg = PretrainConfig(out=str(tmp_path / "pre"), steps=2, batch_size=4, warmup_steps=1, save_every=1,
                         preset="tiny-dense", template="compact", **FAST)
    Pretrain(cfg).run()
    task = get_task("arithmetic", template="compact")
    for ckpt in [tmp_path / "pre" / "final", *sorted((tmp_path / "pre" / "checkpoints").iterdir())]:
        tok = Tokenizer.from_dir(ckpt)
        p = task.generate(1, seed=3, split="test")[0]
        assert rendered_ids(tok, None, [{"role": "user", "content": p.prompt}]) == prompt_ids(tok, task, p), ckpt


def test_grpo_checkpoint_carries_its_task_template(tmp_path):
    model, tok = build_model("tiny-dense", seed=0)
    base = save_model(model, tok, tmp_path / "base")  # the built-in role template
    cfg = GRPOConfig(model=str(base), out=str(tmp_path / "grpo"), steps=1, prompts_per_step=2, group_size=2,
                     max_tokens=4, template="r1", **FAST)
    GRPO(cfg).run()
    task = get_task("arithmetic", template="r1")
    assert saved_template(tmp_path / "grpo" / "final") == chat_template(task, tok)
    p = task.generate(1, seed=0, split="test")[0]
    tok = Tokenizer.from_dir(tmp_path / "grpo" / "final")
    assert tok.apply_chat_template([{"role": "user", "content": user_message(task, p)}]) == "<bos>" + p.prompt


def test_sft_on_chat_records_keeps_the_template_it_rendered_with(tmp_path):
    model, tok = build_model("tiny-dense", seed=0)
    tok.chat_template = BUILTIN_CHAT_TEMPLATE.replace("<|assistant|>{% endif %}", "<|assistant|><think>{% endif %}")
    base = save_model(model, tok, tmp_path / "base")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i}+1="},
                                                     {"role": "assistant", "content": f"</think>{i + 1}"}]}) + "\n"
                            for i in range(4)))
    cfg = SFTConfig(model=str(base), data=str(data), out=str(tmp_path / "sft"), steps=1, batch_size=2, **FAST)
    stage = SFT(cfg)
    stage.run()
    saved = Tokenizer.from_dir(tmp_path / "sft" / "final")
    assert saved.chat_template == tok.chat_template
    prompt = rendered_ids(saved, None, [{"role": "user", "content": "0+1="}])
    ids, mask = stage.rows[0]  # the file's first record, "0+1="
    assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)])


def test_sft_on_prompt_completion_records_gets_the_bare_template(tmp_path):
    model, tok = build_model("tiny-dense", seed=0)  # the built-in role template
    base = save_model(model, tok, tmp_path / "base")
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": f"<answer>{i + 1}</answer>"}) + "\n"
                            for i in range(4)))
    stage = SFT(SFTConfig(model=str(base), data=str(data), out=str(tmp_path / "sft"), steps=1, batch_size=2, **FAST))
    stage.run()
    saved = Tokenizer.from_dir(tmp_path / "sft" / "final")
    prompt = rendered_ids(saved, None, [{"role": "user", "content": "0+1="}])
    ids, mask = stage.rows[0]
    assert ids[: len(prompt)] == prompt and mask[len(prompt)] == 1 and not any(mask[: len(prompt)])


def test_evaluate_served_on_a_tiny_checkpoint(tmp_path):
    """Both routes of a real server on a random checkpoint: the same greedy completions as offline."""
    from qiusuo.engine import LLM
    from qiusuo.eval import evaluate, evaluate_served

    task = get_task("arithmetic", digits=2, template="compact")
    cfg = PretrainConfig(out=str(tmp_path / "pre"), steps=1, batch_size=4, warmup_steps=0, preset="tiny-dense", **FAST)
    Pretrain(cfg, task=task).run()
    path = tmp_path / "pre" / "final"
    problems = task.generate(6, seed=0, split="test")
    offline = evaluate(LLM(str(path), num_threads=1), task, problems, max_tokens=12)
    texts = [rec["samples"][0]["text"] for rec in offline.records]
    for route in ("chat", "completions"):
        r = evaluate_served(path, task, problems, route=route, max_tokens=12, engine_process=False, num_threads=1,
                            with_outputs=True)
        assert r["n"] == 6 and r["route"] == route and r["accuracy"] == offline.metrics["accuracy"]
        if route == "completions":  # the chat route returns the think block apart: compared via the score
            assert [o["completion"] for o in r["outputs"]] == texts
    with pytest.raises(ValueError, match="route must be one of"):
        evaluate_served(path, task, problems, route="ollama")
    with pytest.raises(ValueError, match="no problems"):
        evaluate_served(path, task, [], route="chat")
    (path / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(RuntimeError, match="did not become healthy"):
        evaluate_served(path, task, problems, engine_process=False, startup_timeout=120)
