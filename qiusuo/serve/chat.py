"""POST /v1/chat/completions: template the messages, generate, split reasoning from content.

Reasoning goes to both `reasoning_content` (DeepSeek, SGLang, llama.cpp) and `reasoning` (vLLM,
Ollama's /v1), because clients read one or the other (vLLM renamed `reasoning_content` to
`reasoning`; clients written for either name must keep working). Every streamed delta carries either reasoning or content, never both.

Reasoning controls:
- An earlier assistant turn's reasoning, sent back as `reasoning_content` or `reasoning` (either
  name; `reasoning_content` wins if both differ), reaches the chat template as `reasoning_content`
  (the tokenizer also copies it to `reasoning` and `thinking`, as transformers does). The template
  decides: DeepSeek-R1's and the built-in one drop it (R1's model card: history without the
  reasoning), Qwen3's renders it for turns after the last user message.
- `reasoning_effort` none/minimal/low/medium/high is a thinking budget of 0/256/1024/4096/16384
  reasoning tokens (`REASONING_EFFORT_BUDGETS`); an explicit `thinking_budget` wins.
- When the budget is spent, or when only the answer reserve (min(answer_reserve_tokens=256,
  max_tokens // 4)) is left of max_tokens inside the think block, `</think>` is forced and the
  model answers. `finish_reason` stays OpenAI's (`length` if the answer then runs out too); the
  choice's `reasoning_truncated` and usage's `completion_tokens_details.reasoning_truncated` say
  that the reasoning was cut (also when the output ended inside the block).

Tools (serve/tools.py): the request's `tools` reach the chat template; with `tool_choice` "auto" the
answer (never the reasoning) is parsed for calls in the checkpoint's format, "required" and a named
function are forced by a grammar, "none" leaves the answer as text. A sample that called tools ends
with finish_reason "tool_calls". `response_format` / `structured_outputs` hold the answer to a grammar
that starts after the think block (engine/guided.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.requests import Request

from qiusuo.engine import StructuredOutputsParams
from qiusuo.engine.reasoning import REASONING, REASONING_EFFORT_BUDGETS, ReasoningSplitter, answer_reserve, split_final

from . import tools as tool_calls
from .protocol import ChatCompletionRequest, OpenAIError
from .logprobs import chat_logprobs
from .params import check_text_fits, is_reasoning_model, resolve_max_tokens, sampling_params, structured_outputs
from .serving import EngineRequest, ServerState, new_id, sse, start_all, unless_disconnected, usage
from .streaming import AbortingStreamingResponse

_RESERVED_TEMPLATE_KWARGS = {"messages", "add_generation_prompt", "tokenize", "chat_template"}


def render_prompt(state: ServerState, req: ChatCompletionRequest) -> list[int]:
    messages = []
    for m in req.messages:
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.role == "assistant" and message["content"] is None:
            message["content"] = ""
        for key in ("name", "tool_call_id"):
            if getattr(m, key) is not None:
                message[key] = getattr(m, key)
        reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        if m.tool_calls:
            message["tool_calls"] = tool_calls.template_tool_calls([c.model_dump() for c in m.tool_calls])
        messages.append(message)
    kwargs = dict(req.chat_template_kwargs or {})
    if req.tools:
        kwargs.setdefault("tools", req.tools)
    clash = sorted(_RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if clash:
        raise OpenAIError(400, f"chat_template_kwargs may not set {clash}", param="chat_template_kwargs")
    try:
        text = state.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
    except ValueError as e:
        raise OpenAIError(400, f"The messages could not be rendered: {e}", param="messages") from None
    check_text_fits(state, text, "messages")
    return state.tokenizer.encode(text, add_special_tokens=False)  # the template has the bos


def translated_request(body: dict[str, Any], error: Callable[[int, str], Exception],
                       names: dict[str, str]) -> ChatCompletionRequest:
    """Another API's request, translated to the chat route's body, as a `ChatCompletionRequest`. A field
    the chat route refuses is a 400 from `error` (that API's error type), named as that API names it
    (`names`: chat field path -> its own, e.g. max_tokens -> options.num_predict)."""
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        raise error(400, f"{names.get(where, where)}: {err.get('msg')}") from None


@dataclass
class ChatRun:
    """A started chat request: what the OpenAI route and the Ollama and Anthropic translations
    (ollama.py, anthropic.py) read back, through `chat_response` or `chat_stream`."""

    er: EngineRequest
    created: int
    top_logprobs: int | None  # None: no logprobs


async def start_chat(state: ServerState, req: ChatCompletionRequest, prompt_ids: list[int] | None = None,
                     arrival: float | None = None, api: str = "openai_chat") -> ChatRun:
    """Validate, admit and start one chat request: every API surface reaches the engine through here.
    `prompt_ids`: an already-built prompt (Ollama's raw generate); else the messages are templated.
    `api`: the surface it came through (the `qiusuo:api_requests` label)."""
    arrival = time.monotonic() if arrival is None else arrival
    state.ready()
    adapter = state.check_model(req.model)
    if prompt_ids is None:
        prompt_ids = render_prompt(state, req)
    if not prompt_ids:
        raise OpenAIError(400, "The rendered prompt is empty.", param="messages")
    if req.top_logprobs and not req.logprobs:
        raise OpenAIError(400, "top_logprobs needs logprobs=true.", param="top_logprobs")
    k = (req.top_logprobs or 0) if req.logprobs else None
    use_completion_tokens = req.max_completion_tokens is not None
    requested = req.max_completion_tokens if use_completion_tokens else req.max_tokens
    max_tokens = resolve_max_tokens(state, requested, len(prompt_ids), n=req.n, top_logprobs=k,
                                    param="max_completion_tokens" if use_completion_tokens else "max_tokens")
    parser, structured = _constraints(state, req)
    params = sampling_params(req, max_tokens, k, structured,
                             skip_special_tokens=False if parser == "deepseek_v3" else None)  # its markers are special
    name = state.config.served_model_name
    if structured is not None and structured.kind != "structures":
        state.metrics.structured_requests.labels(name, structured.kind).inc()
    if req.tools:
        choice = req.tool_choice if isinstance(req.tool_choice, str) else ("named" if req.tool_choice else "auto")
        state.metrics.tool_requests.labels(name, choice).inc()
    budget = thinking_budget(state, req.thinking_budget, req.reasoning_effort)
    state.admit(req.n)
    er = EngineRequest(state, new_id("chatcmpl"), prompt_ids, params, budget, arrival,
                       answer_reserve(max_tokens, state.config.answer_reserve_tokens), lora_name=adapter)
    er.tool_parser = parser
    await start_all([er])
    state.metrics.api_requests.labels(state.config.served_model_name, api).inc()
    return ChatRun(er, int(time.time()), k)


async def finish_chat(run: ChatRun, raw: Request):
    """The final output of a non-streamed run, or None when the client left (the request is aborted)."""
    try:
        return await unless_disconnected(raw, _last_output(run.er))
    finally:
        run.er.close()


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest, raw: Request) -> Response:
    run = await start_chat(state, req)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return AbortingStreamingResponse(chat_stream(state, run, include_usage), on_close=run.er.close)
    final = await finish_chat(run, raw)
    if final is None:
        return Response(status_code=499)  # nobody is listening; the request was aborted
    return JSONResponse(chat_response(state, run, final))


def thinking_budget(state: ServerState, budget: int | None, effort: str | None) -> int | None:
    """A request's thinking budget: its own, else its reasoning effort's, else the server's default."""
    if budget is not None:
        return budget
    if effort is not None:
        return REASONING_EFFORT_BUDGETS[effort]
    return state.config.default_thinking_budget


def _constraints(state: ServerState, req: ChatCompletionRequest) -> tuple[str | None, StructuredOutputsParams | None]:
    """(the tool-call parser for this request, or None: no tool parsing; the answer's grammar, or None)."""
    structured = structured_outputs(state, req)
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise OpenAIError(400, "tool_choice needs tools; give tools or leave tool_choice unset.", param="tool_choice")
        return None, structured
    try:
        functions = [tool_calls.function_of(t) for t in req.tools]
    except ValueError as e:
        raise OpenAIError(400, str(e), param="tools") from None
    if choice == "none":
        return None, structured
    parser = state.config.tool_call_parser or tool_calls.detect_parser(state.tokenizer.chat_template)
    if parser is None:
        raise OpenAIError(400, "This model's chat template has no tool-call format qiusuo knows (hermes, deepseek_v3, "
                          "llama3_json); start the server with --tool-call-parser to name one.", param="tools")
    if choice in (None, "auto"):
        return parser, structured
    if choice == "required":
        chosen = functions
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        chosen = [f for f in functions if f["name"] == choice["function"].get("name")]
        if not chosen:
            raise OpenAIError(400, f"tool_choice names {choice['function'].get('name')!r}, which is not in tools.",
                              param="tool_choice")
    else:
        raise OpenAIError(400, "tool_choice must be 'none', 'auto', 'required' or "
                          "{'type': 'function', 'function': {'name': ...}}.", param="tool_choice")
    if structured is not None:
        raise OpenAIError(400, "tool_choice 'required' or a named function already fixes the output; drop "
                          "response_format / structured_outputs.", param="tool_choice")
    parallel = choice == "required" and req.parallel_tool_calls and parser == "hermes"
    try:
        forced = StructuredOutputsParams(structures=[tool_calls.structure(parser, f) for f in chosen],
                                         max_structures=4 if parallel else 1,
                                         allow_think_block=is_reasoning_model(state.tokenizer))
    except ValueError as e:
        raise OpenAIError(400, str(e), param="tools") from None
    return parser, forced


async def _last_output(er: EngineRequest):
    async for _ in er.outputs():
        pass
    return er.final


def chat_response(state: ServerState, run: ChatRun, final) -> dict[str, Any]:
    """The `chat.completion` body of a finished run."""
    er, created, k = run.er, run.created, run.top_logprobs
    tok = state.tokenizer
    choices, reasoning_tokens, any_cut = [], 0, False
    for o in final.outputs:
        reasoning, content, n_reasoning = split_final(tok, er.prompt_ids, o, er.params.skip_special_tokens)
        reasoning_tokens += n_reasoning
        cut = er.reasoning_cut(o)
        any_cut |= cut
        calls, finish = [], o.finish_reason
        if er.tool_parser is not None:
            content, calls = tool_calls.parse_final(er.tool_parser, content or "")
            content = content or None
            if calls:
                state.metrics.tool_calls.labels(state.config.served_model_name).inc(len(calls))
                finish = "tool_calls" if finish == "stop" else finish
        choices.append({
            "index": o.index,
            "message": {"role": "assistant", "content": content, "reasoning_content": reasoning,
                        "reasoning": reasoning, "tool_calls": calls},
            "logprobs": {"content": chat_logprobs(tok, o, 0, len(o.token_ids), k)} if k is not None else None,
            "finish_reason": finish, "stop_reason": o.stop_reason, "reasoning_truncated": cut,
        })
    return {
        "id": er.request_id, "object": "chat.completion", "created": created,
        "model": state.config.served_model_name, "choices": choices,
        "usage": usage(final.num_prompt_tokens, final.num_completion_tokens, reasoning_tokens,
                       final.num_cached_tokens, any_cut),
    }


async def chat_stream(state: ServerState, run: ChatRun, include_usage: bool) -> AsyncIterator[str]:
    """The run's `chat.completion.chunk` SSE events, `[DONE]` last; an engine error mid-stream is sent
    as an `{"error": ...}` event. The other API surfaces translate these same events."""
    er, created, k = run.er, run.created, run.top_logprobs
    tok, n = state.tokenizer, er.params.n
    splitters = [ReasoningSplitter(tok, er.prompt_ids, er.params.skip_special_tokens) for _ in range(n)]
    logprobs_sent = [0] * n
    finish_sent = [False] * n
    cuts = [False] * n
    # Tool calls: the answer so far, per sample, re-parsed on each delta (tools.ToolCallStream).
    calls = [tool_calls.ToolCallStream(er.tool_parser) for _ in range(n)] if er.tool_parser else None
    answers = [""] * n

    # The envelope is the same for every chunk: render it once, JSON-encode only what changes
    # (a measurable share of the event loop's time per token at 32 streams).
    head = sse({"id": er.request_id, "object": "chat.completion.chunk", "created": created,
                "model": state.config.served_model_name, "choices": [None]}).split("[null]")[0] + "["
    tail = "]" + (',"usage":null' if include_usage else "") + "}\n\n"

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs=None,
              cut: bool | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if cut is not None:
            choice["reasoning_truncated"] = cut
        return head + json.dumps(choice, ensure_ascii=False, separators=(",", ":")) + tail

    for i in range(n):
        yield chunk(i, {"role": "assistant", "content": ""})
    try:
        async for out in er.outputs():
            for o in out.outputs:
                i = o.index
                if finish_sent[i]:
                    continue  # a finished sample is repeated while its siblings run
                segments = splitters[i].feed(o)
                lps = None
                if k is not None and len(o.token_ids) > logprobs_sent[i]:
                    lps = {"content": chat_logprobs(tok, o, logprobs_sent[i], len(o.token_ids), k)}
                    logprobs_sent[i] = len(o.token_ids)
                    if not segments:  # tokens with no visible text yet (held back, or a stop token)
                        segments = [(REASONING if splitters[i].in_reasoning else "content", "")]
                if calls is not None:
                    segments = _tool_segments(calls[i], answers, i, segments, o.finish_reason is not None)
                for j, (kind, text) in enumerate(segments):
                    if kind == "tool_calls":
                        delta = {"tool_calls": text}
                    else:
                        delta = {"reasoning_content": text, "reasoning": text} if kind == REASONING else {"content": text}
                    yield chunk(i, delta, logprobs=lps if j == len(segments) - 1 else None)
                if o.finish_reason is not None:
                    finish_sent[i] = True
                    cuts[i] = er.reasoning_cut(o)
                    finish = o.finish_reason
                    if calls is not None and calls[i].calls:
                        state.metrics.tool_calls.labels(state.config.served_model_name).inc(len(calls[i].calls))
                        finish = "tool_calls" if finish == "stop" else finish
                    yield chunk(i, {}, finish=finish, cut=cuts[i])
    except OpenAIError as e:
        yield sse(e.body())
        yield sse("[DONE]")
        return
    if include_usage and er.final is not None:
        f = er.final
        body = {"id": er.request_id, "object": "chat.completion.chunk", "created": created,
                "model": state.config.served_model_name, "choices": [],
                "usage": usage(f.num_prompt_tokens, f.num_completion_tokens,
                               sum(s.num_reasoning_tokens for s in splitters), f.num_cached_tokens, any(cuts))}
        yield sse(body)
    yield sse("[DONE]")


def _tool_segments(stream: tool_calls.ToolCallStream, answers: list[str], i: int, segments: list[tuple[str, Any]],
                   final: bool) -> list[tuple[str, Any]]:
    """Reasoning passes through; answer text goes through the tool-call parser, which returns the content
    that can no longer be part of a call and the tool-call deltas (OpenAI's `delta.tool_calls`)."""
    out: list[tuple[str, Any]] = []
    for kind, text in segments:
        if kind == REASONING:
            out.append((kind, text))
        else:
            answers[i] += text
    content, deltas = stream.feed(answers[i], final)
    if content or (not out and not deltas and segments):
        out.append(("content", content))
    for d in deltas:
        out.append(("tool_calls", [d]))
    return out
