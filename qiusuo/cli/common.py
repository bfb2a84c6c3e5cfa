"""Flags and helpers shared by commands: model resolution, device, threads."""

from __future__ import annotations

import argparse
import os


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 2 on a quiet machine, 1 when the load average "
                        "says a neighbour is busy: 2 threads ran 4-10x slower than 1 under load)")
    p.add_argument("--seed", type=int, default=0)


def default_threads() -> int:
    """2 threads on a quiet 2-core machine, 1 under load (reference/r1-zero-miniature.md)."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    if cores <= 2:
        return 1 if load > 1.5 else cores
    return max(1, cores - int(load))  # leave the cores a neighbour is using


def apply_threads(threads: int | None) -> int:
    import torch

    n = threads or default_threads()
    torch.set_num_threads(n)
    return n


def resolve_model(name_or_path: str):
    """A checkpoint directory, or a registry name (NAME[:TAG]) when the registry is installed."""
    from pathlib import Path

    p = Path(name_or_path)
    if (p / "config.json").is_file():
        return p
    try:
        from qiusuo.registry import resolve_model as registry_resolve
    except ImportError:
        raise FileNotFoundError(f"{name_or_path} is not a checkpoint directory (no config.json)") from None
    return registry_resolve(name_or_path)
