"""Config dataclass fields: their help text, their command-line name, and the one check of enumerations.

Every config dataclass (`EngineConfig`, `ServerConfig`, `DeployConfig`, the training configs)
declares its fields with `option(default, help)`, and the CLI builds each command's flags from
them (qiusuo/cli/flags.py), so a default and its help text are written once.

An enumerated field is annotated `Literal[...]`, possibly in a union with `None` or `bool`
(`quantization: Literal["int8", "int4"] | None`). `check_choices(self)`, called by each class's
`__post_init__`, refuses any other value with one ValueError that names the field, its flag and
the allowed values, so `EngineConfig(dtype="fp16")`, `LLM(path, dtype="fp16")` and
`qiusuo generate --dtype fp16` all fail with the same line. Light on purpose: no torch, no qiusuo.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Literal

MISSING = dataclasses.MISSING


def option(default: Any = MISSING, help: str = "", *, flag: str | None = None, **metadata: Any) -> Any:
    """A dataclass field with the help text the CLI shows; `flag` when its flag is not --field-name
    (kept so that renaming a field never renames a flag users type)."""
    meta = {"help": help, **metadata, **({"flag": flag} if flag else {})}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """The evaluated annotations of a dataclass (its module uses `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def union_args(hint: Any) -> tuple[Any, ...]:
    """The members of `A | B` / Optional[A]; (hint,) for anything else."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def choices(cls: type, name: str) -> tuple[Any, ...] | None:
    """The allowed values of an enumerated field (Literal values, then None / True / False when the
    annotation admits them), or None when the field is not an enumeration."""
    members = union_args(type_hints(cls)[name])
    literals = [v for m in members if typing.get_origin(m) is Literal for v in typing.get_args(m)]
    if not literals:
        return None
    extra = (None,) * (type(None) in members) + (True, False) * (bool in members)
    return tuple(literals) + extra


def _is_one_of(value: Any, allowed: tuple[Any, ...]) -> bool:
    # by type too: 1 == True and 0 == False, but compile=1 or dtype=0 is a mistake
    return any(value is a or (type(value) is type(a) and value == a) for a in allowed)


def check_choices(obj: Any) -> None:
    """Raise ValueError for the first enumerated field of the dataclass `obj` whose value is not allowed."""
    for f in dataclasses.fields(obj):
        allowed = choices(type(obj), f.name)
        value = getattr(obj, f.name)
        if allowed is not None and not _is_one_of(value, allowed):
            flags = flag_of(f) + (f", {flag_of(f)}-mode" if any(a is True for a in allowed) else "")  # --compile-mode
            raise ValueError(f"{f.name}={value!r} is not allowed: use one of {', '.join(map(repr, allowed))} "
                             f"({flags} on the command line)")
