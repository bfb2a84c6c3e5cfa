"""Helpers shared by commands: threads, QIUSUO_SMOKE budgets, first-run problems (ports, busy machine, torch).

The flags themselves are generated from the config dataclasses (flags.py)."""

from __future__ import annotations

import argparse


def apply_threads(threads: int | None) -> int:
    from qiusuo.runtime import set_threads

    return set_threads(threads)


# --- QIUSUO_SMOKE=1: every command's budgets capped, for tests/test_readme.py and CI smoke runs -------------
# One place, applied by `qiusuo.cli.main` to the parsed flags of every command before any config is built:
# a flag with one of these names (the config dataclasses' field names) is lowered to the cap, never raised.
# The README's commands then run as written, in seconds; their numbers mean nothing at these budgets.
SMOKE_CAPS = {
    "steps": 3, "warmup_steps": 1,  # pretrain / sft / distill / grpo
    "batch_size": 16, "prompts_per_step": 4, "group_size": 4, "eval_problems": 24,
    "num_prompts": 16, "samples_per_prompt": 2,  # distill
    "pretrain_steps": 12, "pretrain_batch": 16, "grpo_steps": 3, "eval_samples": 2,  # demo
    "n": 24, "max_tokens": 64,  # eval (and generate's --max-tokens)
}


def smoke_enabled() -> bool:
    import os

    return os.environ.get("QIUSUO_SMOKE", "").strip().lower() not in ("", "0", "false", "no")


def apply_smoke(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """Under QIUSUO_SMOKE=1, lower each budget flag of `args` to its SMOKE_CAPS value, in place, and say so
    on stderr. Returns {flag: (asked, used)} for the flags it lowered (empty when smoke is off)."""
    import sys

    if not smoke_enabled():
        return {}
    lowered = {}
    for name, cap in SMOKE_CAPS.items():
        value = getattr(args, name, None)
        if value is None and hasattr(args, name) and cap < min(_per_task_defaults(name), default=cap):
            value = min(_per_task_defaults(name))  # unset: the demo's per-task default, above the cap whatever the task
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            setattr(args, name, cap)
            lowered[name] = (value, cap)
    if lowered:
        caps = ", ".join(f"--{k.replace('_', '-')} {v[1]}" for k, v in lowered.items())
        print(f"qiusuo: QIUSUO_SMOKE is set: budgets lowered for a smoke run ({caps}); the figures mean nothing",
              file=sys.stderr)
    return lowered


def _per_task_defaults(name: str) -> list[int]:
    """The values an unset (None) demo budget flag stands for, one per task (qiusuo.train.demo.TASK_DEFAULTS)."""
    from qiusuo.train.demo import TASK_DEFAULTS  # light: dataclasses and the train configs

    return [d[name] for d in TASK_DEFAULTS.values() if name in d]


# --- first-run problems: the messages README's Troubleshooting section quotes (tools/troubleshooting.py) -------

def port_in_use_message(host: str, port: int, command: str = "qiusuo serve") -> str:
    return (f"{command}: error: port {port} on {host} is already in use (another qiusuo serve or deploy?); "
            f"stop that server or pick a free port with --port {port + 1}")


def check_port_free(host: str, port: int, command: str = "qiusuo serve") -> None:
    """Raise ValueError (exit 2, one line) when HOST:PORT cannot be bound, before anything slow starts.

    The probe sets SO_REUSEADDR as uvicorn does, so a socket lingering in TIME_WAIT is not taken for a
    server; a port that a live server holds still fails to bind."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ValueError(port_in_use_message(host, port, command).split(": error: ", 1)[1]) from None
            raise


def busy_machine_message(load: float, cores: int, threads: int) -> str:
    return (f"qiusuo: the machine is busy (load average {load:.1f} on {cores} cores): using {threads} torch "
            f"thread{'s' if threads != 1 else ''}; runs take longer, not worse (budgets are in steps). "
            "--threads N overrides")


def note_busy_machine(args: argparse.Namespace) -> str | None:
    """Print busy_machine_message on stderr when --threads was left to its default and the load average made
    `default_threads()` use fewer threads than there are cores (returns the message, or None)."""
    import os
    import sys

    from qiusuo.runtime import default_threads

    # --threads is `threads` in training configs, the engine's `num_threads` in generate / chat / eval
    threads = getattr(args, "threads", getattr(args, "num_threads", 1))
    if threads not in (None, 0) or getattr(args, "device", "cpu") != "cpu":
        return None
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return None
    cores, threads = os.cpu_count() or 1, default_threads()
    if threads >= cores:  # quiet enough: every core is used, nothing to say
        return None
    message = busy_machine_message(load, cores, threads)
    print(message, file=sys.stderr)
    return message


def torch_build_problem(spec: str = "torch==2.13.0") -> tuple[str, bool] | None:
    """(message, fatal) when the installed torch is not the build `make` pins; None when it is. `make`
    runs this after installing: a torch already in the venv, or a dependency, may have brought another."""
    import importlib.metadata

    try:
        installed = importlib.metadata.version("torch")
        requires = importlib.metadata.requires("torch") or []
    except importlib.metadata.PackageNotFoundError:
        return f"make: torch is not installed in .venv; fix: rm -rf .venv and run make again", True
    # PyPI's Linux wheel of a plain version is the CUDA build: it requires the nvidia-* runtime packages
    cuda = any(r.startswith("nvidia-") and "extra ==" not in r for r in requires)
    return torch_mismatch_message(installed, spec, cuda)


def torch_mismatch_message(installed: str, spec: str, cuda: bool) -> tuple[str, bool] | None:
    wanted = spec.split("==", 1)[1] if "==" in spec else None
    base, _, local = installed.partition("+")
    if wanted is not None and base != wanted:
        return (f"make: .venv has torch {installed}, but make pins {spec}; fix: rm -rf .venv and run make "
                "again (on a GPU machine, see README's 'Installing on a GPU machine')"), True
    if cuda or local.startswith("cu"):
        return (f"make: note: torch {installed} is a CUDA build (GBs on disk, slower to import); it runs on "
                "CPU too. For the CPU build: .venv/bin/pip install --force-reinstall torch==" + base
                + " --index-url https://download.pytorch.org/whl/cpu"), False
    return None
