"""`qiusuo <command>`: argument parsing only; every command calls into a part.

Each command group lives in its own module here with a `register(subparsers)` function that
adds its parser(s) and sets `func` to the handler. Modules are imported only when listed, and
handlers import the heavy parts (torch, ...) lazily, so `qiusuo --help` is fast.

A user mistake (a bad flag value, a missing or malformed file, an unknown model, a model in use,
a sandbox the kernel cannot provide) prints one line `qiusuo CMD: error: ...` and exits 2, never
a traceback: `user_errors()` lists the project's error types that mean "you asked for something
that cannot be done"; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
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
    parser.add_argument("--allow-weak-sandbox", action="store_true",
                        help="run code-task programs even when the kernel refuses a sandbox layer (namespaces, "
                             "Landlock, seccomp); without it such runs are refused and score 0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"qiusuo.cli.{name}").register(sub)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that report a user mistake (RegistryError and config errors are
    ValueErrors; OSError covers missing, unreadable and is-a-directory paths)."""
    from qiusuo.tasks.sandbox import SandboxError

    errors: list[type[BaseException]] = [ValueError, OSError, SandboxError]
    try:
        from safetensors import SafetensorError  # a corrupt weights file read outside our checks

        errors.append(SafetensorError)
    except ImportError:
        pass  # not installed: nothing of it can be raised
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.allow_weak_sandbox:
        os.environ["QIUSUO_ALLOW_WEAK_SANDBOX"] = "1"  # read by the code task, here and in Ray workers
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from qiusuo.cli.common import apply_smoke, note_busy_machine

    apply_smoke(args)  # QIUSUO_SMOKE=1: every command's budgets capped, here and nowhere else
    if args.command in COMPUTE_COMMANDS:
        note_busy_machine(args)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except user_errors() as e:
        message = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message holds
        print(f"qiusuo {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
