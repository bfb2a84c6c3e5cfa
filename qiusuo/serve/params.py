"""A request's parameters, read and checked before it reaches the engine: max_tokens within the
context and the server's output budget, `SamplingParams`, the output constraint (`response_format`,
`structured_outputs`, vLLM's older `guided_*`), and prompts that cannot fit the context.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qiusuo.engine import SamplingParams, StructuredOutputsParams

from .protocol import OpenAIError, _SamplingFields

if TYPE_CHECKING:
    from .serving import ServerState


def resolve_max_tokens(state: ServerState, requested: int | None, num_prompt_tokens: int, *, n: int = 1,
                       top_logprobs: int | None = None, num_prompts: int = 1, param: str = "max_tokens") -> int:
    """The max_tokens a prompt runs with: within the context, `max_tokens_cap`, and the request's output
    budget (num_prompts x n x max_tokens x (1 + top_logprobs)); unset, it is lowered to fit the budget."""
    room = state.max_model_len - num_prompt_tokens
    if room < 1:
        raise OpenAIError(400, f"The prompt has {num_prompt_tokens} tokens but this model's context holds "
                          f"{state.max_model_len}; shorten it.", param="messages", code="context_length_exceeded")
    if requested is not None and requested > room:
        raise OpenAIError(400, f"This model's maximum context length is {state.max_model_len} tokens. However, "
                          f"you requested {num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the "
                          f"prompt, {requested} for the completion). Lower max_tokens.",
                          param=param, code="context_length_exceeded")
    k = top_logprobs or 0
    fan_out = num_prompts * n * (1 + k)
    cap, budget = state.config.max_tokens_cap or state.max_model_len, state.config.max_output_budget
    max_tokens = min(room, cap, budget // fan_out) if requested is None else min(requested, cap)
    if max_tokens < 1 or max_tokens * fan_out > budget:
        asked = max(max_tokens, 1)
        raise OpenAIError(400, f"This request asks for {num_prompts} prompt(s) x n={n} x max_tokens={asked} x "
                          f"(1 + top_logprobs={k}) = {asked * fan_out} tokens and logprob entries, "
                          f"over this server's budget of {budget} (max_output_budget); lower max_tokens, n or "
                          "top_logprobs.", param=param, code="request_too_large")
    return max_tokens


_STRUCTURED_FIELDS = {"json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace"}
_GUIDED_ALIASES = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_outputs(state: ServerState, req: _SamplingFields) -> StructuredOutputsParams | None:
    """The request's output constraint, from OpenAI's `response_format` or vLLM's `structured_outputs`
    (or its older `guided_*` fields): at most one of them. For a reasoning model the grammar starts
    after the think block, which the model may open itself (`allow_think_block`)."""
    specs: list[tuple[str, dict[str, Any]]] = []
    rf = getattr(req, "response_format", None)
    if rf is not None:
        kind = rf.get("type")
        if kind == "json_object":
            specs.append(("response_format", {"json_object": True}))
        elif kind == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
                raise OpenAIError(400, "response_format json_schema needs json_schema.schema, a JSON schema object.",
                                  param="response_format")
            # strict or not, the schema is enforced: the grammar makes "best effort" and "guaranteed" the same
            specs.append(("response_format", {"json": js["schema"]}))
        elif kind != "text":
            raise OpenAIError(400, f"response_format type {kind!r}: use 'text', 'json_object' or 'json_schema'.",
                              param="response_format")
    if req.structured_outputs is not None:
        unknown = sorted(set(req.structured_outputs) - _STRUCTURED_FIELDS)
        if unknown:
            raise OpenAIError(400, f"structured_outputs fields {unknown} are not supported; use "
                              f"{sorted(_STRUCTURED_FIELDS)}.", param="structured_outputs", code="unsupported_parameter")
        specs.append(("structured_outputs", dict(req.structured_outputs)))
    for alias, key in _GUIDED_ALIASES.items():
        if getattr(req, alias) is not None:
            specs.append((alias, {key: getattr(req, alias)}))
    if len(specs) > 1:
        raise OpenAIError(400, f"{', '.join(n for n, _ in specs)}: give one output constraint, not several.",
                          param=specs[1][0])
    if not specs:
        return None
    param, fields = specs[0]
    try:
        return StructuredOutputsParams(**fields, allow_think_block=is_reasoning_model(state.tokenizer))
    except ValueError as e:
        raise OpenAIError(400, str(e), param=param) from None


def is_reasoning_model(tokenizer: Any) -> bool:
    """The checkpoint has think tags and its chat template knows them (it writes or strips think blocks)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return getattr(tokenizer, "think_end_id", None) is not None and "think>" in template


def sampling_params(req: _SamplingFields, max_tokens: int, logprobs: int | None,
                    structured: StructuredOutputsParams | None = None,
                    skip_special_tokens: bool | None = None) -> SamplingParams:
    unsupported = req.unsupported()
    if unsupported:
        raise OpenAIError(400, f"{', '.join(unsupported)} is not supported by this server; leave it unset.",
                          param=unsupported[0], code="unsupported_parameter")
    try:
        return SamplingParams(
            n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, max_tokens=max_tokens,
            stop=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output, seed=req.seed, logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens if skip_special_tokens is None else skip_special_tokens,
            structured_outputs=structured,
        )
    except ValueError as e:
        raise OpenAIError(400, str(e)) from None


def max_token_chars(tokenizer: Any) -> int | None:
    """The most characters one token of `tokenizer` covers (a byte-level BPE piece: its bytes, at
    least as many as the characters it decodes to), or None when the vocabulary cannot be read."""
    inner = getattr(tokenizer, "tokenizer", tokenizer)
    try:
        vocab = inner.get_vocab(with_added_tokens=True)
    except (AttributeError, TypeError):
        return None
    return max(map(len, vocab), default=0) or None


def check_text_fits(state: ServerState, text: str, param: str) -> None:
    """Refuse a prompt text too long for the context BEFORE tokenizing it: tokenizing holds the GIL,
    so the event loop (every other request) waits; 768k characters took 6 s on a busy machine."""
    limit = state.max_prompt_chars
    if limit is not None and len(text) > limit:
        raise OpenAIError(400, f"The prompt has {len(text)} characters, more than this model's context of "
                          f"{state.max_model_len} tokens can hold ({limit} characters at most); shorten it.",
                          param=param, code="context_length_exceeded")


def check_prompt_ids(state: ServerState, ids: list[int], param: str) -> None:
    if not ids:
        raise OpenAIError(400, "The prompt is empty; give at least one token.", param=param)
    vocab = state.engine.vocab_size
    if min(ids) < 0 or max(ids) >= vocab:
        raise OpenAIError(400, f"Prompt token ids must be in [0, {vocab}).", param=param)
