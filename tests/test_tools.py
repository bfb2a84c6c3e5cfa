"""Tool-call parsers (serve/tools.py) on text: Qwen2.5/Hermes `<tool_call>`, DeepSeek-V3/R1 marker tokens,
Llama 3 JSON; whole and streamed one character at a time (the concatenated deltas must equal the whole
answer's `arguments` exactly); the parser chosen from a chat template; the grammar structures.
These feed text directly (no model); the end-to-end tests with the real engine and server are in
tests/test_serve_guided.py.
"""

from __future__ import annotations

import json

import pytest

from qiusuo.serve import tools

DS_CALLS, DS_CALL, DS_SEP, DS_END, DS_CALLS_END = ("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>",
                                                   "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>")
CASES = {
    "hermes": ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "d": [1, {"x": "}"}]}}\n'
               '</tool_call>\n<tool_call>\n{"arguments": {"q": "a\\"b"}, "name": "search"}\n</tool_call>',
               "Let me check.", [("get_weather", {"city": "Paris", "d": [1, {"x": "}"}]}), ("search", {"q": 'a"b'})]),
    "deepseek_v3": (f"Sure{DS_CALLS}{DS_CALL}function{DS_SEP}get_weather\n```json\n{{\"city\": \"Paris\"}}\n```{DS_END}"
                    f"{DS_CALL}function{DS_SEP}add\n```json\n{{\"a\": 1, \"b\": 2}}\n```{DS_END}{DS_CALLS_END}",
                    "Sure", [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]),
    "deepseek_v31": (f"{DS_CALLS}{DS_CALL}get_weather{DS_SEP}{{\"city\": \"Oslo\"}}{DS_END}{DS_CALLS_END}",
                     "", [("get_weather", {"city": "Oslo"})]),
    "llama3_json": ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}; '
                    '{"name": "add", "parameters": {"a": 1}}', "", [("get_weather", {"city": "Rome"}), ("add", {"a": 1})]),
}


def parser_of(case: str) -> str:
    return "deepseek_v3" if case.startswith("deepseek") else case


@pytest.mark.parametrize("case", sorted(CASES))
def test_parse_whole(case):
    text, content, expected = CASES[case]
    got_content, calls = tools.parse_final(parser_of(case), text)
    assert (got_content or "") == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == expected
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_char_by_char_equals_whole(case):
    text, content, expected = CASES[case]
    parser = parser_of(case)
    stream = tools.ToolCallStream(parser)
    sent_content, names, args, n_arg_deltas = "", {}, {}, 0
    for end in range(1, len(text) + 1):
        delta, calls = stream.feed(text[:end], final=end == len(text))
        sent_content += delta
        for c in calls:
            if "id" in c:
                names[c["index"]] = c["function"]["name"]
                args[c["index"]] = ""
            if c["function"].get("arguments"):
                args[c["index"]] += c["function"]["arguments"]
                n_arg_deltas += 1
    _, whole = tools.parse_final(parser, text)
    assert sent_content == content  # a marker's first characters were held back, never sent as content
    assert [names[i] for i in sorted(names)] == [n for n, _ in expected]
    assert [args[i] for i in sorted(args)] == [c["function"]["arguments"] for c in whole]
    assert n_arg_deltas > len(expected) * 3  # the arguments really were cut across many deltas


def test_text_without_calls_is_content():
    for parser in tools.PARSERS:
        content, calls = tools.parse_final(parser, "Just text, no <tool call> here {x}")
        assert calls == [] and content.startswith("Just text")


def test_broken_call_is_content():
    text = '<tool_call>\n{"name": "f", "arguments": {"a": 1\n</tool_call>'
    assert tools.parse_final("hermes", text) == (text, [])
    assert tools.parse_final("hermes", '<tool_call>{"name": "f", "arguments": "not an object"}</tool_call>')[1] == []


def test_partial_marker_is_held_back_then_released():
    s = tools.ToolCallStream("hermes")
    assert s.feed("Hello <tool", final=False) == ("Hello ", [])
    assert s.feed("Hello <toolbox>", final=True) == ("<toolbox>", [])


@pytest.mark.parametrize("template, parser", [
    ("{% for m in messages %}<tool_call>{% endfor %}", "hermes"),
    ("<｜tool▁calls▁begin｜>{{ x }}", "deepseek_v3"),
    ("<|start_header_id|>{% if tools %}{{ tools }}{% endif %}", "llama3_json"),
    ("{{ messages }}", None),
    (None, None),
])
def test_detect_parser(template, parser):
    assert tools.detect_parser(template) == parser


def test_function_of_checks_tools():
    fn = tools.function_of({"type": "function", "function": {"name": "f"}})
    assert fn["parameters"] == {"type": "object", "properties": {}}
    for bad in ({"type": "retrieval"}, {"type": "function", "function": {"name": "bad name!"}},
                {"type": "function", "function": {"name": "f", "parameters": []}}, "f"):
        with pytest.raises(ValueError):
            tools.function_of(bad)


def test_structures_parse_back():
    """What the grammar forces is what the parser reads: begin + args + end parses to the call."""
    fn = tools.function_of({"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}})
    for parser in tools.PARSERS:
        st = tools.structure(parser, fn)
        content, calls = tools.parse_final(parser, st["begin"] + '{"city": "Oslo"}' + st["end"])
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
            ("get_weather", {"city": "Oslo"})], parser


def test_template_tool_calls_give_dict_arguments():
    (c,) = tools.template_tool_calls([{"id": "call_1", "type": "function",
                                       "function": {"name": "f", "arguments": '{"a": 1}'}}])
    assert c["function"]["arguments"] == {"a": 1} and c["name"] == "f"


def test_llama3_json_answer_that_is_not_a_call_is_streamed_as_content():
    s = tools.ToolCallStream("llama3_json")
    text = '{"answer": 42}'
    got = "".join(s.feed(text[:i], final=i == len(text))[0] for i in range(1, len(text) + 1))
    assert got == text and tools.parse_final("llama3_json", text) == (text, [])
