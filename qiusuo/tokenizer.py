"""The tokenizer part: a thin wrapper over the `tokenizers` library, plus chat templates.

`Tokenizer.builtin()` is the small vocabulary of the built-in tasks: a byte-level BPE with no
merges, so every byte (every ASCII character) is exactly one token and any text round-trips.
It is a plain GPT-2-style BPE (vocab + empty merges list) so llama.cpp can load it as a GGUF
"gpt2" tokenizer. Layout: ids 0..9 are the added tokens of `BUILTIN_ADDED_TOKENS`, byte `b` is
id `10 + b`.

The think/answer tags are added tokens with `special=False`, as `<think>` is in DeepSeek-R1's
tokenizer: they are always single tokens, but `decode(..., skip_special_tokens=True)` keeps them
as text (the engine and the rewards read them) while it drops pad/bos/eos and the role markers.

Chat templates render exactly as transformers' `apply_chat_template(..., tokenize=False)` does:
same sandboxed Jinja environment, globals, `tojson` filter and template variables.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer

# (content, special); ids are the positions. Only the tags are non-special, see the docstring.
BUILTIN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<pad>", True), ("<bos>", True), ("<eos>", True),
    ("<think>", False), ("</think>", False), ("<answer>", False), ("</answer>", False),
    ("<|system|>", True), ("<|user|>", True), ("<|assistant|>", True),
)  # fmt: skip

# DeepSeek-R1's shape: bos once, role markers, eos after each assistant turn.
BUILTIN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('Unknown role ' + message['role'] + \"; the built-in template "
    "knows 'system', 'user' and 'assistant'\") }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def prompt_chat_template(prefix: str = "", suffix: str = "", generation_prompt: str = "",
                         sentence: bool = False) -> str:
    """A chat template for a model trained on bare prompts (no role markers): bos, then each user
    message as `prefix + content + suffix`, each assistant message as its content + eos, and
    `generation_prompt` (e.g. `<think>`) after the last turn.

    So `apply_chat_template([{"role": "user", "content": q}])` is exactly the text the model was
    trained on for question `q`. `sentence=True` strips the message and ends it with a period unless
    it ends with . ? or ! (R1-Zero's "User: prompt. Assistant:"). A system message is refused: the
    model never saw one, and a prompt it never saw gives answers as wrong as unseen role markers do.
    """

    def text(s: str) -> str:  # a JSON string is a valid Jinja string literal, escapes and all
        return "{{ " + json.dumps(s) + " }}" if s else ""

    content = ("{% set q = message['content'] | trim %}{{ q if q[-1:] in ['.', '?', '!'] else q + '.' }}"
               if sentence else "{{ message['content'] }}")
    return (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}" + text(prefix) + content + text(suffix) +
        "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
        "{% else %}{{ raise_exception('this model was trained on bare prompts, with no ' + message['role'] + "
        "' role; send only user and assistant messages') }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}" + text(generation_prompt) + "{% endif %}"
    )


# The names transformers passes to a chat template (its `special_tokens_map`).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers copies a message's reasoning under all of these names before rendering.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (what the ByteLevel components use)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, shift = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:  # unprintable bytes go to code points past 255, in byte order
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as AddedToken dicts."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


class Tokenizer:
    """A `tokenizers.Tokenizer` with the named special tokens and chat template of an HF directory."""

    def __init__(self, tokenizer: _HFTokenizer, special_tokens: Mapping[str, str | None] | None = None,
                 chat_template: str | None = None, model_max_length: int = 4096):
        self.tokenizer = tokenizer
        self.special_tokens_map = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        unknown = set(self.special_tokens_map) - set(SPECIAL_TOKEN_NAMES)
        if unknown:
            raise ValueError(f"unknown special token names {sorted(unknown)}; use {SPECIAL_TOKEN_NAMES}")
        for name, token in self.special_tokens_map.items():
            if tokenizer.token_to_id(token) is None:
                raise ValueError(f"{name}={token!r} is not in the vocabulary; add it to tokenizer.json first")
        self.chat_template = chat_template
        self.model_max_length = model_max_length

    # ---- construction and files ------------------------------------------------------------
    @classmethod
    def builtin(cls) -> "Tokenizer":
        """The byte-level, no-merges tokenizer of the built-in tasks (266 tokens)."""
        byte_chars = bytes_to_unicode()
        vocab = {content: i for i, (content, _) in enumerate(BUILTIN_ADDED_TOKENS)}
        vocab.update({byte_chars[b]: len(BUILTIN_ADDED_TOKENS) + b for b in range(256)})
        tok = _HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        # `encode(text, add_special_tokens=True)` prepends bos, in tokenizers and transformers alike.
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B:1", special_tokens=[("<bos>", 1)]
        )
        # The tokens are already in the vocab, so these keep ids 0..9 (added tokens reuse model ids).
        tok.add_tokens([AddedToken(c, special=s, normalized=False) for c, s in BUILTIN_ADDED_TOKENS])
        return cls(tok, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
                   BUILTIN_CHAT_TEMPLATE)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load `tokenizer.json` + `tokenizer_config.json` (+ `chat_template.jinja`), ours or transformers'."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"{path} has no tokenizer.json; only fast (tokenizers) tokenizers are supported")
        tok = _HFTokenizer.from_file(str(path / "tokenizer.json"))
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins over the legacy map
            if (path / name).is_file():
                config.update(json.loads((path / name).read_text(encoding="utf-8")))
        # Tokens listed only in the config (older transformers) must exist in the vocabulary too.
        for _, entry in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
            if tok.token_to_id(entry["content"]) is None:
                tok.add_tokens([AddedToken(entry["content"], special=entry.get("special", True),
                                           normalized=entry.get("normalized", False))])
        template = config.get("chat_template")
        if isinstance(template, list):  # the older multi-template form: [{"name", "template"}, ...]
            template = {t["name"]: t["template"] for t in template}.get("default")
        if (path / "chat_template.jinja").is_file():  # transformers >= 4.52 writes the template here
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        specials = {name: _token_content(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        for token in specials.values():  # transformers adds a named special token the vocabulary lacks
            if token is not None and tok.token_to_id(token) is None:
                tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        max_len = config.get("model_max_length")
        return cls(tok, specials, template, int(max_len) if isinstance(max_len, (int, float)) else 4096)

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` and a `tokenizer_config.json` that `AutoTokenizer` loads."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path / "tokenizer.json"))
        added = self.tokenizer.get_added_tokens_decoder()
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self.special_tokens_map,
            "model_max_length": self.model_max_length,
            # transformers would otherwise "clean up" spaces before punctuation when decoding.
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": {
                str(i): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip, "normalized": t.normalized,
                         "single_word": t.single_word, "special": t.special}
                for i, t in sorted(added.items())
            },
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")
        # A stale template file from an earlier save would override the config on load.
        (path / "chat_template.jinja").unlink(missing_ok=True)

    # ---- vocabulary ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    def _named_id(self, name: str) -> int | None:
        token = self.special_tokens_map.get(name)
        return None if token is None else self.token_to_id(token)

    bos_token = property(lambda self: self.special_tokens_map.get("bos_token"))
    eos_token = property(lambda self: self.special_tokens_map.get("eos_token"))
    pad_token = property(lambda self: self.special_tokens_map.get("pad_token"))
    bos_token_id = property(lambda self: self._named_id("bos_token"))
    eos_token_id = property(lambda self: self._named_id("eos_token"))
    pad_token_id = property(lambda self: self._named_id("pad_token"))
    think_start_id = property(lambda self: self.token_to_id("<think>"))
    think_end_id = property(lambda self: self.token_to_id("</think>"))
    answer_start_id = property(lambda self: self.token_to_id("<answer>"))
    answer_end_id = property(lambda self: self.token_to_id("</answer>"))

    @property
    def special_ids(self) -> set[int]:
        """Ids that `decode(..., skip_special_tokens=True)` drops (the think/answer tags are not among them)."""
        return {i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}

    # ---- text <-> ids -------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of `text`; special-token strings in it become their single ids, as in transformers."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self, skip_special_tokens: bool = False) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens)

    # ---- chat -----------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, chat_template: str | None = None,
                            **kwargs: Any) -> str | list[int]:
        """Render `messages` as transformers' `apply_chat_template(..., tokenize=False)` would.

        Unlike transformers, `add_generation_prompt` defaults to True (callers here mostly prompt).
        """
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat template; pass chat_template= or set tokenizer.chat_template")
        chat = _check_messages(messages)
        variables = {**self.special_tokens_map, **kwargs}
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        try:
            text = _compile(template).render(messages=chat, add_generation_prompt=add_generation_prompt,
                                             **variables)
        except jinja2.TemplateError as e:  # raise_exception() and template bugs alike
            raise ValueError(f"chat template failed: {e}") from e
        return self.encode(text) if tokenize else text



def bos_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """[bos] + prompt tokens: the text prompts every stage trains on (`qiusuo.tasks.prompts.prompt_ids` builds a
    problem's prompt with it); any tokenizer with `bos_token_id` and `encode`, this one or transformers'."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer.encode(prompt)


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validate and normalize messages the way transformers does before rendering."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or len(messages) == 0:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ValueError(f"message {i} must be a dict with a string 'role', got {message!r}")
        if message.get("content") is None and not message.get("tool_calls"):
            raise ValueError(f"message {i} ({message['role']}) has no 'content'; give it a string (may be empty)")
        # transformers drops None values (OpenAI sends content=None with tool calls) and copies reasoning.
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    return chat


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' override: Jinja's own tojson HTML-escapes `<`, `>`, `&` and `'`.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)  # compiling is ~1 ms; a server renders the same template per request
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template is not valid Jinja: {e}") from e


class IncrementalDecoder:
    """Streaming decode: `step(id)` returns the new text, holding back incomplete UTF-8 characters.

    The concatenation of every `step` and a final `flush` equals `decode(all_ids)`. Each step
    decodes a short window of recent ids (the TGI/vLLM prefix-offset scheme), so the cost per
    token does not grow with the length of the output.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_offset = 0  # window start: decoding context for the text already emitted
        self._read_offset = 0  # ids before this have been emitted

    def _window_delta(self) -> tuple[str, str]:
        prefix = self.tokenizer.decode(self.ids[self._prefix_offset:self._read_offset], self.skip_special_tokens)
        full = self.tokenizer.decode(self.ids[self._prefix_offset:], self.skip_special_tokens)
        return prefix, full

    def step(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix, full = self._window_delta()
        # U+FFFD at the end means the last token ended mid-character: wait for the rest of it.
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end decodes to U+FFFD)."""
        prefix, full = self._window_delta()
        self._prefix_offset = self._read_offset = len(self.ids)
        return full[len(prefix):]


__all__ = ["Tokenizer", "IncrementalDecoder", "bos_prompt_ids", "BUILTIN_ADDED_TOKENS", "BUILTIN_CHAT_TEMPLATE",
           "bytes_to_unicode", "prompt_chat_template"]
