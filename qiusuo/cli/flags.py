"""Command-line flags generated from the config dataclasses: each default and help text is written once.

`add_config_flags(parser, cls)` adds one flag per field of `cls` (--field-name, or the field's
`flag` metadata where the flag predates the field's name: --quantize, --threads), with the field's
default and help (qiusuo/fields.py); `config_kwargs(cls, args)` reads them back as keyword
arguments. The train stages, `demo`, and the engine, server and deploy flags of `generate`, `chat`,
`eval`, `serve` and `deploy` are all built here (`add_engine_flags` / `engine_options`).

The dataclass checks the values in its `__post_init__`, so argparse is given no `choices`: an
enumerated field (`Literal[...]`) shows its values as the metavar, and a wrong one is refused by
the dataclass with the same one line whether it came from the CLI or from Python (exit 2).

    bool                       --flag / --no-flag
    bool | Literal[modes]      --flag (the default mode) and --flag-mode MODE (implies --flag)
    Literal[values] [| None]   --flag {a,b,c}, typed like the values
    T | None                   --flag T, default None
    no default, dict, list     no flag: the command supplies the value
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import typing
from typing import Any, Literal

from qiusuo.fields import choices, flag_of, type_hints, union_args

# EngineConfig fields that are no flag of their own: each command's --seed seeds its sampling (and
# eval's problems); requests that set a seed never read the engine's.
ENGINE_SKIP = ("seed",)


def _kind(cls: type, f: dataclasses.Field) -> tuple[str, Any]:
    """("skip" | "bool" | "bool+mode" | "value", argparse type) of a field."""
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "skip", None
    members = [m for m in union_args(type_hints(cls)[f.name]) if m is not type(None)]
    literals = [v for m in members if typing.get_origin(m) is Literal for v in typing.get_args(m)]
    if bool in members:
        return ("bool+mode" if literals else "bool"), None
    if literals:
        return "value", type(literals[0])
    plain = [m for m in members if isinstance(m, type) and m in (int, float, str)]
    return ("value", plain[0]) if plain else ("skip", None)


def add_config_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                     skip: tuple[str, ...] = ()) -> None:
    """One flag per field of the dataclass `cls` (see the module docstring for the rules)."""
    for f in dataclasses.fields(cls):
        kind, typ = _kind(cls, f)
        if f.name in skip or not f.init or kind == "skip":
            continue
        flag = flag_of(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help strings
        allowed = choices(cls, f.name)
        if kind == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
            continue
        if kind == "bool+mode":
            modes = [m for m in allowed if isinstance(m, str)]
            parser.add_argument(flag, dest=f.name, action="store_true", default=bool(default), help=help_text)
            parser.add_argument(f"{flag}-mode", dest=f"{f.name}_mode", default=None,
                                metavar="{" + ",".join(modes) + "}", help=f"implies {flag}; one of {', '.join(modes)}")
            continue
        # named after the flag, not the field (--name NAME, not APP_NAME); an enumeration lists its values
        metavar = flag.lstrip("-").replace("-", "_").upper()
        if allowed:
            metavar = "{" + ",".join(str(a) for a in allowed if a is not None) + "}"
        if f.metadata.get("required"):
            parser.add_argument(flag, dest=f.name, type=typ, required=True, metavar=metavar, help=help_text)
        else:
            shown = f"{help_text} (default: {default})" if default not in ("", None) else help_text
            parser.add_argument(flag, dest=f.name, type=typ, default=default, metavar=metavar, help=shown)


def config_kwargs(cls: type, args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The values of `cls`'s flags in `args`, as keyword arguments of `cls`."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if _kind(cls, f)[0] == "bool+mode":
            value = getattr(args, f"{f.name}_mode", None) or value
        out[f.name] = value
    return out


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    return cls(**config_kwargs(cls, args))


# --- the engine flags of generate, chat, eval, serve and deploy -----------------------------------------------

def add_engine_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, skip: tuple[str, ...] = ()) -> None:
    from qiusuo.engine.config import EngineConfig  # light: the engine package imports torch lazily

    add_config_flags(parser, EngineConfig, skip=ENGINE_SKIP + skip)
    # speculative_config is a dict (vLLM's shape); its one method so far is a count on the command line
    parser.add_argument("--speculative-mtp", type=int, default=None, metavar="K",
                        help="MTP self-speculative decoding: the model's MTP layer drafts K tokens per step, the "
                             "model verifies them in one forward (same tokens when greedy, same distribution when "
                             "sampling) (qiusuo/engine/spec_decode.py)")


def engine_options(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """EngineConfig keyword arguments from the engine flags, checked (a bad value: ValueError, exit 2).

    --threads left unset takes `default_threads()` (the load average's choice, as every command's
    threads do); with --compile, says on stderr that the start will compile."""
    from qiusuo.engine.config import EngineConfig
    from qiusuo.runtime import default_threads

    options = config_kwargs(EngineConfig, args, skip=ENGINE_SKIP + skip)
    k = getattr(args, "speculative_mtp", None)
    if k is not None:
        options["speculative_config"] = {"method": "mtp", "num_speculative_tokens": k}
    if "num_threads" in options and options["num_threads"] is None:
        options["num_threads"] = default_threads()
    EngineConfig(**options)  # the one check, before a model loads or a port is bound
    if options.get("compile"):
        mode = options["compile"] if isinstance(options["compile"], str) else "default"
        cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "torchinductor_<user>")
        print(f"compiling the decode step with torch.compile (mode {mode}): minutes on first use of a model, "
              f"cached in {cache} for later starts", file=sys.stderr)
    return options
