"""`qiusuo <command>`: argument parsing only; every command calls into a part.

Each command group lives in its own module here with a `register(subparsers)` function that
adds its parser(s) and sets `func` to the handler. Modules are imported only when listed, and
handlers import the heavy parts (torch, ...) lazily, so `qiusuo --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from qiusuo import __version__

# Commands that train or generate on the CPU: they say so when a busy machine lowers their thread count.
COMPUTE_COMMANDS = {"demo", "pretrain", "sft", "distill", "grpo", "generate", "eval"}
# Command modules, in the order `qiusuo --help` lists them.
COMMAND_MODULES = ["demo", "train", "generate", "eval", "serve", "deploy", "export", "model", "models"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qiusuo",
        description="qiusuo (求索): reasoning from verifiable rewards on a DeepSeek-style model, "
        "from a laptop CPU to a Ray cluster.",
    )
    parser.add_argument("--version", action="version", version=f"qiusuo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"qiusuo.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from qiusuo.cli.common import apply_smoke, note_busy_machine

    apply_smoke(args)  # QIUSUO_SMOKE=1: every command's budgets capped, here and nowhere else
    if args.command in COMPUTE_COMMANDS:
        note_busy_machine(args)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"qiusuo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
