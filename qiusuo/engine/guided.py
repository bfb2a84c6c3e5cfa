"""Guided (structured) decoding: a request's output is held to a JSON schema, regex, choice or grammar.

The grammar engine is xgrammar (https://github.com/mlc-ai/xgrammar), what vLLM and SGLang use; it
runs on CPU. The request carries a `StructuredOutputsParams` (vLLM's name and fields) on its
`SamplingParams.structured_outputs`; the engine compiles it once per request (`GrammarBackend`,
which keeps the last `COMPILED_CACHE_SIZE` compiled grammars; the server compiles on a worker thread
first, serve/core.py, so a slow grammar never stalls the decode loop) and gives each sample its
own `GuidedState` (a `GrammarMatcher`).
Per step the sampler asks every guided row for its token bitmask and masks the logits in place
(before temperature, top-k/top-p and the Gumbel draw, so sampling stays exact over the allowed set);
`Sequence.append_token` then advances the row's matcher with the sampled token.

Reasoning stays free. The think-block state comes from the one reasoning module (`ThinkState`):
while a sample is inside a think block (a template that appends `<think>`, or a model that opens one
with its first token when `allow_think_block` is set) nothing is masked except the stop tokens, so the
model must close the block and then answer in the grammar; the matcher starts at the token after
`</think>`. Think tags and special tokens are never part of the grammar's language (their text is
empty to xgrammar), so a JSON string cannot smuggle a `</think>`.

Stop: a stop token is allowed only where the grammar accepts the output so far (xgrammar's stop
tokens are the sequence's own: eos unless `ignore_eos`, plus `stop_token_ids`). A grammar that is
complete and terminated ends the sample with finish_reason "stop" even when its stop token is not
one (`ignore_eos`). Aborts and stop strings drop the matcher with the sequence. The engine has no
speculative decoding yet, so no rollback is needed; `GrammarMatcher.rollback` is where it would go.

Whitespace: JSON grammars allow any whitespace between tokens, but at most `MAX_WHITESPACE` characters
in a row, so a weak model cannot loop on spaces forever (a known failure of unbounded JSON grammars);
`disable_any_whitespace` gives compact JSON (", " and ": " separators only).
"""

from __future__ import annotations

import json as _json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

MAX_WHITESPACE = 16  # per run: room for indentation 4 at depth 3 plus the newline
COMPILED_CACHE_SIZE = 64  # compiled grammars kept per engine (a tool set or schema repeats across requests)
MAX_STRUCTURES = 8  # tool calls in one `structures` output (a parallel-call cap, and grammar size)


