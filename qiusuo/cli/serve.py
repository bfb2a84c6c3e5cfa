"""`qiusuo serve --model NAME_OR_DIR`: the OpenAI-compatible server (qiusuo.serve) on one checkpoint.

The HTTP server starts at once and loads the model in the background: /health answers 503 until
it is ready (as llama.cpp's does), so an orchestrator can tell "loading" from "down". If the model
cannot load, the error is printed and the command exits 1 (as vLLM's and llama.cpp's servers do).
By default the engine steps in its own process (`--engine-process`, vLLM V1's engine core): the
API process's event loop then never waits on the engine for the GIL. If that process dies later
(killed, out of memory), requests in flight get an error, the server restarts it with a backoff
(`qiusuo:engine_restarts_total` counts it) and answers 503 until it is back.

The API key: `--api-key-file PATH` or the environment variable QIUSUO_API_KEY keep it out of `ps`;
`--api-key KEY` works too but every user of the machine can read it there.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys

from .common import add_compile_flag, check_port_free, compile_setting

API_KEY_ENV = "QIUSUO_API_KEY"


def add_api_key_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every route but /health "
                                                   "(visible in `ps`: prefer --api-key-file or env QIUSUO_API_KEY)")
    p.add_argument("--api-key-file", default=None, help="read the API key from this file (its first line)")


def api_key(args) -> str | None:
    """--api-key, else --api-key-file's first line, else $QIUSUO_API_KEY, else None (no auth)."""
    if args.api_key is not None and args.api_key_file is not None:
        raise ValueError("give --api-key or --api-key-file, not both")
    if args.api_key is not None:
        key = args.api_key
    elif args.api_key_file is not None:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except OSError as e:
            raise ValueError(f"--api-key-file {args.api_key_file}: cannot read it ({e.strerror})") from None
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file}: its first line is empty; write the key there")
    else:
        key = os.environ.get(API_KEY_ENV) or None
    if key is not None and (not key.isprintable() or any(c.isspace() for c in key)):
        raise ValueError("the API key must be printable with no spaces (it is sent as `Authorization: Bearer KEY`)")
    return key


def _default(cls, name: str):
    return {f.name: f.default for f in dataclasses.fields(cls)}[name]


def register(sub: argparse._SubParsersAction) -> None:
    from qiusuo.serve.config import ServerConfig  # light: no torch, no fastapi

    p = sub.add_parser("serve", help="serve a checkpoint with an OpenAI-compatible API (chat, completions, "
                                     "reasoning split, metrics)", description=__doc__)
    p.add_argument("--model", required=True, help="registry name (NAME[:TAG]) or checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only; 0.0.0.0 to expose)")
    p.add_argument("--port", type=int, default=8000)
    add_api_key_flags(p)
    p.add_argument("--served-model-name", default=None, help="the name clients pass as `model` (default: --model)")
    p.add_argument("--max-queue", type=int, default=_default(ServerConfig, "max_queue"),
                   help="sequences (n per prompt) that may wait for their first token; past it, 429 with "
                        "Retry-After")
    p.add_argument("--max-tokens-cap", type=int, default=None, help="upper bound on any request's max_tokens "
                                                                     "(default: the model's context)")
    p.add_argument("--max-output-budget", type=int, default=_default(ServerConfig, "max_output_budget"),
                   help="per request, n x max_tokens x (1 + top_logprobs) summed over its prompts; over it, 400")
    p.add_argument("--thinking-budget", type=int, default=None,
                   help="default max reasoning tokens per request (a request's thinking_budget wins)")
    # --- issue 16 (harden2): request body limit; ServerConfig.max_body_bytes ---
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest request body in bytes; over it, 413 before parsing (default: 64 KiB + 32 bytes "
                        "per context token)")
    p.add_argument("--stream-send-timeout", type=float, default=_default(ServerConfig, "stream_send_timeout_s"),
                   help="seconds a streaming client may read nothing before it is disconnected and its request "
                        "aborted")
    # --- end issue 16 block ---
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
    from qiusuo.registry import resolve_model
    from qiusuo.serve import create_app
    from qiusuo.serve.outputs import EngineLoadError
    from qiusuo.serve.server import run as run_server

    engine_kwargs = {k: v for k, v in dict(num_threads=args.threads, max_model_len=args.max_model_len,
                                           max_num_seqs=args.max_num_seqs,
                                           kv_cache_bytes=args.kv_cache_bytes,
                                           compile=compile_setting(args) or None).items() if v is not None}
    path = resolve_model(args.model)  # fail fast (exit 2) on an unknown name, before binding the port
    check_port_free(args.host, args.port)  # a busy port: one line and exit 2, not a traceback after loading
    # a partial of a module-level function pickles: the engine process calls it to build its engine
    load = functools.partial(load_engine, path, device=args.device, dtype=args.dtype, quantization=args.quantize,
                             **engine_kwargs)
    key = api_key(args)
    app = create_app(load, served_model_name=args.served_model_name or args.model,
                     engine_process=args.engine_process, api_key=key, max_queue=args.max_queue,
                     max_tokens_cap=args.max_tokens_cap, max_output_budget=args.max_output_budget,
                     default_thinking_budget=args.thinking_budget, max_body_bytes=args.max_body_bytes,
                     stream_send_timeout_s=args.stream_send_timeout)
    print(f"serving {args.model} ({path}) on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if key else ''}", flush=True)
    error = run_server(app, host=args.host, port=args.port, log_level=args.log_level)
    if error is not None:  # the model could not load (or reload), or a thread engine failed
        what = "could not be loaded" if isinstance(error, EngineLoadError) else "stopped serving"
        print(f"qiusuo serve: error: the model {args.model} {what}: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


def load_engine(path, **options):
    """The engine of `qiusuo serve` (module level, so that the engine process can unpickle it)."""
    from qiusuo.engine import LLM

    return LLM(path, **options).llm_engine
