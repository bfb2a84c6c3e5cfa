"""A grammar compiles off the engine loop (serve/core.py): while one request's grammar compiles, the
loop keeps stepping the others; the request waits unacknowledged, is added once compiled (the
engine's own compile is then a cache hit), and an abort while it compiles drops it.

The compile is held by a hook (`GrammarBackend._compile` waits on an event), so the test controls
when it ends: the checks are on order (the plain request finished while the grammar was still
held), not on time. A loop that compiled inline would hold the plain request until the release,
and the client's timeout (far longer than the few tokens need) fails the test instead of hanging.
"""

from __future__ import annotations

import json
import queue
import threading

import jsonschema
import openai
import pytest
import torch

from qiusuo.engine import EngineConfig, LLMEngine, SamplingParams, StructuredOutputsParams
from qiusuo.engine.guided import GrammarBackend
from qiusuo.model import build_model
from qiusuo.serve import create_app
from qiusuo.serve.core import AbortRequest, AddRequest, EngineCore, Shutdown, StepOutput
from qiusuo.serve.server import ServerThread

torch.set_num_threads(1)

NAME = "tiny"
SLOW = {"type": "object", "properties": {"slow": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["slow"], "additionalProperties": False}
WAIT_S = 120  # a bound so a broken build fails instead of hanging; never reached when it works


class Hook:
    """Holds the compile of any grammar whose spec mentions "slow" until `release` is set."""

    def __init__(self):
        self.entered, self.release = threading.Event(), threading.Event()
        self.calls: list[str] = []  # the threads that compiled a slow grammar

    def install(self, monkeypatch):
        original = GrammarBackend._compile
        hook = self

        def _compile(backend, spec):
            if "slow" in spec.cache_key():
                hook.calls.append(threading.current_thread().name)
                hook.entered.set()
                assert hook.release.wait(WAIT_S), "the test never released the grammar"
            return original(backend, spec)

        monkeypatch.setattr(GrammarBackend, "_compile", _compile)


@pytest.fixture
def hook(monkeypatch):
    h = Hook()
    h.install(monkeypatch)
    yield h
    h.release.set()  # whatever happened, let the worker go


@pytest.fixture
def engine():  # one per test: its compiled-grammar cache must start empty
    model, tok = build_model("tiny-dense", seed=5, num_hidden_layers=1)
    return LLMEngine(model.eval(), tok, EngineConfig(kv_cache_bytes=16 << 20, num_threads=1, max_num_seqs=8))


def test_plain_request_finishes_while_a_grammar_compiles(engine, hook):
    with ServerThread(create_app(engine, served_model_name=NAME)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=WAIT_S)
        msg = [{"role": "user", "content": "hi"}]
        guided: list = []
        t = threading.Thread(target=lambda: guided.append(client.chat.completions.create(
            model=NAME, messages=msg, max_tokens=200, seed=1,
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SLOW}})))
        t.start()
        try:
            assert hook.entered.wait(WAIT_S)
            plain = client.chat.completions.create(model=NAME, messages=msg, max_tokens=8, seed=2)
            assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 8
            assert not hook.release.is_set() and t.is_alive() and not guided  # still compiling
        finally:
            hook.release.set()
            t.join(WAIT_S)
        (r,) = guided
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SLOW)
        assert len(hook.calls) == 1 and hook.calls[0].startswith("qiusuo-grammar")  # the engine's add hit the cache


class Recorder:
    """The core's emit: every StepOutput, and a condition to wait on."""

    def __init__(self):
        self.steps: list[StepOutput] = []
        self.cond = threading.Condition()

    def __call__(self, msg):
        with self.cond:
            self.steps.append(msg)
            self.cond.notify_all()

    def wait_for(self, predicate):
        with self.cond:
            assert self.cond.wait_for(lambda: predicate(self), WAIT_S)

    def acks(self):
        return [a for s in self.steps for a in s.acks]

    def errors(self):
        return dict(e for s in self.steps for e in s.errors)

    def finished(self):
        return {o.request_id for s in self.steps for o in s.outputs if o.finished}

    def output_ids(self):
        return {o.request_id for s in self.steps for o in s.outputs}


def test_core_abort_while_compiling_and_refusals(engine, hook):
    cmds, rec = queue.SimpleQueue(), Recorder()
    core = EngineCore(engine, cmds, rec)
    loop = threading.Thread(target=core.run, name="core")
    loop.start()
    ids = engine.tokenizer.encode("hello")
    guided = SamplingParams(max_tokens=50, structured_outputs=StructuredOutputsParams(json=SLOW))
    try:
        cmds.put(AddRequest("g", ids, guided))
        assert hook.entered.wait(WAIT_S)
        cmds.put(AbortRequest("g"))  # the client left while its grammar compiled
        cmds.put(AddRequest("p", ids, SamplingParams(max_tokens=4)))
        rec.wait_for(lambda r: "p" in r.finished())  # served while "g" was still held
        assert not hook.release.is_set() and core.compiling == {}  # the abort dropped "g" at once
        hook.release.set()
        bad = SamplingParams(max_tokens=5, structured_outputs=StructuredOutputsParams(regex="(unclosed"))
        cmds.put(AddRequest("bad", ids, bad))  # refused by the worker's compile: the request's 400
        again = SamplingParams(max_tokens=50, structured_outputs=StructuredOutputsParams(json=SLOW))
        cmds.put(AddRequest("g2", ids, again))  # the same grammar: compiled once, from the cache now
        rec.wait_for(lambda r: "bad" in r.errors() and "g2" in r.finished())
    finally:
        hook.release.set()
        cmds.put(Shutdown())
        loop.join(WAIT_S)
    assert not loop.is_alive()
    assert "compiled" in rec.errors()["bad"] and "bad" not in rec.acks()
    assert "g" not in rec.acks() and "g" not in rec.output_ids() and "g" not in rec.errors()
    assert rec.acks().count("p") == 1 and rec.acks().count("g2") == 1
    assert not engine.has_unfinished_requests() and core.compiling == {}
    assert len(hook.calls) == 1  # "g"'s compile, finished after its abort, served "g2"


def test_compiled_cache_keeps_property_order():
    """The grammar writes properties in the schema's order, so the cache must not merge two schemas
    that differ only in it (a sorted key did)."""
    import xgrammar as xgr

    from qiusuo.tokenizer import Tokenizer

    tok = Tokenizer.builtin()
    backend = GrammarBackend(tok, tok.vocab_size, [tok.eos_token_id])
    props = {"x": {"type": "integer"}, "y": {"type": "integer"}}
    xy, yx = ({"type": "object", "properties": dict(order), "required": ["x", "y"], "additionalProperties": False}
              for order in (list(props.items()), list(props.items())[::-1]))
    for schema, first in ((xy, b'{"x": 1, "y": 2}'), (yx, b'{"y": 1, "x": 2}')):
        m = xgr.GrammarMatcher(backend.compile(StructuredOutputsParams(json=schema)))
        assert m.accept_string(first) and m.accept_token(tok.eos_token_id)
    assert len(backend._cache) == 2
