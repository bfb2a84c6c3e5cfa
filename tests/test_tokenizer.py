"""Spec of qiusuo.tokenizer: the built-in byte-level vocabulary, HF-directory round trips, chat
templates rendered exactly as transformers renders them, and streaming decode."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qiusuo.tokenizer import BUILTIN_ADDED_TOKENS, Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = ["347+285=", "Hello, world!  Two  spaces\tand\nnewlines.", "héllo wörld", "你好，世界",
         "emoji 🙂👍🏽 done", ""]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 347+285?"}],
    [{"role": "system", "content": "Think, then answer."}, {"role": "user", "content": "7+5"}],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>2+2=4</think><answer>4</answer>"},
        {"role": "user", "content": "你好 🙂"},
    ],
]

# Qwen2.5's template shape: whitespace control, loops, conditionals, loop.first/last, tojson, tools.
QWEN_STYLE_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(turns=0) %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {%- set ns.turns = ns.turns + 1 %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- elif not (message.role == "system" and loop.first) %}
        {{- raise_exception('Unknown role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}
{%- endif %}
"""

# Plain `{% %}` blocks on their own lines: the output depends on trim_blocks and lstrip_blocks.
BLOCK_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message.role == 'user' %}
User: {{ message.content }}
    {% else %}
{{ message.role | upper }}: {{ message.content }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
Assistant:
{% endif %}"""

TOOLS = [{"type": "function", "function": {"name": "add", "description": "a < b & 'c' → 和",
                                            "parameters": {"type": "object", "properties": {"a": {"type": "int"}}}}}]
TOOL_CONVERSATION = [
    {"role": "user", "content": "add 2 and 3"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": "<3>"}}}]},
    {"role": "tool", "content": "5"},
    {"role": "tool", "content": "also 5"},
    {"role": "assistant", "content": "It is 5."},
]


@pytest.fixture(scope="module")
def builtin():
    return Tokenizer.builtin()


@pytest.fixture(scope="module")
def saved(builtin, tmp_path_factory):
    """The built-in tokenizer saved by us and loaded back by transformers."""
    path = tmp_path_factory.mktemp("builtin")
    builtin.save(path)
    return path, transformers.AutoTokenizer.from_pretrained(path)


def test_builtin_layout(builtin):
    for i, (content, _) in enumerate(BUILTIN_ADDED_TOKENS):
        assert builtin.token_to_id(content) == i and builtin.id_to_token(i) == content
    assert builtin.vocab_size == len(BUILTIN_ADDED_TOKENS) + 256
    assert (builtin.pad_token_id, builtin.bos_token_id, builtin.eos_token_id) == (0, 1, 2)
    tags = (builtin.think_start_id, builtin.think_end_id, builtin.answer_start_id, builtin.answer_end_id)
    assert tags == (3, 4, 5, 6)
    assert builtin.special_ids == {0, 1, 2, 7, 8, 9}  # the tags are kept by skip_special_tokens


@pytest.mark.parametrize("text", TEXTS)
def test_builtin_round_trip(builtin, text):
    ids = builtin.encode(text)
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte: no merges
    assert builtin.decode(ids) == text


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_builtin_round_trips_any_text(text):
    tok = Tokenizer.builtin()
    assert tok.decode(tok.encode(text)) == text


def test_one_token_per_char_and_tags_are_single_tokens(builtin):
    assert builtin.encode("347+285=") == [builtin.token_to_id(c) for c in "347+285="]
    ids = builtin.encode("<think>7+5=12</think><answer>632</answer>")
    assert ids == [3, *builtin.encode("7+5=12"), 4, 5, *builtin.encode("632"), 6]
    for content, _ in BUILTIN_ADDED_TOKENS:
        assert builtin.encode(content) == [builtin.token_to_id(content)]
    assert builtin.encode_batch(["1+1", "<eos>"]) == [builtin.encode("1+1"), [2]]
    assert builtin.encode("7", add_special_tokens=True) == [1, *builtin.encode("7")]


def test_decode_skip_special_tokens(builtin):
    ids = [1, 8, *builtin.encode("<think>a</think><answer>b</answer>"), 2, 0, 0]
    assert builtin.decode(ids) == "<bos><|user|><think>a</think><answer>b</answer><eos><pad><pad>"
    assert builtin.decode(ids, skip_special_tokens=True) == "<think>a</think><answer>b</answer>"


def test_transformers_loads_saved_builtin(builtin, saved):
    path, hf = saved
    config = json.loads((path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["chat_template"]
    assert len(hf) == builtin.vocab_size
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    for text in [*TEXTS, "<think>7+5=12</think><answer>632</answer><eos>"]:
        ids = builtin.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        assert hf(text)["input_ids"] == builtin.encode(text, add_special_tokens=True)
        for skip in (False, True):
            assert hf.decode([1, 8, *ids, 2], skip_special_tokens=skip) == builtin.decode([1, 8, *ids, 2], skip)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_builtin_chat_template_matches_transformers(builtin, saved, messages, add_generation_prompt):
    _, hf = saved
    ours = builtin.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours == theirs
    assert builtin.apply_chat_template(messages, add_generation_prompt, tokenize=True) == builtin.encode(ours)


def test_builtin_chat_template_shape(builtin):
    text = builtin.apply_chat_template(CONVERSATIONS[2][:3], add_generation_prompt=False)
    assert text == "<bos><|system|>S<|user|>2+2?<|assistant|><think>2+2=4</think><answer>4</answer><eos>"
    assert builtin.apply_chat_template(CONVERSATIONS[0]).endswith("<|user|>What is 347+285?<|assistant|>")


@pytest.mark.parametrize("case", ["plain", "system", "tools", "thinking_off", "history"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_complex_template_matches_transformers(builtin, saved, case, add_generation_prompt):
    _, hf = saved
    messages, kwargs = {
        "plain": (CONVERSATIONS[0], {}),
        "system": (CONVERSATIONS[2], {}),
        "tools": (TOOL_CONVERSATION, {"tools": TOOLS}),
        "thinking_off": (CONVERSATIONS[1], {"enable_thinking": False}),
        "history": (CONVERSATIONS[2] + TOOL_CONVERSATION, {"tools": TOOLS}),
    }[case]
    ours = builtin.apply_chat_template(messages, add_generation_prompt, chat_template=QWEN_STYLE_TEMPLATE, **kwargs)
    theirs = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                    chat_template=QWEN_STYLE_TEMPLATE, **kwargs)
    assert ours == theirs
    if case == "tools":  # transformers' tojson: no HTML escaping, non-ASCII kept
        assert '"a < b & \'c\' → 和"' in ours and '"<3>"' in ours


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_block_whitespace_template_matches_transformers(builtin, saved, messages):
    _, hf = saved
    ours = builtin.apply_chat_template(messages, chat_template=BLOCK_TEMPLATE)
    assert ours == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                          chat_template=BLOCK_TEMPLATE)


def _transformers_saved_tokenizer(path):
    """A tiny BPE trained with `tokenizers`, wrapped and saved the way transformers does it."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog 12+34=46"] * 20, trainer)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                              pad_token="<pad>", unk_token="<unk>")
    hf.chat_template = QWEN_STYLE_TEMPLATE
    hf.save_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)


