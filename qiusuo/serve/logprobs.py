"""Logprobs in OpenAI's shapes: chat's `logprobs.content` entries (token, logprob, bytes,
top_logprobs) and the legacy completions' parallel lists. -inf is clamped to `LOGPROB_FLOOR`.
"""

from __future__ import annotations

from typing import Any

from qiusuo.engine import CompletionOutput
from qiusuo.tokenizer import bytes_to_unicode

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM clamps the same way
_BYTE_OF_CHAR = {c: b for b, c in bytes_to_unicode().items()}


def _clamp(lp: float) -> float:
    return lp if lp > LOGPROB_FLOOR else LOGPROB_FLOOR


def _token_text(tokenizer, tid: int, lp) -> str:
    return lp.decoded_token if lp is not None and lp.decoded_token is not None else tokenizer.decode([tid])


def _token_bytes(tokenizer, tid: int, text: str) -> list[int]:
    """The token's own bytes: a byte-level BPE piece maps back exactly (half a UTF-8 character
    included); otherwise the UTF-8 of its text."""
    piece = tokenizer.id_to_token(tid) if hasattr(tokenizer, "id_to_token") else None
    if piece and all(ch in _BYTE_OF_CHAR for ch in piece):
        return [_BYTE_OF_CHAR[ch] for ch in piece]
    return list(text.encode("utf-8"))


def chat_logprobs(tokenizer, out: CompletionOutput, start: int, end: int, k: int) -> list[dict[str, Any]]:
    """OpenAI's `logprobs.content` entries for output tokens [start, end)."""
    entries = []
    for i in range(start, end):
        tid, table = out.token_ids[i], out.logprobs[i]
        chosen = table.get(tid)
        text = _token_text(tokenizer, tid, chosen)
        top = sorted((lp.rank or 0, t, lp) for t, lp in table.items() if lp.rank is not None and lp.rank <= k)
        entries.append({
            "token": text, "logprob": _clamp(chosen.logprob) if chosen else LOGPROB_FLOOR,
            "bytes": _token_bytes(tokenizer, tid, text),
            "top_logprobs": [{"token": (s := _token_text(tokenizer, t, lp)), "logprob": _clamp(lp.logprob),
                              "bytes": _token_bytes(tokenizer, t, s)} for _, t, lp in top],
        })
    return entries


def completion_logprobs(tokenizer, out: CompletionOutput, start: int, end: int, k: int,
                        offset: int) -> dict[str, Any]:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, lps, tops, offsets = [], [], [], []
    for i in range(start, end):
        tid, table = out.token_ids[i], out.logprobs[i]
        chosen = table.get(tid)
        text = _token_text(tokenizer, tid, chosen)
        tokens.append(text)
        lps.append(_clamp(chosen.logprob) if chosen else LOGPROB_FLOOR)
        tops.append({_token_text(tokenizer, t, lp): _clamp(lp.logprob)
                     for t, lp in table.items() if lp.rank is not None and lp.rank <= k} if k else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
