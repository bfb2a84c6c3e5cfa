"""Flags and helpers shared by commands: model resolution, device, threads."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 2 on a quiet machine, 1 when the load average "
                        "says a neighbour is busy: 2 threads ran 4-10x slower than 1 under load)")
    p.add_argument("--seed", type=int, default=0)


def add_compile_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: faster small-model decode on CPU, after compiling "
                        "at start (minutes for a 100M+ model on first use; later starts reuse inductor's "
                        "on-disk cache, TORCHINDUCTOR_CACHE_DIR) (qiusuo/engine/compiled.py)")
    p.add_argument("--compile-mode", default=None, choices=["default", "max-autotune"],
                   help="implies --compile; max-autotune also tunes the matmul kernels (~1 min, faster batches)")


def compile_setting(args: argparse.Namespace) -> bool | str:
    """EngineConfig.compile from --compile / --compile-mode; says on stderr that the start will compile."""
    setting = args.compile_mode or bool(args.compile)
    if setting:
        cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "torchinductor_<user>")
        print(f"compiling the decode step with torch.compile (mode {setting if isinstance(setting, str) else 'default'}): "
              f"minutes on first use of a model, cached in {cache} for later starts", file=sys.stderr)
    return setting


def apply_threads(threads: int | None) -> int:
    from qiusuo.runtime import set_threads

    return set_threads(threads)


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
