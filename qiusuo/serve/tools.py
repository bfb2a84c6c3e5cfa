"""Tool calling: parse a model's tool calls out of its answer text, whole or streamed, and build the
grammar that forces them (`tool_choice` "required" or a named function).

Formats, by vLLM's `--tool-call-parser` names:
- `hermes`: Qwen2.5 (and Hermes, Qwen3): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
  one block per call, the text before the first block is the content.
- `deepseek_v3`: DeepSeek-V3 / R1's marker tokens, `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function
  <｜tool▁sep｜>NAME\\n```json\\n{args}\\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>`; also V3.1's
  `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{args}<｜tool▁call▁end｜>`.
- `llama3_json`: Llama 3.1+'s JSON: an answer that is `{"name": ..., "parameters": {...}}` (after an
  optional `<|python_tag|>`), calls separated by `;`.

The parser is chosen from the checkpoint's chat template (`detect_parser`) unless the server's
`tool_call_parser` names one. Streaming re-parses the answer so far on each delta and sends only what is
new: the function name once it is complete, then the arguments' JSON text as it grows. The argument text
of a call is scanned with a JSON depth counter, so a streamed prefix is never taken back: the
concatenated deltas equal the non-streamed `arguments` string exactly.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

PARSERS = ("hermes", "deepseek_v3", "llama3_json")

_DS_CALLS_BEGIN, _DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
_DS_CALL_BEGIN, _DS_CALL_END, _DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGS = re.compile(r'"(?:arguments|parameters)"\s*:\s*')


def detect_parser(chat_template: str | None) -> str | None:
    """The tool-call format a chat template teaches its model, or None when it renders no tools."""
    t = chat_template or ""
    if "tool▁calls▁begin" in t or "tool▁call▁begin" in t:
        return "deepseek_v3"
    if "<tool_call>" in t:
        return "hermes"
    if "<|start_header_id|>" in t and "tools" in t:
        return "llama3_json"
    return None


@dataclass
class PartialCall:
    name: str | None  # None until the whole name is there
    arguments: str  # the JSON text of the arguments so far (a prefix of the final one)
    complete: bool  # the call's text is closed


def scan_json_value(text: str, start: int) -> tuple[str, bool]:
    """The JSON value starting at text[start] (after whitespace): (its text so far, whether it is complete).

    Objects and arrays are tracked by depth, strings by their quotes and escapes; a scalar is complete
    at the first character that cannot continue it."""
    i, n = start, len(text)
    while i < n and text[i] in " \t\r\n":
        i += 1
    begin = i
    if i >= n:
        return "", False
    if text[i] not in "{[":
        m = re.match(r'"(?:[^"\\]|\\.)*"|-?[0-9.eE+-]+|true|false|null', text[i:])
        if m is None:
            return text[begin:], False
        end = i + m.end()
        return text[begin:end], end < n or text[i] == '"'
    depth, in_str, esc = 0, False, False
    while i < n:
        c = text[i]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return text[begin:i + 1], True
        i += 1
    return text[begin:], False


def _json_call(body: str) -> PartialCall:
    """`{"name": ..., "arguments": {...}}` (either key order; "parameters" also), possibly unfinished."""
    m = _NAME.search(body)
    name = json.loads(f'"{m.group(1)}"') if m else None
    a = _ARGS.search(body)
    args, done = scan_json_value(body, a.end()) if a else ("", False)
    return PartialCall(name, args, done)


def _held_back(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (may still become it)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


def split(parser: str, text: str, final: bool) -> tuple[str, list[PartialCall]]:
    """(content, calls) of an answer so far. Content is only text that can no longer become a call."""
    if parser == "hermes":
        i = text.find("<tool_call>")
        if i < 0:
            return (text if final else text[:len(text) - _held_back(text, "<tool_call>")]), []
        calls = []
        for block in text[i:].split("<tool_call>")[1:]:
            body, closed = (block.split("</tool_call>", 1)[0], True) if "</tool_call>" in block else (block, final)
            call = _json_call(body)
            call.complete = call.complete and closed
            calls.append(call)
        return text[:i], calls
    if parser == "deepseek_v3":
        i = min((j for j in (text.find(_DS_CALLS_BEGIN), text.find(_DS_CALL_BEGIN)) if j >= 0), default=-1)
        if i < 0:
            hold = max(_held_back(text, _DS_CALLS_BEGIN), _held_back(text, _DS_CALL_BEGIN))
            return (text if final else text[:len(text) - hold]), []
        calls = []
        for block in text[i:].split(_DS_CALL_BEGIN)[1:]:
            closed = _DS_CALL_END in block
            block = block.split(_DS_CALL_END, 1)[0]
            if _DS_SEP not in block:
                calls.append(PartialCall(None, "", False))
                continue
            pre, post = block.split(_DS_SEP, 1)
            if pre.strip() == "function" or "```" in post:  # V3/R1: type, then name and a ```json fence
                if "\n" not in post:
                    calls.append(PartialCall(None, "", False))
                    continue
                name, rest = post.split("\n", 1)
                j = rest.find("```json")
                args, done = scan_json_value(rest, j + len("```json")) if j >= 0 else ("", False)
            else:  # V3.1: the name, then the arguments
                name = pre
                args, done = scan_json_value(post, 0)
            calls.append(PartialCall(name.strip(), args, done and (closed or final)))
        return text[:i], calls
    if parser == "llama3_json":
        body = text.lstrip()
        if body.startswith("<|python_tag|>"):
            body = body[len("<|python_tag|>"):].lstrip()
        elif not body:
            return ("" if not final else text), []
        elif not body.startswith("{") and not "<|python_tag|>".startswith(body):
            return text, []
        elif not body.startswith("{"):
            return ("" if not final else text), []
        calls, pos = [], 0
        while pos < len(body):
            obj, done = scan_json_value(body, pos)
            calls.append(_json_call(obj))
            calls[-1].complete = calls[-1].complete and done
            if not done:
                break
            pos = body.find(obj, pos) + len(obj)
            rest = body[pos:].lstrip()
            if not rest.startswith(";"):
                break
            pos = len(body) - len(rest) + 1
        return "", calls
    raise ValueError(f"tool_call_parser={parser!r}: use one of {PARSERS}")


def parse_final(parser: str, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a finished answer, OpenAI's shapes. Calls whose arguments are not a JSON
    object are not calls: then the whole text is content (as vLLM does)."""
    content, calls = split(parser, text, final=True)
    if not calls:
        return text, []
    out = []
    for c in calls:
        try:
            ok = c.name and isinstance(json.loads(c.arguments), dict)
        except ValueError:
            ok = False
        if not ok:
            return text, []
        out.append({"id": new_call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}})
    return content, out


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallStream:
    """One sample's streamed tool calls: feed the answer text so far, get (content delta, tool-call deltas)."""

    def __init__(self, parser: str):
        self.parser = parser
        self.content_sent = 0
        self.calls: list[dict[str, Any]] = []  # per call: id, name sent, arguments chars sent

    def feed(self, text: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        content, calls = split(self.parser, text, final)
        if final and calls and not parse_final(self.parser, text)[1]:
            content, calls = text, []  # not a call after all (e.g. a JSON answer to a llama3_json model): text
        delta = content[self.content_sent:]
        self.content_sent = max(self.content_sent, len(content))
        out = []
        for i, c in enumerate(calls):
            if c.name is None:
                break  # calls are streamed in order; this one's name is not complete yet
            if i == len(self.calls):
                self.calls.append({"id": new_call_id(), "sent": 0})
                out.append({"index": i, "id": self.calls[i]["id"], "type": "function",
                            "function": {"name": c.name, "arguments": ""}})
            new = c.arguments[self.calls[i]["sent"]:]
            if new:
                self.calls[i]["sent"] = len(c.arguments)
                out.append({"index": i, "function": {"arguments": new}})
        return delta, out


# ---------------------------------------------------------------------- requests
def function_of(tool: Any) -> dict[str, Any]:
    """An OpenAI tool ({"type": "function", "function": {...}}) -> its function, checked."""
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(tool.get("function"), dict):
        raise ValueError("each tool must be {'type': 'function', 'function': {'name': ..., 'parameters': {...}}}")
    fn = tool["function"]
    if not isinstance(fn.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", fn["name"]):
        raise ValueError(f"tool name {fn.get('name')!r}: must be 1-64 characters of a-z, A-Z, 0-9, _ . -")
    params = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, dict):
        raise ValueError(f"tool {fn['name']}: parameters must be a JSON schema object")
    return {**fn, "parameters": params}


def structure(parser: str, fn: dict[str, Any]) -> dict[str, Any]:
    """The grammar structure of one call of `fn` in `parser`'s format: {begin, schema, end}."""
    name = json.dumps(fn["name"])
    schema = fn["parameters"]
    if schema.get("type") is None:
        schema = {**schema, "type": "object"}
    if parser == "hermes":
        return {"begin": '<tool_call>\n{"name": ' + name + ', "arguments": ', "schema": schema, "end": "}\n</tool_call>"}
    if parser == "llama3_json":
        return {"begin": '{"name": ' + name + ', "parameters": ', "schema": schema, "end": "}"}
    if parser == "deepseek_v3":
        return {"begin": f"{_DS_CALLS_BEGIN}{_DS_CALL_BEGIN}function{_DS_SEP}{fn['name']}\n```json\n", "schema": schema,
                "end": f"\n```{_DS_CALL_END}{_DS_CALLS_END}"}
    raise ValueError(f"tool_call_parser={parser!r}: use one of {PARSERS}")


def template_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant `tool_calls` for a chat template: arguments as a dict (Qwen's and Llama's templates
    `tojson` them; a JSON string would be encoded twice), the OpenAI shape kept around it."""
    out = []
    for c in calls:
        fn = dict(c.get("function") or {})
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                fn["arguments"] = json.loads(args)
            except ValueError:
                pass  # not JSON: the template gets the string as the client sent it
        out.append({**c, "function": fn, "name": fn.get("name"), "arguments": fn.get("arguments")})
    return out


__all__ = ["PARSERS", "detect_parser", "split", "parse_final", "ToolCallStream", "structure", "function_of",
           "template_tool_calls", "scan_json_value"]
