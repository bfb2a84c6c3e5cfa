"""`qiusuo models import|list|show|rm|tag|verify`: the model registry, with Ollama's verbs.

Models live under $QIUSUO_HOME (default ~/.qiusuo) as NAME[:TAG], tag `latest` by default.
Fields that come from a checkpoint's own files (architecture, source run, metadata, file names)
are untrusted text: control characters are shown as escapes and Rich markup is escaped, so a
config.json cannot restyle, hide or hyperlink the table or drive the terminal.
"""

from __future__ import annotations

import argparse
import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def plain(text: object) -> str:
    """`text` with control characters (ANSI escapes, newlines, BEL...) as visible \\x.. escapes."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def cell(text: object) -> str:
    """A table cell: `plain`, then Rich markup escaped (`[red]` prints as `[red]`)."""
    from rich.markup import escape

    return escape(plain(text))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="the local model registry: import, list, show, rm, tag, verify",
                       description=__doc__)
    p.set_defaults(func=lambda args: p.print_help() or 0)
    verbs = p.add_subparsers(dest="verb", metavar="VERB")

    v = verbs.add_parser("import", help="copy a checkpoint directory (or a LoRA adapter, stored as a small model "
                                        "that names its base) into the registry as NAME[:TAG]")
    v.add_argument("dir", help="checkpoint directory (config.json, *.safetensors, tokenizer files), or a LoRA "
                               "adapter directory (adapter_config.json + adapter_model.safetensors)")
    v.add_argument("--base", default=None, help="for an adapter: the registry model it adapts, NAME[:TAG] (default: "
                                                "adapter_config.json's base_model_name_or_path)")
    v.add_argument("--name", required=True, help="NAME[:TAG]; an existing NAME:TAG is replaced")
    v.add_argument("--source-run", default=None, help="run directory it came from (default: qiusuo.json's run_dir)")
    v.add_argument("--eval-score", type=float, default=None, help="headline eval score (default: qiusuo.json's eval)")
    v.set_defaults(func=import_)

    v = verbs.add_parser("list", aliases=["ls"], help="table of the registry's models")
    v.set_defaults(func=list_)

    v = verbs.add_parser("show", help="details and files of a model")
    v.add_argument("name", help="NAME[:TAG]")
    v.set_defaults(func=show)

    v = verbs.add_parser("rm", help="remove a model (blobs no other model uses are deleted)")
    v.add_argument("names", nargs="+", metavar="NAME", help="NAME[:TAG]")
    v.set_defaults(func=rm)

    v = verbs.add_parser("tag", aliases=["cp"], help="give a model another NAME[:TAG] (no bytes copied)")
    v.add_argument("src", help="existing NAME[:TAG]")
    v.add_argument("dst", help="new NAME[:TAG]; replaced if it exists")
    v.set_defaults(func=tag)

    v = verbs.add_parser("verify", help="re-hash every blob of a model; exit 2 if any is corrupt or missing")
    v.add_argument("name", help="NAME[:TAG]")
    v.set_defaults(func=verify)


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _when(ts: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def _score(s: float | None) -> str:
    return "-" if s is None else f"{s:.4g}"


def import_(args) -> int:
    from qiusuo.registry import Registry

    info = Registry().import_dir(args.dir, args.name, source_run=args.source_run, eval_score=args.eval_score,
                                 base=args.base)
    what = f", a LoRA adapter of {info.adapter_of}" if info.adapter_of else ""
    print(f"imported {args.dir} as {info.ref} ({len(info.files)} files, {human_size(info.size)}, "
          f"{human_count(info.parameters)} parameters{what})")
    return 0


def list_(args) -> int:
    import sys

    from rich.console import Console
    from rich.table import Table

    from qiusuo.registry import Registry

    registry = Registry()
    models = registry.list()
    if not models:
        print(f"no models in {registry.home}; add one with `qiusuo models import DIR --name NAME[:TAG]`")
        return 0
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "TAG", "ARCHITECTURE", "PARAMETERS", "SIZE", "CREATED", "SOURCE RUN", "EVAL"):
        table.add_column(col, justify="right" if col in ("PARAMETERS", "SIZE", "EVAL") else "left")
    for m in models:
        table.add_row(cell(m.name), cell(m.tag), cell(m.architecture or m.model_type or "-"),
                      human_count(m.parameters), human_size(m.size), _when(m.created), cell(m.source_run or "-"),
                      _score(m.eval_score))
    # Piped output (grep, a test's capture) would otherwise be wrapped at rich's 80-column default.
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    return 0


def show(args) -> int:
    import json

    from qiusuo.registry import Registry

    m = Registry().show(args.name)
    fields = {
        "name": m.ref, "architecture": m.architecture or "-", "model_type": m.model_type or "-",
        "parameters": "-" if m.parameters is None else f"{m.parameters:,}", "size": human_size(m.size),
        "created": _when(m.created), "source_run": m.source_run or "-", "eval_score": _score(m.eval_score),
    }
    for key, value in fields.items():
        print(f"{key:>14}: {plain(value)}")
    if m.metadata:  # json.dumps escapes control characters itself (ensure_ascii)
        print(f"{'metadata':>14}: {json.dumps(m.metadata, sort_keys=True)}")
    print(f"{'files':>14}:")
    for f in m.files:
        print(f"    {plain(f.path):<32} {human_size(f.size):>10}  sha256:{f.digest[:12]}")
    return 0


def rm(args) -> int:
    from qiusuo.registry import Registry

    registry = Registry()
    for name in args.names:
        registry.remove(name)
        print(f"deleted {name if ':' in name else name + ':latest'}")
    return 0


def tag(args) -> int:
    from qiusuo.registry import Registry

    info = Registry().tag(args.src, args.dst)
    print(f"tagged {args.src} as {info.ref}")
    return 0


def verify(args) -> int:
    from qiusuo.registry import Registry

    info = Registry().verify(args.name)
    print(f"{info.ref}: {len(info.files)} files, all blobs intact")
    return 0
