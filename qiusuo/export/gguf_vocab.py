"""The tokenizer as GGUF metadata: llama.cpp's `gpt2` (byte-level BPE) tokenizer model.

What llama.cpp needs (src/llama-vocab.cpp): the token strings in GPT-2's byte-to-unicode
alphabet, a type per token, the merges, a `tokenizer.ggml.pre` name that selects the
pre-tokenizer regex, the bos/eos/pad ids, and the chat template.

- Token types: added tokens with `special=True` (pad, bos, eos, role markers) are CONTROL: they
  are never produced from plain text and print as nothing, like `skip_special_tokens`. The
  think/answer tags (`special=False`) are USER_DEFINED: always one token, printed as text.
- Pre-tokenizer: only a plain `ByteLevel(add_prefix_space=False, use_regex=True)` is accepted; it
  is GPT-2's regex, llama.cpp's `gpt-2` pre type. Anything else is refused rather than exported
  with a regex that splits text differently.
- Merges: the built-in tokenizer has none, but llama.cpp refuses a `gpt2` vocabulary without the
  merges key and gguf-py refuses to write an empty array. One merge of two multi-character added
  tokens is written instead: BPE symbols start as single characters and added tokens are split
  off before BPE, so that pair never occurs and the merge never fires.
"""

from __future__ import annotations

import json
from typing import Any

import gguf

GPT2_PRE = "gpt-2"


def tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    return json.loads(tokenizer.tokenizer.to_str())


def check_tokenizer(tokenizer: Any, vocab_size: int) -> None:
    """Raise ValueError if llama.cpp's gpt2 tokenizer cannot reproduce `tokenizer`."""
    spec = tokenizer_json(tokenizer)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer model {model.get('type')!r}: GGUF export supports byte-level BPE only")
    if spec.get("normalizer") is not None:
        raise ValueError("tokenizer has a normalizer; llama.cpp's gpt2 tokenizer applies none, so export would "
                         "tokenize differently")
    pre = spec.get("pre_tokenizer") or {}
    if not (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)):
        raise ValueError(f"tokenizer pre_tokenizer {pre!r}: only ByteLevel(add_prefix_space=False, use_regex=True) "
                         f"maps onto a llama.cpp pre-tokenizer ({GPT2_PRE!r})")
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {vocab_size}")


def _merges(spec: dict[str, Any], added: dict[int, Any]) -> list[str]:
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    if merges:
        return merges
    names = [t.content for _, t in sorted(added.items()) if len(t.content) > 1 and " " not in t.content]
    if len(names) < 2:
        raise ValueError("tokenizer has no merges and too few added tokens to write an inert merge")
    return [f"{names[0]} {names[1]}"]  # never fires, see the module docstring


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    """Write tokens, types, merges, special ids and chat template into `writer`."""
    check_tokenizer(tokenizer, vocab_size)
    spec = tokenizer_json(tokenizer)
    added = tokenizer.tokenizer.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        token = tokenizer.id_to_token(i)
        if token is None:  # the model has rows the tokenizer never produces
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(GPT2_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(spec, added))
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is not None:
            add(token_id)
    # Whether plain encoding adds bos/eos: ask the tokenizer rather than parse its post-processor.
    probe = tokenizer.encode("a", add_special_tokens=True)
    plain = tokenizer.encode("a")
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
                             and probe != plain)
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]
                             and probe != plain)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
