"""Ollama's model names and the model as /api/tags, /api/show and /api/ps describe it.

Names are `NAME[:TAG]` with `latest` by default, so `adder` and `adder:latest` are the same model;
size, digest, family and parameter count come from the registry's entry when it has one. One
model stays loaded for the server's life, so /api/ps never expires it.
"""

from __future__ import annotations

import functools
import hashlib
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from qiusuo.engine.reasoning import think_ids

from .ollama_protocol import OllamaError, ShowRequest
from .protocol import ChatCompletionRequest
from .serving import ServerState

# The Ollama release whose API these routes follow; clients gate features (thinking: >= 0.9) on it.
OLLAMA_API_VERSION = "0.12.0"


def canonical(name: str) -> str:
    """`adder` -> `adder:latest`; a name that is not NAME[:TAG] (a path) stays as it is."""
    from qiusuo.registry.registry import RegistryError, parse_name

    try:
        base, tag = parse_name(name)
    except RegistryError:
        return name
    return f"{base}:{tag}"


def resolve_name(state: ServerState, name: str) -> str:
    """The served model's name (what `start_chat` checks) for an Ollama-style `name`, or a 404. A LoRA
    adapter (`--lora-modules`) is a model of its own, by its name (`tiny:sql`; `sql` is `sql:latest`)."""
    served = state.config.served_model_name
    if name == served or canonical(name) == canonical(served):
        return served
    for adapter in state.lora_names:
        if name == adapter or canonical(name) == canonical(adapter):
            return adapter
    raise OllamaError(404, f"model '{name}' not found; this server serves '{canonical(served)}'")


@functools.lru_cache(maxsize=8)
def _registry_info(ref: str):
    """The registry's entry for `ref` (size, digest, parameters, time), or None when it has none."""
    from qiusuo.registry import Registry
    from qiusuo.registry.registry import RegistryError

    try:
        return Registry().show(ref)
    except (RegistryError, OSError, ValueError):
        return None


def _parameter_size(n: int | None) -> str:
    if not n:
        return ""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def model_entry(state: ServerState) -> dict[str, Any]:
    """The model as /api/tags, /api/ps and /api/show describe it."""
    name = canonical(state.config.served_model_name)
    info = _registry_info(name)
    files = sorted(f.digest for f in info.files) if info is not None else [name]
    digest = hashlib.sha256("\n".join(files).encode()).hexdigest()
    modified = datetime.fromtimestamp(info.created if info is not None else state.started, timezone.utc)
    family = (info.model_type if info is not None else None) or "qiusuo"
    details = {"parent_model": "", "format": "safetensors", "family": family, "families": [family],
               "parameter_size": _parameter_size(info.parameters if info is not None else None),
               "quantization_level": str((info.metadata or {}).get("quantization", "")) if info is not None else ""}
    return {"name": name, "model": name, "modified_at": modified.isoformat().replace("+00:00", "Z"),
            "size": info.size if info is not None else 0, "digest": digest, "details": details,
            "_parameters": info.parameters if info is not None else None,
            "_architecture": (info.architecture if info is not None else None) or family}


def tools_supported() -> bool:
    """The chat route takes `tools` (asked of the route itself, so the capability cannot drift from it)."""
    probe = {"model": "m", "messages": [{"role": "user", "content": "x"}],
             "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}
    try:
        return "tools" not in ChatCompletionRequest.model_validate(probe).unsupported()
    except ValidationError:
        return False


def capabilities(state: ServerState) -> list[str]:
    caps = ["completion"]
    start, end = think_ids(state.tokenizer)
    if start is not None and end is not None:
        caps.append("thinking")
    template = getattr(state.tokenizer, "chat_template", None) or ""
    if "tools" in template and tools_supported():
        caps.append("tools")
    return caps


def _listed(state: ServerState) -> dict[str, Any]:
    return {k: v for k, v in model_entry(state).items() if not k.startswith("_")}


def adapter_entry(state: ServerState, adapter: str, base: dict[str, Any]) -> dict[str, Any]:
    """A LoRA adapter (`--lora-modules`) as /api/tags lists a model made FROM the base with an ADAPTER:
    its own name, the base's details with the base as `parent_model`; size and digest are the registry
    adapter's when it has one by that name, else 0 and a digest of the name."""
    name = canonical(adapter)
    info = _registry_info(name)
    if info is not None and not info.adapter_of:
        info = None  # a full model that happens to share the name is not this adapter
    files = sorted(f.digest for f in info.files) if info is not None else [name]
    modified = datetime.fromtimestamp(info.created if info is not None else state.started, timezone.utc)
    return {"name": name, "model": name, "modified_at": modified.isoformat().replace("+00:00", "Z"),
            "size": info.size if info is not None else 0,
            "digest": hashlib.sha256("\n".join(files).encode()).hexdigest(),
            "details": {**base["details"], "parent_model": base["name"]}}


def tags(state: ServerState) -> dict[str, Any]:
    """GET /api/tags: the served model, then each LoRA adapter served on it."""
    base = _listed(state)
    return {"models": [base, *(adapter_entry(state, a, base) for a in state.lora_names)]}


def show(state: ServerState, req: ShowRequest) -> dict[str, Any]:
    """POST /api/show: the model's details, model_info and capabilities."""
    state.ready()
    served = resolve_name(state, req.model or req.name or "")
    entry = model_entry(state)
    arch = entry["_architecture"]
    info = {"general.architecture": arch, "general.parameter_count": entry["_parameters"],
            f"{arch}.context_length": state.max_model_len}
    modelfile, details, modified = f"FROM {entry['name']}\n", entry["details"], entry["modified_at"]
    if served != state.config.served_model_name:  # an adapter: a Modelfile FROM the base with an ADAPTER
        adapter = adapter_entry(state, served, entry)
        modelfile += f"ADAPTER {adapter['name']}\n"
        details, modified = adapter["details"], adapter["modified_at"]
    return {"modelfile": modelfile, "parameters": "", "license": "",
            "template": getattr(state.tokenizer, "chat_template", None) or "", "details": details,
            "model_info": info, "capabilities": capabilities(state), "modified_at": modified}


def ps(state: ServerState) -> dict[str, Any]:
    """GET /api/ps: the loaded model, then each adapter loaded on it (none while loading)."""
    if state.engine is None:
        return {"models": []}
    base = _listed(state)
    loaded = dict(expires_at="9999-12-31T23:59:59Z", size_vram=0, context_length=state.max_model_len)
    return {"models": [{**m, **loaded} for m in (base, *(adapter_entry(state, a, base) for a in state.lora_names))]}


def version() -> dict[str, str]:
    """GET /api/version: the Ollama API release followed, and qiusuo's own version."""
    from qiusuo import __version__

    return {"version": OLLAMA_API_VERSION, "qiusuo_version": __version__}
