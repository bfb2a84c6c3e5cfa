"""The model registry: checkpoints stored by name under `QIUSUO_HOME`, as Ollama stores models.

`resolve_model` is what every `--model` option calls: a checkpoint directory is used as is, a
registry name is materialized and leased for the life of the process (so `models rm` refuses
to delete a directory a running server or deployment loads from). Only the standard library is imported here (no torch), so
commands that merely resolve a name stay fast.
"""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoint_info import count_parameters, inspect_checkpoint, safetensors_header
from .registry import (
    DEFAULT_TAG, CorruptBlobError, FileEntry, Lease, ModelInfo, Registry, RegistryError, UnknownModelError,
    default_home, parse_name,
)

_leases: dict[tuple[str, str], Lease] = {}  # held until the process exits

__all__ = [
    "DEFAULT_TAG", "CorruptBlobError", "FileEntry", "Lease", "ModelInfo", "Registry", "RegistryError",
    "UnknownModelError", "count_parameters", "default_home", "inspect_checkpoint", "parse_name",
    "lease_materialized", "resolve_model", "resolve_adapter", "adapter_base_of", "safetensors_header",
]


def resolve_model(name_or_path: str | os.PathLike, *, home: str | os.PathLike | None = None) -> Path:
    """A checkpoint directory for `name_or_path`: an existing directory with config.json, else a
    registry name (NAME or NAME:TAG), materialized and verified. ValueError otherwise, listing the
    registry's models (or saying how to import one when it is empty)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    registry = Registry(home)
    ref = str(name_or_path)
    try:
        parse_name(ref)
    except RegistryError:
        if path.is_dir():
            raise ValueError(f"{path} is a directory but not a checkpoint (no config.json)") from None
        raise ValueError(f"{ref!r} is neither a checkpoint directory (with config.json) nor a registry "
                         f"model name; {registry.known_models_hint()}") from None
    try:
        info = registry.show(ref)  # unknown names fail before a lease file is made for them
        if info.adapter_of is not None:
            raise ValueError(f"{info.ref} is a LoRA adapter of {info.adapter_of}, not a full model: serve it with "
                             f"`--model {info.adapter_of} --lora-modules NAME={info.ref}`, or merge it with `qiusuo "
                             f"export merged --adapter {info.ref} --out DIR`")
        return _materialize_leased(registry, ref)
    except UnknownModelError as e:
        if path.is_dir():
            raise ValueError(f"{path} is a directory but not a checkpoint (no config.json), "
                             f"and not a registry name: {e}") from None
        raise


def resolve_adapter(name_or_path: str | os.PathLike, *, home: str | os.PathLike | None = None) -> Path:
    """A LoRA adapter directory for `name_or_path`: a directory with adapter_config.json, else a registry
    adapter (materialized and leased, as `resolve_model` does). ValueError otherwise."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return path
    registry = Registry(home)
    try:
        info = registry.show(str(name_or_path))
    except RegistryError:
        if path.is_dir():
            raise ValueError(f"{path} is a directory but not a LoRA adapter (no adapter_config.json)") from None
        raise ValueError(f"{str(name_or_path)!r} is neither an adapter directory (with adapter_config.json) nor a "
                         f"registry adapter; {registry.known_models_hint()}") from None
    if info.adapter_of is None:
        raise ValueError(f"{info.ref} is a full model, not a LoRA adapter; pass it as --model")
    return _materialize_leased(registry, info.ref)


def adapter_base_of(name_or_path: str | os.PathLike, *, home: str | os.PathLike | None = None) -> str | None:
    """The base a registry adapter names (None for a directory or anything else)."""
    if Path(name_or_path).expanduser().is_dir():
        return None
    try:
        return Registry(home).show(str(name_or_path)).adapter_of
    except RegistryError:
        return None


def _materialize_leased(registry: Registry, ref: str) -> Path:
    """`ref`'s directory, materialized and leased for the life of the process."""
    key = (str(registry.home), ":".join(parse_name(ref)))
    fresh = key not in _leases
    if fresh:
        _leases[key] = registry.lease(ref)  # before materializing: a remove cannot slip in between
    try:
        return registry.materialize(ref)
    except BaseException:
        if fresh:
            _leases.pop(key).release()
        raise


def lease_materialized(path: str | os.PathLike, holder: str) -> Lease | None:
    """A lease on the registry model whose materialized directory `path` is (for processes that
    receive paths, not names: a deployment's replicas, for its model and each --lora-modules
    adapter), else None (a plain checkpoint directory). The name is read off the path, which is
    `<QIUSUO_HOME>/models/<name>@<tag>` ('/'-separated names nest), and checked against the
    registry. While held, `models rm`/`tag`/re-import of the model are refused naming `holder`."""
    path = Path(path).absolute()
    for models in path.parents:
        if models.name != "models":
            continue
        name, at, tag = path.relative_to(models).as_posix().rpartition("@")
        if not at:
            return None
        registry = Registry(models.parent)
        try:
            if not registry.db_path.is_file() or registry.materialized_path(f"{name}:{tag}") != path:
                continue
            registry.show(f"{name}:{tag}")
        except RegistryError:
            continue  # not a registry name: a plain checkpoint directory
        return registry.lease(f"{name}:{tag}", holder=holder)
    return None
