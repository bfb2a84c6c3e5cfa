"""`qiusuo serve --model NAME_OR_DIR`: the OpenAI-compatible server (qiusuo.serve) on one checkpoint.

The HTTP server starts at once and loads the model on a thread: /health answers 503 until it is
ready (as llama.cpp's does), so an orchestrator can tell "loading" from "down". By default the
engine steps in its own process (`--engine-process`, vLLM V1's engine core): the API process's
event loop then never waits on the engine for the GIL (issue 6: served throughput at 32 streams).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os

from .common import add_compile_flag, compile_setting


def _default(cls, name: str):
    return {f.name: f.default for f in dataclasses.fields(cls)}[name]


def register(sub: argparse._SubParsersAction) -> None:
    from qiusuo.serve.config import ServerConfig  # light: no torch, no fastapi

    p = sub.add_parser("serve", help="serve a checkpoint with an OpenAI-compatible API (chat, completions, "
                                     "reasoning split, metrics)", description=__doc__)
    p.add_argument("--model", required=True, help="registry name (NAME[:TAG]) or checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only; 0.0.0.0 to expose)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("QIUSUO_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every route but /health (env QIUSUO_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the name clients pass as `model` (default: --model)")
    p.add_argument("--max-queue", type=int, default=_default(ServerConfig, "max_queue"),
                   help="requests that may wait for their first token; past it, 429 with Retry-After")
    p.add_argument("--max-tokens-cap", type=int, default=None, help="upper bound on any request's max_tokens")
    p.add_argument("--thinking-budget", type=int, default=None,
                   help="default max reasoning tokens per request (a request's thinking_budget wins)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads for the engine (default: torch's)")
    p.add_argument("--quantize", default=None, choices=["int8", "int8-dynamic", "int4"],
                   help="low-bit weights (qiusuo/model/quantize.py): int8 per channel, int8-dynamic (8-bit "
                        "activations too, faster on x86, less exact), int4 in groups of 32")
    add_compile_flag(p)
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="sequences per engine step")
    p.add_argument("--kv-cache-bytes", type=int, default=None, help="KV-cache budget in bytes")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="step the engine in its own process (default); --no-engine-process: on a thread of "
                        "the API process")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def run(args) -> int:
    from qiusuo.serve import create_app
    from qiusuo.serve.server import run as run_server

    engine_kwargs = {k: v for k, v in dict(num_threads=args.threads, max_model_len=args.max_model_len,
                                           max_num_seqs=args.max_num_seqs,
                                           kv_cache_bytes=args.kv_cache_bytes,
                                           compile=compile_setting(args) or None).items() if v is not None}
    path = _resolve(args.model)  # fail fast (exit 2) on an unknown name, before binding the port
    # a partial of a module-level function pickles: the engine process calls it to build its engine
    load = functools.partial(load_engine, path, device=args.device, dtype=args.dtype, quantization=args.quantize,
                             **engine_kwargs)
    app = create_app(load, served_model_name=args.served_model_name or args.model,
                     engine_process=args.engine_process, api_key=args.api_key, max_queue=args.max_queue,
                     max_tokens_cap=args.max_tokens_cap, default_thinking_budget=args.thinking_budget)
    print(f"serving {args.model} ({path}) on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if args.api_key else ''}")
    run_server(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def load_engine(path, **options):
    """The engine of `qiusuo serve` (module level, so that the engine process can unpickle it)."""
    from qiusuo.engine import LLM

    return LLM(path, **options).llm_engine


def _resolve(name_or_path: str):
    try:
        from qiusuo.registry import resolve_model
    except ImportError:  # the registry is optional: a plain directory still works
        return name_or_path
    return resolve_model(name_or_path)
