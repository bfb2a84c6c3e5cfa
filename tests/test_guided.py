"""Structured outputs in the engine (engine/guided.py): a random-weight model sampled at T=1 under a
grammar gives output that validates on every sample, for a fixed corpus of real-world JSON schemas
(tests/data/json_schemas.json), through `LLM.generate` and `LLM.chat`; regex, choice and EBNF
grammars; the grammar waits for the think block to close; EOS only where the grammar accepts; bad
specs are refused at add_request.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch

from qiusuo.engine import LLM, EngineConfig, LLMEngine, SamplingParams, StructuredOutputsParams
from qiusuo.engine.guided import GrammarBackend
from qiusuo.tokenizer import Tokenizer

torch.set_num_threads(1)

SCHEMAS = {k: v for k, v in json.loads((Path(__file__).parent / "data" / "json_schemas.json").read_text()).items()
           if not k.startswith("_")}
CHECKER = jsonschema.Draft202012Validator.FORMAT_CHECKER


def check(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema, format_checker=CHECKER)


@pytest.fixture(scope="module")
def llm(make_checkpoint):
    # one layer: the grammar is what is tested, and the corpus runs 2 x 24 samples of up to ~450 tokens
    return LLM(make_checkpoint("tiny-dense", seed=3, num_hidden_layers=1), num_threads=1, max_num_seqs=64)


def test_corpus_has_twenty_schemas():
    assert len(SCHEMAS) >= 20


def test_every_schema_validates_generate(llm):
    """Each schema twice at T=1: with the default (bounded) free whitespace and compact."""
    names = sorted(SCHEMAS)
    params = [SamplingParams(temperature=1.0, max_tokens=450, seed=i,
                             structured_outputs=StructuredOutputsParams(json=SCHEMAS[k], disable_any_whitespace=compact))
              for compact in (False, True) for i, k in enumerate(names)]
    outs = llm.generate(["Answer in JSON:"] * len(params), params)
    for name, out in zip(names + names, outs):
        (o,) = out.outputs
        assert o.finish_reason == "stop", (name, o.text)
        check(o.text, SCHEMAS[name])


def test_chat_json_object_and_schema(llm):
    msgs = [{"role": "user", "content": "Give me an address as JSON."}]
    schema = SCHEMAS["address"]
    outs = llm.chat([msgs, msgs], [SamplingParams(max_tokens=300, seed=7, n=2,
                                                  structured_outputs=StructuredOutputsParams(json=schema)),
                                   SamplingParams(max_tokens=450, seed=8, n=4,
                                                  structured_outputs=StructuredOutputsParams(json_object=True,
                                                                                             disable_any_whitespace=True))])
    for o in outs[0].outputs:
        check(o.text, schema)
    # json_object leaves keys and strings unbounded: a random model may still be inside one at max_tokens
    done = [o for o in outs[1].outputs if o.finish_reason == "stop"]
    assert done and all(len(o.token_ids) == 450 for o in outs[1].outputs if o not in done)
    for o in outs[1].outputs:
        assert o.text.startswith("{") and "\n" not in o.text and "\t" not in o.text  # compact: no free whitespace
    for o in done:
        assert isinstance(json.loads(o.text), dict)


def test_regex_choice_grammar(llm):
    outs = llm.generate(["x"] * 3, [
        SamplingParams(max_tokens=40, seed=1, n=4, structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2}")),
        SamplingParams(max_tokens=40, seed=2, n=4, structured_outputs=StructuredOutputsParams(choice=["yes", "no", "a|b"])),
        SamplingParams(max_tokens=40, seed=3, n=4, structured_outputs=StructuredOutputsParams(
            grammar='root ::= "(" digit+ ("+" digit+)* ")"\ndigit ::= [0-9]')),
    ])
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2}", o.text) for o in outs[0].outputs)
    assert all(o.text in ("yes", "no", "a|b") for o in outs[1].outputs)
    assert all(re.fullmatch(r"\([0-9]+(\+[0-9]+)*\)", o.text) for o in outs[2].outputs)
    assert all(o.finish_reason == "stop" for out in outs for o in out.outputs)


def test_greedy_and_ignore_eos_terminate(llm):
    """Greedy decoding is masked too; with ignore_eos the completed grammar still ends the sample."""
    for p in (SamplingParams(temperature=0, max_tokens=60, structured_outputs={"choice": ["alpha", "beta"]}),
              SamplingParams(max_tokens=60, seed=5, ignore_eos=True, structured_outputs={"choice": ["alpha", "beta"]})):
        (out,) = llm.generate(["q"], p)
        assert out.outputs[0].text in ("alpha", "beta") and out.outputs[0].finish_reason == "stop"


def test_stop_string_and_max_tokens_cut_the_grammar(llm):
    (out,) = llm.generate(["q"], SamplingParams(max_tokens=3, seed=1, structured_outputs={"json": SCHEMAS["address"]}))
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 3


@pytest.mark.parametrize("spec, fragment", [
    ({"json": "{not json"}, "not valid JSON"),
    ({"regex": "(unclosed"}, "could not be compiled"),
    ({"grammar": "root ::= missing_rule"}, "could not be compiled"),
    ({"choice": []}, "non-empty list"),
    ({"json": {"type": "object"}, "regex": "a"}, "exactly one"),
    ({}, "exactly one"),
])
def test_bad_specs_are_refused(llm, spec, fragment):
    with pytest.raises(ValueError, match=fragment):
        llm.generate(["q"], SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(**spec)))
    assert not llm.llm_engine.has_unfinished_requests()


def _byte_sequences():
    """Every 1- and 2-byte sequence, and 3- and 4-byte ones over every lead and second byte: the valid
    UTF-8 characters of each length and every kind of invalid one (stray continuation, overlong,
    surrogate, above U+10FFFF, bad lead)."""
    yield from (bytes([a]) for a in range(256))
    yield from (bytes([a, b]) for a in range(0xC0, 0x100) for b in range(0x80, 0xC0))
    yield from (bytes([a, b, c]) for a in range(0xE0, 0x100) for b in range(0x80, 0xC0) for c in (0x80, 0xBF))
    yield from (bytes([a, b, 0x80, 0x80]) for a in range(0xF0, 0x100) for b in range(0x80, 0xC0))


def _one_json_char(seq: bytes) -> bool:
    try:
        text = seq.decode("utf-8")  # strict: overlongs and surrogates are errors
    except UnicodeDecodeError:
        return False
    return len(text) == 1 and text >= " " and text not in '"\\'


def _whole(compiled, data: bytes) -> bool:
    """The grammar takes `data` as its whole output (not only a prefix)."""
    import xgrammar as xgr

    m = xgr.GrammarMatcher(compiled)
    return m.accept_string(data) and m.accept_token(TOK.eos_token_id)


@pytest.mark.parametrize("schema", [{"type": "string", "maxLength": 1},
                                    {"type": "string", "minLength": 1, "maxLength": 1},
                                    {"type": ["string", "null"], "maxLength": 1}])
def test_length_bounded_string_takes_exactly_one_character(schema):
    """A string of maxLength 1 takes exactly the byte sequences that decode to one JSON character.
    xgrammar 0.2.9 took raw control characters, UTF-8-encoded surrogates (ED A0 80) and, when the
    bound went through a pattern, overlong forms (E0 80 80, F0 80 80 80): one character to the
    grammar, several U+FFFD once decoded, so maxLength 12 gave a 14-character tool argument."""
    backend = GrammarBackend(TOK, TOK.vocab_size, [TOK.eos_token_id])
    compiled = backend.compile(StructuredOutputsParams(json=schema))
    wrong = [seq.hex() for seq in _byte_sequences()
             if _whole(compiled, b'"' + seq + b'"') != _one_json_char(seq)]
    assert not wrong, wrong[:20]
    for escape in (b'"\\n"', b'"\\""', b'"\\\\"'):  # JSON's short escapes count as one character
        assert _whole(compiled, escape), escape
    assert not _whole(compiled, b'"ab"')
    assert _whole(compiled, b'""') == ("minLength" not in schema)


def test_unbounded_string_takes_only_valid_utf8():
    """An unbounded string's characters: no surrogate encodings (three U+FFFD once decoded)."""
    backend = GrammarBackend(TOK, TOK.vocab_size, [TOK.eos_token_id])
    schema = {"type": "object", "properties": {"s": {"type": "string"}}}
    compiled = backend.compile(StructuredOutputsParams(json=schema))
    wrong = [seq.hex() for seq in _byte_sequences()
             if _whole(compiled, b'{"s": "' + seq + b'"}') != _one_json_char(seq)]
    assert not wrong, wrong[:20]