@dataclass
class StructuredOutputsParams:
    """vLLM's `StructuredOutputsParams`: exactly one of json, regex, choice, grammar, json_object,
    structures is set.

    json: a JSON schema (dict or JSON text). regex: a regular expression the whole output matches.
    choice: the output is exactly one of these strings. grammar: an EBNF grammar (xgrammar's dialect
    of GBNF, root rule `root`). json_object: any JSON object (OpenAI's `json_object`).
    structures: [{"begin": str, "schema": dict, "end": str}, ...]: the output is 1..max_structures
    of them back to back (tool calls: `tool_choice` "required" or a named function).
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    structures: list[dict] | None = None
    max_structures: int = 1
    disable_any_whitespace: bool = False
    allow_think_block: bool = False  # the model may open a think block with its first token
    kind: str = field(init=False, repr=False)

    def __post_init__(self):
        set_ = [k for k in ("json", "regex", "choice", "grammar", "structures") if getattr(self, k) is not None]
        if self.json_object:
            set_.append("json_object")
        if len(set_) != 1:
            raise ValueError(f"structured outputs: give exactly one of json, regex, choice, grammar, json_object, "
                             f"structures; got {set_ or 'none'}")
        self.kind = set_[0]
        if isinstance(self.json, str):
            try:
                self.json = _json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured outputs: json is not valid JSON text ({e}); give a JSON schema") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError("structured outputs: json must be a JSON schema (an object)")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("structured outputs: choice must be a non-empty list of non-empty strings")
        for k in ("regex", "grammar"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"structured outputs: {k} must be a non-empty string")
        if self.structures is not None:
            if not isinstance(self.structures, list) or not self.structures:
                raise ValueError("structured outputs: structures must be a non-empty list of {begin, schema, end}")
            for s in self.structures:
                if (not isinstance(s, dict) or not isinstance(s.get("begin"), str) or not isinstance(s.get("end"), str)
                        or not isinstance(s.get("schema"), (dict, bool))):
                    raise ValueError("structured outputs: each structure is {'begin': str, 'schema': dict, 'end': str}")
        if not isinstance(self.max_structures, int) or not 1 <= self.max_structures <= MAX_STRUCTURES:
            raise ValueError(f"structured outputs: max_structures={self.max_structures!r} must be in [1, {MAX_STRUCTURES}]")

    def cache_key(self) -> str:
        """What the compiled grammar depends on. Keys keep their order: a schema's property order is
        the order the grammar writes them in."""
        return _json.dumps([self.kind, getattr(self, self.kind), self.max_structures, self.disable_any_whitespace])


def _xgr():
    try:
        import xgrammar
    except ImportError as e:  # the `structured` extra (pyproject.toml); without it, one clear error
        raise ValueError(f"structured outputs need xgrammar: pip install 'qiusuo[structured]' ({e})") from None
    return xgrammar


def _regex_literal(text: str) -> str:
    out = []
    for ch in text:
        out.append("\\" + ch if ch in r".^$*+?()[]{}|\/-" else ch.replace("\n", r"\n").replace("\t", r"\t"))
    return "".join(out)


class GrammarBackend:
    """One per engine: the tokenizer's vocabulary as xgrammar sees it, and a grammar compiler."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]):
        xgr = _xgr()
        self.xgr = xgr
        self.vocab_size = vocab_size
        hf = tokenizer.tokenizer  # the `tokenizers.Tokenizer` inside qiusuo's wrapper
        try:
            meta = xgr.TokenizerInfo._detect_metadata_from_hf(hf.to_str())
            vocab_type, prefix_space = meta["vocab_type"], meta["add_prefix_space"]
        except Exception as e:  # noqa: BLE001 - xgrammar raises its own error types from C++
            raise ValueError(f"structured outputs: xgrammar cannot read this tokenizer's type ({e})") from None
        added = hf.get_added_tokens_decoder()
        think = {getattr(tokenizer, "think_start_id", None), getattr(tokenizer, "think_end_id", None)}
        # Special added tokens and the think tags have no text for the grammar: never generated in
        # it. Other added tokens (DeepSeek's tool-call markers) are their literal text.
        encoded = [""] * vocab_size
        for tok, i in hf.get_vocab(with_added_tokens=True).items():
            if i >= vocab_size:
                continue
            if i in added:
                encoded[i] = "" if (added[i].special or i in think) else _raw_for(tok, vocab_type, xgr)
            else:
                encoded[i] = tok
        self.info = xgr.TokenizerInfo(encoded, vocab_type, vocab_size=vocab_size,
                                      stop_token_ids=sorted(stop_token_ids) or None, add_prefix_space=prefix_space)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self._lock = threading.Lock()  # one compile at a time
        self._cache: OrderedDict[str, Any] = OrderedDict()  # cache_key -> compiled grammar, least recent first
        self._cache_lock = threading.Lock()  # never held while compiling: a lookup does not wait for a compile

    def compile(self, spec: StructuredOutputsParams):
        """The spec's compiled grammar, from the cache when it was compiled before (the serving core
        compiles on a worker thread, then the engine's add_request finds it here)."""
        key = spec.cache_key()
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        compiled = self._compile(spec)
        with self._cache_lock:
            self._cache[key] = compiled
            while len(self._cache) > COMPILED_CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: StructuredOutputsParams):
        xgr = self.xgr
        ws = dict(any_whitespace=not spec.disable_any_whitespace,
                  max_whitespace_cnt=None if spec.disable_any_whitespace else MAX_WHITESPACE)
        try:
            with self._lock:
                if spec.kind == "json":
                    return self.compiler.compile_grammar(json_schema_grammar(xgr, spec.json, **ws))
                if spec.kind == "json_object":
                    return self.compiler.compile_grammar(json_schema_grammar(xgr, {"type": "object"}, **ws))
                if spec.kind == "regex":
                    return self.compiler.compile_regex(spec.regex)
                if spec.kind == "choice":
                    return self.compiler.compile_regex("|".join(f"({_regex_literal(c)})" for c in spec.choice))
                if spec.kind == "grammar":
                    return self.compiler.compile_grammar(spec.grammar)
                return self.compiler.compile_grammar(self._structures(spec, ws))
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - xgrammar's errors (RuntimeError, its own types) name the problem
            raise ValueError(f"structured outputs: the {spec.kind} could not be compiled: {e}") from None

    def _structures(self, spec: StructuredOutputsParams, ws: dict):
        G = self.xgr.Grammar
        one = [G.concat(*[g for g in (G.from_regex(_regex_literal(s["begin"])) if s["begin"] else None,
                                      json_schema_grammar(self.xgr, s["schema"], **ws),
                                      G.from_regex(_regex_literal(s["end"])) if s["end"] else None) if g is not None])
               for s in spec.structures]
        call = G.union(*one) if len(one) > 1 else one[0]
        options = [G.concat(*[call] * k) if k > 1 else call for k in range(1, spec.max_structures + 1)]
        return G.union(*options) if len(options) > 1 else options[0]


