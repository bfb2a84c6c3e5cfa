"""Trained models answer right through every front end (issue 13, part 4).

A quickly pretrained demo-style model (compact `347+285=` prompts), and that model fine-tuned by
`qiusuo sft` on chat-format JSONL (role-marked prompts), each score within 1 point of their
raw-prompt accuracy on 200 held-out problems through the chat route of a real server (uvicorn on
127.0.0.1, the app `qiusuo serve` runs) driven by the official openai client; `evaluate_served`
gives the same figures for both routes. Failed before: the checkpoint's template wrapped prompts
in `<|user|>...<|assistant|>`, which the pretrained model never saw.
"""

from __future__ import annotations

import functools
import json
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from qiusuo.engine import LLM, SamplingParams
from qiusuo.eval import evaluate, evaluate_served
from qiusuo.eval.served import _completion_text, _load_engine, _wait_healthy
from qiusuo.serve import create_app
from qiusuo.serve.server import ServerThread
from qiusuo.tasks import get as get_task
from qiusuo.tasks.prompts import prompt_ids, user_message
from qiusuo.tokenizer import BUILTIN_CHAT_TEMPLATE, Tokenizer
from qiusuo.train.config import PretrainConfig, SFTConfig
from qiusuo.train.pretrain import Pretrain
from qiusuo.train.sft import SFT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # ~4 min quiet; pretraining is most of it
torch.set_num_threads(1)

N, MAX_TOKENS = 200, 48
TASK = get_task("arithmetic", digits=2, template="compact")  # 2 digits: learned in a short pretraining
PROBLEMS = TASK.generate(N, seed=1234, split="test")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "pretrain"
    # Scratchpad traces only: a short pretraining then gets most answers right by working them out
    # (65% at 200 steps), so agreement between the routes is measured on answers that matter.
    cfg = PretrainConfig(out=str(out), steps=200, batch_size=64, warmup_steps=20, preset="tiny-dense", threads=1,
                         progress=False, p_direct=0.0, p_slip=0.0)
    Pretrain(cfg, task=TASK).run()
    return out / "final"


@pytest.fixture(scope="module")
def sft_model(base):
    """The base fine-tuned on chat records: prompts rendered with a role-marked template, not its own."""
    from qiusuo.model import load_model, save_model

    model, tok = load_model(base)
    tok.chat_template = BUILTIN_CHAT_TEMPLATE
    save_model(model, tok, base.parent / "base-roles")
    data = base.parent / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p.prompt},
                                                     {"role": "assistant", "content": c}]}) + "\n"
                            for p, c in TASK.corpus(4096, seed=7, mix={"scratchpad": 1.0})))
    out = base.parent / "sft"
    SFT(SFTConfig(model=str(base.parent / "base-roles"), data=str(data), out=str(out), steps=80, batch_size=32,
                  lr=1e-3, warmup_steps=8, threads=1, progress=False)).run()
    return out / "final"


def raw_accuracy(path) -> tuple[float, list[str]]:
    """Greedy accuracy from the raw prompt ids the stage trained on, offline (no server)."""
    r = evaluate(LLM(str(path), num_threads=1), TASK, PROBLEMS, max_tokens=MAX_TOKENS)
    return r.metrics["accuracy"], [s["text"] for rec in r.records for s in rec["samples"]]


def chat_accuracy_openai(path) -> tuple[float, list[str]]:
    """Greedy accuracy through /v1/chat/completions of a real server, asked by the official client."""
    app = create_app(functools.partial(_load_engine, str(path), num_threads=1), served_model_name="m",
                     engine_process=True)
    with ServerThread(app) as server:
        _wait_healthy(server.url, timeout=600)  # /health answers 503 while the engine process loads
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=3, timeout=600)

        def ask(p) -> str:
            r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": user_message(TASK, p)}],
                                               max_tokens=MAX_TOKENS, temperature=0)
            return _completion_text(r.model_dump(), "chat", TASK)

        with ThreadPoolExecutor(16) as pool:  # the engine batches concurrent requests
            texts = list(pool.map(ask, PROBLEMS))
    scores = TASK.score_many(PROBLEMS, texts)
    return sum(s.accuracy >= 1 for s in scores) / N, texts


