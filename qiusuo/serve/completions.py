"""POST /v1/completions: raw prompts (text or token ids, one or many), the legacy response shape.

The text is returned as generated, think tags included (no reasoning split here, as in vLLM);
`usage.completion_tokens_details.reasoning_tokens` still counts the tokens inside think blocks.
Choice `index` is `prompt_index * n + sample_index`, as OpenAI numbers them.
"""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from qiusuo.engine.reasoning import count_reasoning

from .protocol import CompletionRequest, OpenAIError
from .logprobs import completion_logprobs
from .params import check_prompt_ids, check_text_fits, resolve_max_tokens, sampling_params, structured_outputs
from .serving import EngineRequest, ServerState, merge, new_id, sse, start_all, unless_disconnected, usage
from .streaming import AbortingStreamingResponse


def prompts_ids(state: ServerState, prompt: Any, n: int) -> list[list[int]]:
    """Text prompts get the tokenizer's bos (as `LLM.generate` does); id prompts are taken as they are.
    A batch whose sequences (prompts x n) could never be admitted is refused before any tokenizing."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise OpenAIError(400, "prompt is an empty list; give a string, a list of strings or token ids.",
                          param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    if len(prompt) * n > state.config.max_queue:
        state.admit(len(prompt) * n)  # raises the 400 that names the limit
    for p in prompt:
        if isinstance(p, str):
            check_text_fits(state, p, "prompt")
    out = []
    for p in prompt:
        ids = state.tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p)
        check_prompt_ids(state, ids, "prompt")
        out.append(ids)
    return out


async def create_completion(state: ServerState, req: CompletionRequest, raw: Request) -> Response:
    arrival = time.monotonic()
    state.ready()
    adapter = state.check_model(req.model)
    all_ids = prompts_ids(state, req.prompt, req.n)
    k = req.logprobs
    structured = structured_outputs(state, req)
    params = [sampling_params(req, resolve_max_tokens(state, req.max_tokens, len(ids), n=req.n, top_logprobs=k,
                                                      num_prompts=len(all_ids)), k, structured) for ids in all_ids]
    state.admit(len(all_ids) * req.n, len(all_ids))
    if structured is not None:
        state.metrics.structured_requests.labels(state.config.served_model_name, structured.kind).inc()
    rid = new_id("cmpl")
    ers = [EngineRequest(state, f"{rid}-{i}", ids, p, None, arrival, lora_name=adapter)
           for i, (ids, p) in enumerate(zip(all_ids, params))]
    await start_all(ers)
    state.metrics.api_requests.labels(state.config.served_model_name, "openai_completions").inc()
    created = int(time.time())

    def close_all() -> None:
        for er in ers:
            er.close()

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return AbortingStreamingResponse(_stream(state, rid, ers, created, k, include_usage, req.n),
                                         on_close=close_all)
    try:
        done = await unless_disconnected(raw, _run_all(ers))
    finally:
        close_all()
    if done is None:
        return Response(status_code=499)
    return JSONResponse(_response(state, rid, ers, created, k, req.n))


async def _run_all(ers: list[EngineRequest]) -> bool:
    async for _ in merge([er.outputs() for er in ers]):
        pass
    return True


def _usage(state: ServerState, ers: list[EngineRequest]) -> dict[str, Any]:
    tok = state.tokenizer
    prompt = sum(er.final.num_prompt_tokens for er in ers)
    completion = sum(er.final.num_completion_tokens for er in ers)
    reasoning = sum(count_reasoning(tok, er.prompt_ids, o.token_ids) for er in ers for o in er.final.outputs)
    cached = sum(er.final.num_cached_tokens for er in ers)
    return usage(prompt, completion, reasoning, cached)


def _response(state: ServerState, rid: str, ers: list[EngineRequest], created: int, k: int | None,
              n: int) -> dict[str, Any]:
    tok = state.tokenizer
    choices = []
    for p, er in enumerate(ers):
        for o in er.final.outputs:
            choices.append({
                "index": p * n + o.index, "text": o.text,
                "logprobs": completion_logprobs(tok, o, 0, len(o.token_ids), k, 0) if k is not None else None,
                "finish_reason": o.finish_reason, "stop_reason": o.stop_reason,
            })
    return {"id": rid, "object": "text_completion", "created": created, "model": state.config.served_model_name,
            "choices": choices, "usage": _usage(state, ers)}


async def _stream(state: ServerState, rid: str, ers: list[EngineRequest], created: int, k: int | None,
                  include_usage: bool, n: int) -> AsyncIterator[str]:
    tok, name = state.tokenizer, state.config.served_model_name
    sent = {}  # choice index -> [tokens with logprobs sent, characters sent, finished]

    def chunk(index: int, text: str, finish: str | None = None, logprobs=None) -> str:
        body = {"id": rid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        return sse(body)

    try:
        async for p, out in merge([er.outputs() for er in ers]):
            for o in out.outputs:
                index = p * n + o.index
                state_ = sent.setdefault(index, [0, 0, False])
                if state_[2]:
                    continue
                lps = None
                if k is not None and len(o.token_ids) > state_[0]:
                    lps = completion_logprobs(tok, o, state_[0], len(o.token_ids), k, state_[1])
                    state_[0] = len(o.token_ids)
                if o.delta_text or lps:
                    state_[1] += len(o.delta_text)
                    yield chunk(index, o.delta_text, logprobs=lps)
                if o.finish_reason is not None:
                    state_[2] = True
                    yield chunk(index, "", finish=o.finish_reason)
    except OpenAIError as e:
        yield sse(e.body())
        yield sse("[DONE]")
        return
    if include_usage and all(er.final is not None for er in ers):
        yield sse({"id": rid, "object": "text_completion", "created": created, "model": name, "choices": [],
                   "usage": _usage(state, ers)})
    yield sse("[DONE]")
