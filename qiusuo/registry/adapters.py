"""LoRA adapters in the registry: a small model that names its base (Ollama's Modelfile `ADAPTER`).

An adapter entry's blobs are the adapter's own two files (PEFT's `adapter_config.json` and
`adapter_model.safetensors`, a few MB), never the base's; its metadata records the base as a registry
reference (`adapter_of`), checked at import: the base must be a model of this registry, a full model
(not another adapter), and every adapter tensor must fit the base's weight of that name (read from the
safetensors headers, no torch). The base named in adapter_config.json is text from the outside: it is
used only as a registry name, never opened as a path, so `"base_model_name_or_path": "/etc"` or
`"../../x"` is refused with the fix (`--base NAME`). A base that adapters name cannot be removed
before them.

Read without torch, like the rest of the registry.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .checkpoint_info import safetensors_header

ADAPTER_CONFIG = "adapter_config.json"  # qiusuo.model.lora's names (PEFT's)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
ADAPTER_TYPE = "lora"  # the model_type column of an adapter entry


def is_adapter_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def read_adapter_files(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter_config.json, the weights' safetensors header) of an adapter directory, checked:
    plain LoRA, r and lora_alpha positive numbers, tensors exactly lora_A / lora_B pairs with r rows / columns."""
    from .registry import RegistryError

    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        f = path / name
        if not f.is_file() or f.is_symlink():
            raise RegistryError(f"{path} has no regular file {name}; an adapter directory holds {ADAPTER_CONFIG} "
                                f"and {ADAPTER_WEIGHTS} (PEFT's layout)")
    try:
        cfg = json.loads((path / ADAPTER_CONFIG).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RegistryError(f"{path / ADAPTER_CONFIG} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise RegistryError(f"{path / ADAPTER_CONFIG}: not a LoRA adapter config (peft_type must be LORA)")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if type(r) is not int or r < 1 or type(alpha) not in (int, float) or not math.isfinite(alpha) or alpha <= 0:
        raise RegistryError(f"{path / ADAPTER_CONFIG}: r must be a positive integer and lora_alpha a positive number "
                            f"(got r={r!r}, lora_alpha={alpha!r})")
    header = {k: v for k, v in safetensors_header(path / ADAPTER_WEIGHTS).items() if k != "__metadata__"}
    modules = {k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in header if k.startswith(PEFT_PREFIX)}
    expected = {f"{PEFT_PREFIX}{m}.lora_{ab}.weight" for m in modules for ab in "AB"}
    if not modules or set(header) != expected:
        raise RegistryError(f"{path / ADAPTER_WEIGHTS}: expected exactly {PEFT_PREFIX}<module>.lora_A.weight and "
                            ".lora_B.weight pairs")
    for m in modules:
        a, b = (header[f"{PEFT_PREFIX}{m}.lora_{ab}.weight"]["shape"] for ab in "AB")
        if len(a) != 2 or len(b) != 2 or a[0] != r or b[1] != r:
            raise RegistryError(f"{path / ADAPTER_WEIGHTS}: {m}'s lora_A {a} / lora_B {b} are not rank r={r}")
    return cfg, header


def check_fits_base(header: dict[str, Any], base_headers: list[dict[str, Any]], base_ref: str) -> None:
    """Every adapted module is a weight matrix of the base with the shape the adapter expects."""
    from .registry import RegistryError

    weights = {k: v["shape"] for h in base_headers for k, v in h.items() if k != "__metadata__"}
    for key, entry in header.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
        out_features = header[f"{PEFT_PREFIX}{module}.lora_B.weight"]["shape"][0]
        shape = weights.get(f"{module}.weight")
        if shape is None:
            raise RegistryError(f"the adapter adapts {module}, which base {base_ref} does not have; is it the "
                                "adapter of another model?")
        if list(shape) != [out_features, entry["shape"][1]]:
            raise RegistryError(f"the adapter's {module} is {out_features}x{entry['shape'][1]}, base {base_ref}'s "
                                f"weight is {'x'.join(map(str, shape))}; is it the adapter of another model?")


def adapter_info(registry, path: Path, base: str | None) -> tuple[dict[str, Any], list[tuple[str, Path]]]:
    """The registry row fields (as `inspect_checkpoint` returns them) and the files of an adapter directory."""
    from .registry import RegistryError, UnknownModelError, parse_name

    cfg, header = read_adapter_files(path)
    named = cfg.get("base_model_name_or_path")
    ref = base if base is not None else named
    if not isinstance(ref, str) or not ref:
        raise RegistryError(f"{path / ADAPTER_CONFIG} names no base model; give the registry model it adapts "
                            "with --base NAME[:TAG]")
    try:
        base_info = registry.show(ref)
    except (UnknownModelError, RegistryError) as e:
        how = "--base" if base is not None else f"{ADAPTER_CONFIG}'s base_model_name_or_path"
        raise RegistryError(f"the adapter's base {ref!r} ({how}) is not a model in this registry ({e}); import the "
                            "base first (`qiusuo models import BASE_DIR --name NAME`) and pass --base NAME") from None
    if base_info.model_type == ADAPTER_TYPE:
        raise RegistryError(f"{base_info.ref} is itself an adapter; an adapter's base must be a full model")
    check_fits_base(header, [safetensors_header(registry.blobs.path(f.digest)) for f in base_info.files
                             if f.path.endswith(".safetensors")], base_info.ref)
    parse_name(base_info.ref)
    info = {
        "architecture": f"LoRA r={cfg['r']} on {base_info.architecture or base_info.model_type or '?'}",
        "model_type": ADAPTER_TYPE,
        "parameters": sum(math.prod(v["shape"]) for v in header.values()),
        "source_run": None, "eval_score": None,
        "metadata": {"adapter_of": base_info.ref, "lora": {"r": cfg["r"], "lora_alpha": cfg["lora_alpha"]}},
    }
    return info, [(ADAPTER_CONFIG, path / ADAPTER_CONFIG), (ADAPTER_WEIGHTS, path / ADAPTER_WEIGHTS)]
