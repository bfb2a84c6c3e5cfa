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
import functools
import os
import sys

from .common import check_port_free
from .flags import add_config_flags, add_engine_flags, config_kwargs, engine_options

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


# ServerConfig fields with flags of their own: --served-model-name (default: --model) and the key's
# three sources (add_api_key_flags)
SERVER_SKIP = ("served_model_name", "api_key")


def register(sub: argparse._SubParsersAction) -> None:
    from qiusuo.serve.config import ServerConfig  # light: no torch, no fastapi

    p = sub.add_parser("serve", help="serve a checkpoint with an OpenAI-compatible API (chat, completions, "
                                     "reasoning split, metrics)", description=__doc__)
    p.add_argument("--model", required=True, help="registry name (NAME[:TAG]) or checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only; 0.0.0.0 to expose)")
    p.add_argument("--port", type=int, default=8000)
    add_api_key_flags(p)
    p.add_argument("--served-model-name", default=None, help="the name clients pass as `model` (default: --model)")
    add_lora_flag(p)
    add_config_flags(p, ServerConfig, skip=SERVER_SKIP)
    add_engine_flags(p)
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="step the engine in its own process (default); --no-engine-process: on a thread of "
                        "the API process")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def run(args) -> int:
    from qiusuo.registry import resolve_model
    from qiusuo.serve import create_app
    from qiusuo.serve.config import ServerConfig
    from qiusuo.serve.outputs import EngineLoadError
    from qiusuo.serve.server import run as run_server

    engine = engine_options(args)  # a bad engine or server flag fails first (exit 2), before any loading
    lora_options(args, engine, args.served_model_name or args.model)
    server = dict(config_kwargs(ServerConfig, args, skip=SERVER_SKIP), api_key=api_key(args))
    ServerConfig(served_model_name=args.served_model_name or args.model, **server)
    path = resolve_model(args.model)  # fail fast (exit 2) on an unknown name, before binding the port
    check_port_free(args.host, args.port)  # a busy port: one line and exit 2, not a traceback after loading
    # a partial of a module-level function pickles: the engine process calls it to build its engine
    load = functools.partial(load_engine, path, **engine)
    app = create_app(load, served_model_name=args.served_model_name or args.model,
                     engine_process=args.engine_process, **server)
    print(f"serving {args.model} ({path}) on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if server['api_key'] else ''}", flush=True)
    error = run_server(app, host=args.host, port=args.port, log_level=args.log_level)
    if error is not None:  # the model could not load (or reload), or a thread engine failed
        what = "could not be loaded" if isinstance(error, EngineLoadError) else "stopped serving"
        print(f"qiusuo serve: error: the model {args.model} {what}: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


def add_lora_flag(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--lora-modules NAME=PATH ... (vLLM's flag), for `serve` and `deploy`; read back by `lora_options`."""
    p.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH", dest="lora_module_specs",
                   help="LoRA adapters served per request on the base, batched with base requests (vLLM's flag): "
                        "NAME=PATH with PATH an adapter directory (PEFT layout) or a registry adapter; a request "
                        "asks for one with `model=NAME`")


def lora_options(args, engine: dict, served_model_name: str) -> None:
    """Put --lora-modules into the engine options `engine` (in place), checked with the rest of them."""
    if args.lora_module_specs:  # not `lora_modules`: that name is EngineConfig's field, a dict
        from qiusuo.engine.config import EngineConfig

        engine["lora_modules"] = lora_modules(args.lora_module_specs, served_model_name)
        EngineConfig(**engine)  # lora with compile or speculative decoding: exit 2 here


def lora_modules(specs: list[str], served_model_name: str) -> dict[str, str]:
    """--lora-modules NAME=PATH ... as {name: adapter directory}; a PATH that is no directory is looked up
    in the registry (an imported adapter). ValueError for a malformed, repeated or clashing name."""
    from qiusuo.registry import resolve_adapter

    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules {spec!r}: write NAME=PATH (PATH an adapter directory or a registry "
                             "adapter)")
        if name in out or name == served_model_name:
            raise ValueError(f"--lora-modules: the name {name!r} is given twice (or is the base's served name); "
                             "each adapter needs its own name")
        out[name] = str(resolve_adapter(path))
    return out


def load_engine(path, **options):
    """The engine of `qiusuo serve` (module level, so that the engine process can unpickle it)."""
    from qiusuo.engine import LLM

    return LLM(path, **options).llm_engine