def check_front_ends(path, min_accuracy: float) -> dict:
    t = time.perf_counter()
    raw, raw_texts = raw_accuracy(path)
    assert raw >= min_accuracy, f"raw-prompt accuracy {raw:.1%}: the model learned too little to compare"
    t_raw = time.perf_counter() - t
    chat, chat_texts = chat_accuracy_openai(path)
    t_chat = time.perf_counter() - t - t_raw
    served_chat = evaluate_served(path, TASK, PROBLEMS, route="chat", max_tokens=MAX_TOKENS, num_threads=1)
    served_raw = evaluate_served(path, TASK, PROBLEMS, route="completions", max_tokens=MAX_TOKENS, num_threads=1)
    print(f"seconds: raw {t_raw:.0f}, chat (openai) {t_chat:.0f}, evaluate_served {served_chat['seconds']} "
          f"+ {served_raw['seconds']}")
    figures = {"raw": raw, "chat_openai": chat, "chat": served_chat["accuracy"],
               "completions": served_raw["accuracy"]}
    print(f"{path}: {figures}")
    for name, value in figures.items():
        assert abs(value - raw) <= 0.01, f"{name} accuracy {value:.1%} vs raw-prompt {raw:.1%}: {figures}"
    agree = sum(a == b for a, b in zip(raw_texts, chat_texts)) / N
    assert agree >= 0.98, f"only {agree:.0%} of greedy completions agree between chat and raw prompt"
    return figures


def test_pretrained_model_answers_the_same_through_every_route(base):
    check_front_ends(base, min_accuracy=0.3)
    # The bug this fixes: the role-marked template the checkpoints used to carry changes the answers.
    llm = LLM(str(base), num_threads=1)
    roles = llm.chat([[{"role": "user", "content": p.prompt}] for p in PROBLEMS],
                     SamplingParams(temperature=0, max_tokens=MAX_TOKENS), chat_template=BUILTIN_CHAT_TEMPLATE)
    _, raw_texts = raw_accuracy(base)
    same = sum(o.outputs[0].text == t for o, t in zip(roles, raw_texts)) / N
    assert same < 0.9, f"{same:.0%} of answers unchanged under unseen role markers: the control shows nothing"
    # LLM.chat renders with the checkpoint's template too
    llm = LLM(str(base), num_threads=1)
    p = PROBLEMS[0]
    via_chat = llm.chat([{"role": "user", "content": p.prompt}], SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    via_raw = llm.generate([prompt_ids(llm.get_tokenizer(), TASK, p)],
                           SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    assert via_chat[0].outputs[0].text == via_raw[0].outputs[0].text


def test_sft_chat_model_answers_the_same_through_the_chat_route(sft_model):
    tok = Tokenizer.from_dir(sft_model)
    assert tok.chat_template == BUILTIN_CHAT_TEMPLATE  # the template the SFT records were rendered with
    # raw prompt of the SFT model: its records' prompt, the role-marked rendering of the question
    raw_llm = LLM(str(sft_model), num_threads=1)
    ids = [raw_llm.get_tokenizer().encode(raw_llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": p.prompt}])) for p in PROBLEMS]
    outs = raw_llm.generate(ids, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    raw = sum(s.accuracy >= 1 for s in TASK.score_many(PROBLEMS, [o.outputs[0].text for o in outs])) / N
    assert raw >= 0.3, f"raw-prompt accuracy {raw:.1%}: the SFT model learned too little to compare"
    chat, _ = chat_accuracy_openai(sft_model)
    served = evaluate_served(sft_model, TASK, PROBLEMS, route="chat", max_tokens=MAX_TOKENS, num_threads=1)
    print(f"sft: raw {raw:.1%}, chat (openai) {chat:.1%}, chat (evaluate_served) {served['accuracy']:.1%}")
    assert abs(chat - raw) <= 0.01 and abs(served["accuracy"] - raw) <= 0.01