# --- reasoning stays free: a scripted model writes its think block, then the grammar takes over -----------
TOK = Tokenizer.builtin()
THINK, END, EOS = TOK.think_start_id, TOK.think_end_id, TOK.eos_token_id
ASSISTANT = TOK.token_to_id("<|assistant|>")


def b(ch: str) -> int:
    (tid,) = TOK.encode(ch)
    return tid


def scripted_engine(table):
    from tests.test_serve_reasoning import ScriptedModel

    return LLMEngine(ScriptedModel(table).eval(), TOK, EngineConfig(kv_cache_bytes=8 << 20, num_threads=1))


def run(engine, prompt, params):
    engine.add_request("r", prompt, params)
    while engine.has_unfinished_requests():
        outs = engine.step(finished_only=True)
        if outs:
            return outs[0].outputs[0]


def test_grammar_waits_for_the_think_block():
    """The model reasons 'r?x' (not JSON) inside a think block it opens itself; the JSON comes after `</think>`.
    The script also wants eos right after the reasoning: eos is masked until the grammar is complete."""
    table = {ASSISTANT: THINK, THINK: b("r"), b("r"): b("?"), b("?"): b("x"), b("x"): END, END: EOS}
    engine = scripted_engine(table)
    prompt = TOK.apply_chat_template([{"role": "user", "content": "hi"}])
    spec = StructuredOutputsParams(json=SCHEMAS["enum_status"], allow_think_block=True)
    o = run(engine, prompt, SamplingParams(max_tokens=200, seed=0, structured_outputs=spec, skip_special_tokens=True))
    assert o.text.startswith("<think>r?x</think>")
    check(o.text.split("</think>", 1)[1], SCHEMAS["enum_status"])
    # Without allow_think_block the first token must already be JSON: the scripted <think> is masked.
    o = run(engine, prompt, SamplingParams(max_tokens=200, seed=0,
                                           structured_outputs=StructuredOutputsParams(json=SCHEMAS["enum_status"])))
    assert "<think>" not in o.text
    check(o.text, SCHEMAS["enum_status"])


def test_prompt_opened_think_block_and_no_eos_inside():
    """A template that appends <think>: the output starts inside the block; the script's eos there is masked."""
    table = {THINK: b("r"), b("r"): EOS}
    engine = scripted_engine(table)
    prompt = TOK.encode("<bos><|user|>hi<|assistant|><think>")
    o = run(engine, prompt, SamplingParams(max_tokens=60, seed=0, structured_outputs={"choice": ["ok"]}))
    # eos is refused while reasoning, so the scripted model's next-best (uniform) tokens continue it
    assert o.finish_reason == "length" or ("</think>" in o.text and o.text.endswith("ok"))
    assert not o.text.startswith("<think>") and o.text.startswith("r")