_SUBSCHEMA_KEYS = ("items", "additionalProperties", "not", "if", "then", "else", "contains")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")

# One JSON string character, exactly: a printable code point other than `"` and `\` (raw controls
# are invalid JSON), in ranges that each stay within one UTF-8 length and skip the surrogates.
JSON_CHAR = r'[ !#-\[\]-\u007f\u0080-\u07ff\u0800-\ud7ff\ue000-\uffff\U00010000-\U0010ffff]'
# The classes xgrammar 0.2.9 prints for them: an unbounded string's character, and a length-bounded
# string's (`<rule>_characters`, which has no escapes).
_XGR_STRING_CHAR = r'[^\0-\x1f\"\\\r\n]'
_XGR_BOUNDED_CHAR = r'[^\"\\\r\n]'


def json_schema_grammar(xgr, schema: Any, **ws):
    """xgrammar's grammar for a JSON schema, with its string characters made exact (xgrammar 0.2.9).

    xgrammar writes a JSON string's character as a negated class. Its length-bounded strings
    (minLength/maxLength) use `[^"\\\r\n]`, which lets raw control characters through (invalid
    JSON). Both negated classes also take UTF-8-encoded surrogates (ED A0..BF xx): one character to
    the grammar, but three U+FFFD once decoded, which breaks maxLength (and puts garbage into any
    string). A positive class whose ranges each stay within one UTF-8 length is exact, so the
    grammar's text is rewritten to use `JSON_CHAR`; bounded strings also get JSON's short escapes
    (each decodes to one character, so lengths still count right).

    (A `pattern` instead is no way out: xgrammar compiles patterns with a regex automaton whose
    ranges that span UTF-8 lengths take overlong forms, E0 80..9F xx and F0 80..8F xx xx, each
    again several U+FFFD once decoded; and its size grows with the repeat count, so maxLength 2000
    took 10 s to compile where the grammar's own repetition takes milliseconds.)
    """
    text = str(xgr.Grammar.from_json_schema(schema_workarounds(schema), **ws))
    text = text.replace(_XGR_STRING_CHAR, JSON_CHAR)
    text = text.replace(_XGR_BOUNDED_CHAR, f'({JSON_CHAR} | "\\\\" [\\"\\\\/bfnrt])')
    return xgr.Grammar.from_ebnf(text)