def test_from_dir_loads_transformers_saved_tokenizer(tmp_path):
    hf = _transformers_saved_tokenizer(tmp_path)
    ours = Tokenizer.from_dir(tmp_path)
    assert ours.vocab_size == len(hf)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (hf.bos_token_id, hf.eos_token_id,
                                                                          hf.pad_token_id)
    assert ours.think_start_id is None and ours.answer_end_id is None
    for text in ["the quick brown fox", "12+34=46 über 🙂", "<s>fox</s>"]:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text) == ids
        assert ours.decode(ids) == hf.decode(ids)
    for messages in [*CONVERSATIONS, TOOL_CONVERSATION]:
        assert ours.apply_chat_template(messages) == hf.apply_chat_template(messages, add_generation_prompt=True,
                                                                            tokenize=False)


def test_from_dir_reads_added_token_dicts_and_our_own_save(builtin, tmp_path):
    builtin.save(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["bos_token"] = {"content": "<bos>", "lstrip": False, "rstrip": False, "special": True}
    config_path.write_text(json.dumps(config))
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.bos_token_id == 1 and loaded.chat_template == builtin.chat_template
    assert loaded.encode("<think>1</think>") == builtin.encode("<think>1</think>")
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")  # the newer file wins
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "x!"


def test_from_dir_adds_missing_named_token_like_transformers(builtin, tmp_path):
    builtin.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "unk_token": "<unk>"}))
    ours, hf = Tokenizer.from_dir(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (ours.vocab_size, ours.token_to_id("<unk>")) == (len(hf), hf.unk_token_id) == (builtin.vocab_size + 1, 266)
    template = "{{ unk_token }}|{{ sep_token }}|{{ bos_token }}"
    assert ours.apply_chat_template(CONVERSATIONS[0], chat_template=template) == "<unk>||<bos>"


@pytest.mark.parametrize("text", [*TEXTS, "<think>简单</think><answer>🙂</answer>", "a\u00e9\u4f60\U0001f642z"])
@pytest.mark.parametrize("skip", [False, True])
def test_incremental_decoder_matches_full_decode(builtin, text, skip):
    ids = [1, *builtin.encode(text), 2]
    decoder = builtin.incremental_decoder(skip_special_tokens=skip)
    deltas = [decoder.step(i) for i in ids]
    assert "".join(deltas) + decoder.flush() == builtin.decode(ids, skip_special_tokens=skip)
    assert all("\ufffd" not in d for d in deltas)  # partial characters are held, never emitted


def test_incremental_decoder_holds_split_character(builtin):
    ids = builtin.encode("你")  # three byte tokens
    decoder = builtin.incremental_decoder()
    assert [decoder.step(i) for i in ids] == ["", "", "你"]


def test_incremental_decoder_on_transformers_tokenizer(tmp_path):
    _transformers_saved_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    ids = tok.encode("the lazy dog über 🙂 fox")
    decoder = tok.incremental_decoder()
    assert "".join(decoder.step(i) for i in ids) + decoder.flush() == tok.decode(ids)


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty"),
    ([{"role": "robot", "content": "x"}], "Unknown role robot"),
    ([{"role": "user"}], "no 'content'"),
    (["hello"], "string 'role'"),
    ("hello", "non-empty list"),
])  # fmt: skip
def test_bad_chat_input_raises(builtin, messages, match):
    with pytest.raises(ValueError, match=match):
        builtin.apply_chat_template(messages)


def test_bad_template_and_config_raise(builtin, tmp_path):
    with pytest.raises(ValueError, match="not valid Jinja"):
        builtin.apply_chat_template(CONVERSATIONS[0], chat_template="{% for %}")
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(builtin.tokenizer, {"bos_token": "<bos>"}).apply_chat_template(CONVERSATIONS[0])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Tokenizer(builtin.tokenizer, {"bos_token": "<s>"})
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
