"""`evaluate_served`: a checkpoint's accuracy on a task through a real OpenAI-compatible server.

It starts the app `qiusuo serve` runs (uvicorn on a free loopback port, the engine in its own
process by default), asks every problem over HTTP as a client would — through `/v1/chat/completions`
with the user message a person would type, or `/v1/completions` with the raw prompt —, scores the
answers with the task and shuts the server down. Greedy (temperature 0) by default, so the figure is
comparable with `evaluate(LLM(path), task, problems)`'s greedy accuracy: the two agree when the
checkpoint's chat template renders prompts as its training stage did (`qiusuo.tasks.prompts`).

Requests go out `concurrency` at a time (the engine batches them), over the standard library's
HTTP client, so the runtime needs no client package.
"""

from __future__ import annotations

import functools
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

ROUTES = ("chat", "completions")
_SERVED_NAME = "qiusuo-eval"


def _load_engine(path: str, **options: Any):
    """The server's engine (module level, so the engine process can unpickle the loader)."""
    from qiusuo.engine import LLM

    return LLM(path, **options).llm_engine


def evaluate_served(model: str | Path, task: Any, problems: Sequence[Any], route: str = "chat", *,
                    max_tokens: int = 256, temperature: float = 0.0, seed: int = 0, concurrency: int = 16,
                    engine_process: bool = True, device: str = "cpu", dtype: str = "auto",
                    num_threads: int | None = None, request_timeout: float = 300.0,
                    startup_timeout: float = 300.0, with_outputs: bool = False) -> dict[str, Any]:
    """Accuracy of checkpoint `model` (a directory, or a registry NAME[:TAG]) on `problems`, served.

    Returns {"accuracy", "format_rate", "n", "route", "seconds"} and, with `with_outputs`, "outputs":
    per problem the completion as scored (think block put back), the parsed answer and correctness.
    """
    from qiusuo.serve import create_app
    from qiusuo.serve.server import ServerThread
    from qiusuo.tasks.prompts import prompt_ids, user_message
    from qiusuo.tokenizer import Tokenizer

    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if not problems:
        raise ValueError("no problems to evaluate")
    if concurrency < 1:
        raise ValueError(f"concurrency={concurrency}: must be >= 1")
    path = _resolve(model)
    tokenizer = Tokenizer.from_dir(path)
    if route == "chat" and tokenizer.chat_template is None:
        raise ValueError(f"{path} has no chat template, so the chat route cannot render a prompt; "
                         "use route='completions' (or retrain: every training stage writes one)")
    options = {"device": device, "dtype": dtype, **({"num_threads": num_threads} if num_threads else {})}
    loader = functools.partial(_load_engine, str(path), **options)
    app = create_app(loader, served_model_name=_SERVED_NAME, engine_process=engine_process,
                     max_queue=max(64, concurrency))

    def body(i: int, problem: Any) -> tuple[str, dict[str, Any]]:
        common = {"model": _SERVED_NAME, "max_tokens": max_tokens, "temperature": temperature,
                  "seed": seed * 1_000_003 + i}
        if route == "chat":
            return "/v1/chat/completions", {**common, "messages": [{"role": "user",
                                                                      "content": user_message(task, problem)}]}
        # The raw prompt: its text (the server adds the bos, as training did) or, where a chat
        # template renders it, the exact token ids.
        chat_rendered = getattr(task, "template", "") == "chat"
        prompt = prompt_ids(tokenizer, task, problem) if chat_rendered else problem.prompt
        return "/v1/completions", {**common, "prompt": prompt}

    t0 = time.perf_counter()
    with ServerThread(app, startup_timeout=startup_timeout) as server:
        _wait_healthy(server.url, startup_timeout)
        with ThreadPoolExecutor(max_workers=min(concurrency, len(problems))) as pool:
            replies = list(pool.map(lambda a: _post(server.url, *body(*a), timeout=request_timeout),
                                    enumerate(problems)))
    seconds = time.perf_counter() - t0

    texts = [_completion_text(r, route, task) for r in replies]
    scores = task.score_many(list(problems), texts)
    result: dict[str, Any] = {
        "accuracy": sum(s.accuracy >= 1.0 for s in scores) / len(scores),
        "format_rate": sum(s.format for s in scores) / len(scores),
        "n": len(scores), "route": route, "seconds": round(seconds, 2),
    }
    if with_outputs:
        result["outputs"] = [{"question": p.question, "gold": p.answer, "completion": t, "answer": s.parsed_answer,
                              "correct": s.accuracy >= 1.0} for p, t, s in zip(problems, texts, scores)]
    return result


def _completion_text(reply: dict[str, Any], route: str, task: Any) -> str:
    """The completion as the task scores it. The chat route splits off the think block; put it back."""
    choice = reply["choices"][0]
    if route == "completions":
        return choice["text"]
    message = choice["message"]
    content, reasoning = message.get("content") or "", message.get("reasoning_content")
    if reasoning is None:
        return content
    # score_many puts `<think>` back itself when the task's prompt opens the block.
    return ("" if getattr(task, "think_in_prompt", False) else "<think>") + reasoning + "</think>" + content


def _post(url: str, route: str, payload: dict[str, Any], timeout: float, retries: int = 20) -> dict[str, Any]:
    """POST JSON; a 429 (the server's queue is full) waits its Retry-After and retries, `retries` times at most."""
    data = json.dumps(payload).encode()
    for attempt in range(retries + 1):
        request = urllib.request.Request(url + route, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            if e.code == 429 and attempt < retries:
                time.sleep(float(e.headers.get("Retry-After") or 1))
                continue
            raise RuntimeError(f"POST {route} failed with HTTP {e.code}: {detail}") from None
    raise AssertionError("unreachable")


def _wait_healthy(url: str, timeout: float) -> None:
    """/health answers 503 while the model loads; wait for 200 (or the load error) within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=10) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                status = json.loads(detail).get("status")
            except (json.JSONDecodeError, AttributeError):
                status = None
            if e.code != 503 or status != "loading":  # a failed load or a dead engine will not recover
                raise RuntimeError(f"the server did not become healthy: HTTP {e.code} {detail}") from None
        except urllib.error.URLError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the model did not load within {timeout:.0f} s")
        time.sleep(0.1)


def _resolve(model: str | Path) -> Path:
    from qiusuo.registry import resolve_model  # a checkpoint directory, or a registry name materialized

    return Path(resolve_model(model))


__all__ = ["evaluate_served", "ROUTES"]