def schema_workarounds(schema: Any) -> Any:
    """A copy of `schema` with the keywords xgrammar 0.2.9 gets wrong rewritten to equivalents:
    `format: ipv4` allows leading zeros ("10.077.0.1"), which RFC 3986 and jsonschema refuse, so it
    becomes the exact pattern."""
    if isinstance(schema, list):
        return [schema_workarounds(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for k in _SUBSCHEMA_KEYS:
        if isinstance(out.get(k), (dict, list)):
            out[k] = schema_workarounds(out[k])
    for k in _SUBSCHEMA_LISTS:
        if isinstance(out.get(k), list):
            out[k] = [schema_workarounds(s) for s in out[k]]
    for k in _SUBSCHEMA_MAPS:
        if isinstance(out.get(k), dict):
            out[k] = {name: schema_workarounds(s) for name, s in out[k].items()}
    if out.get("format") == "ipv4" and "pattern" not in out:
        octet = "(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
        out.pop("format")
        out["pattern"] = f"^({octet}\\.){{3}}{octet}$"
    return out


def _raw_for(token: str, vocab_type, xgr) -> str:
    """An added token's content in the vocabulary's encoding (byte-level BPE maps bytes to printable chars)."""
    if vocab_type != xgr.VocabType.BYTE_LEVEL:
        return token
    from qiusuo.tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return "".join(table[b] for b in token.encode("utf-8"))


class GuidedState:
    """One sample's grammar: its matcher and where it is relative to the think block."""

    __slots__ = ("matcher", "think", "allow_think", "stop_ids", "started", "rejected")

    def __init__(self, backend: GrammarBackend, compiled, think, stop_ids: frozenset[int], allow_think: bool):
        self.matcher = backend.xgr.GrammarMatcher(compiled, override_stop_tokens=sorted(stop_ids) or None)
        self.think = think  # reasoning.ThinkState (its start/end ids may be None)
        self.allow_think = allow_think and think.start_id is not None
        self.stop_ids = stop_ids
        self.started = False  # the first output token was sampled
        self.rejected = False

    @property
    def free(self) -> bool:
        """Inside a think block: the grammar waits."""
        return self.think.inside

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write this row's allowed tokens into bitmask[row] (bit set = allowed)."""
        if self.free:
            bitmask[row].fill_(-1)
            for t in self.stop_ids:  # the answer must come: no stop inside the reasoning
                bitmask[row, t >> 5] &= ~_bit(t)
            return
        self.matcher.fill_next_token_bitmask(bitmask, row)
        if self.allow_think and not self.started:
            t = self.think.start_id
            bitmask[row, t >> 5] |= _bit(t)

    def accept(self, token_id: int) -> bool:
        """Advance with the sampled token; True when the sample must stop here (grammar terminated)."""
        first, self.started = not self.started, True
        was_free = self.think.inside
        if self.think.step(token_id) or was_free:
            return False  # a think tag, or reasoning: the grammar has not started
        if first and self.allow_think and token_id == self.think.start_id:
            return False
        if not self.matcher.accept_token(token_id):
            self.rejected = True
            return True
        return self.matcher.is_terminated()


def _bit(token_id: int) -> int:
    """Token's bit in its int32 bitmask word, as a signed 32-bit value (bit 31 is negative)."""
    b = 1 << (token_id & 31)
    return b - (1 << 32) if b >= 1 << 31 else b


class GrammarStats:
    """Time spent filling and applying masks, and the tokens it was spent on (the engine's stats)."""

    def __init__(self):
        self.seconds = 0.0
        self.tokens = 0

    def add(self, t0: float, rows: int) -> None:
        self.seconds += time.perf_counter() - t0
        self.tokens += rows


__all__ = ["StructuredOutputsParams", "GrammarBackend", "GuidedState", "GrammarStats", "MAX_WHITESPACE"]
