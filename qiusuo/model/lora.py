"""LoRA (Hu et al. 2021, arXiv 2106.09685): a frozen linear layer plus a trainable low-rank update.

    y = x W^T + b + (alpha / r) * B(A(x)),   A (r, in) kaiming-uniform, B (out, r) zeros

so a fresh adapter leaves the model's function unchanged. `LoRALinear` *is* an `nn.Linear` that
adopts the base layer's own weight and bias Parameters (no copy), so every reader of
`q_proj.weight` (checkpoints, quantization, MLA's absorbed decode) still finds the base weight
under its HF name, and the adapter's parameters sit next to it as `q_proj.lora_A.weight` /
`q_proj.lora_B.weight`: PEFT's on-disk names less its `base_model.model.` prefix.

Layout on disk is PEFT's (`adapter_config.json` + `adapter_model.safetensors`), so
`peft.PeftModel.from_pretrained(transformers_model, adapter_dir)` loads what `save_adapter` writes.

Rollouts merge the adapter into the base weights (`merged`) and unmerge it after, rather than run the
adapters inside the engine's forward. Measured once on the Qwen2.5-0.5B shape, r=16 on all 168
linears, 1 thread, load average ~6 on 2 cores: merge+unmerge 10.0 s (median of 3); the adapters in
the forward made each decode step of 16 sequences 3.1% slower (4.36 vs 4.23 s, 10 alternating steps),
so merging wins past ~76 decode steps, and R1-style rollouts run hundreds. Merging is also the only
way code that reads `.weight` directly sees the adapter (MLA's absorbed decode reads
`kv_b_proj.weight`): a live LoRA model must generate inside `merged`. TRL's GRPOTrainer does the
same around its vLLM weight sync (`merge_adapter()` / `unmerge_adapter()`). Each merge/unmerge pair
rounds the fp32 base by at most half an ulp of |W + delta| per element (3% of elements moved by one
ulp in the test), so it needs fp32 (or fp64) base weights.

What gets an adapter (`resolve_targets`): "all-linear" (PEFT's name) means every nn.Linear of the
attention and the dense MLP / shared experts of the decoder layers; not the router, not the routed
experts (stacked Parameters, not linear layers), not the output head, not the MTP layers (they
draft for speculative decoding and stay the base's). Or a comma-separated list of module names
(`q_proj,v_proj`), matched against the last part of each module's name, as PEFT matches.

Dimension letters (qiusuo/model/__init__.py): r the rank; `in`/`out` the layer's features.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel(LoraModel(our module tree)) on disk
ALL_LINEAR = "all-linear"
# The linear layers "all-linear" covers: attention (GQA and MLA) and the SwiGLU MLPs (dense layers
# and shared experts). Everything else (router, output head, MTP's eh_proj) stays frozen.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                   "kv_b_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Linear):
    """A frozen nn.Linear (the base layer's Parameters, adopted) plus scaling * lora_B(lora_A(x))."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        nn.Module.__init__(self)  # not nn.Linear.__init__: that would allocate a second weight
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # Adapters train in fp32 whatever the base's dtype (PEFT's autocast_adapter_dtype default).
        factory = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        self.r, self.lora_alpha, self.scaling = r, alpha, alpha / r
        self.merged = False  # the delta is in self.weight
        self.disabled = False  # the base function alone (the reference policy)
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A kaiming-uniform (nn.Linear's own init), B zeros: the delta starts at 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A: (out, r) @ (r, in) -> (out, in), in fp32."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            # Merged for generation; training through a merged layer would not reach A and B.
            assert not torch.is_grad_enabled() or not self.lora_A.weight.requires_grad, \
                "a merged LoRA layer ran with gradients on; unmerge it before training (lora.merged is a context)"
            return y
        if self.disabled:
            return y
        delta = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scaling  # (..., out)
        return y + delta.to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        _check_mergeable(self.weight)
        self.weight.add_(self.delta_weight().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight.sub_(self.delta_weight().to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}"


def _check_mergeable(w: torch.Tensor) -> None:
    if w.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"merging a LoRA adapter into {w.dtype} weights would round the base at every "
                         "rollout; train LoRA on fp32 base weights (load the model with dtype float32)")


@dataclass
class LoraSpec:
    """What `apply_lora` did: PEFT's LoraConfig fields that matter here."""

    r: int
    lora_alpha: float
    target_modules: list[str]  # the short names that matched (PEFT's target_modules)
    module_names: list[str]  # every adapted module's full name


def resolve_targets(model: nn.Module, targets: str = ALL_LINEAR) -> list[str]:
    """Full names of the nn.Linear modules `targets` names ("all-linear" or "q_proj,v_proj,...")."""
    wanted = DEFAULT_TARGETS if targets.strip() == ALL_LINEAR else tuple(
        t.strip() for t in targets.split(",") if t.strip())
    if not wanted:
        raise ValueError(f"--lora-targets {targets!r} names no module; give {ALL_LINEAR} or module names "
                         "such as q_proj,v_proj")
    candidates = {name: m for name, m in model.named_modules()
                  if isinstance(m, nn.Linear) and name.startswith("model.layers.")}
    found = [name for name in candidates if name.rsplit(".", 1)[-1] in wanted]
    if targets.strip() != ALL_LINEAR:
        present = {name.rsplit(".", 1)[-1] for name in candidates}
        unknown = [t for t in wanted if t not in present]
        if unknown:
            hint = (" (routed experts are stacked parameters, not linear layers: LoRA covers the shared "
                    "experts and attention)") if any("expert" in t for t in unknown) else ""
            raise ValueError(f"--lora-targets: no linear layer named {', '.join(unknown)} in this model{hint}; "
                             f"its decoder layers have {', '.join(sorted(present))} (or use {ALL_LINEAR})")
    if not found:
        raise ValueError(f"--lora-targets {targets!r} matches no linear layer of this model")
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> tuple[nn.Module, str]:
    """Put `new` in the place of `model`'s submodule `name` (dotted); returns (parent, attribute name)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, child, new)
    return parent, child


def apply_lora(model: nn.Module, r: int, alpha: float, targets: str = ALL_LINEAR) -> LoraSpec:
    """Freeze every parameter of `model` and wrap the target linears in `LoRALinear` (in place).
    Returns the spec, also kept as `model.lora_spec`."""
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters; apply_lora once (or load_adapter)")
    if r < 1:
        raise ValueError(f"--lora-rank must be >= 1 to add adapters, got {r}")
    names = resolve_targets(model, targets)
    model.requires_grad_(False)
    for name in names:
        replace_module(model, name, LoRALinear(model.get_submodule(name), r, alpha))
    spec = LoraSpec(r, alpha, sorted({n.rsplit(".", 1)[-1] for n in names}), names)
    model.lora_spec = spec
    return spec


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


@contextlib.contextmanager
def merged(model: nn.Module) -> Iterator[nn.Module]:
    """Adapters merged into the base weights inside the block (rollouts, eval), unmerged after."""
    layers = [m for m in lora_layers(model) if not m.merged]
    for m in layers:
        m.merge()
    try:
        yield model
    finally:
        for m in layers:
            m.unmerge()


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The base model inside the block: every adapter off (GRPO's reference policy, no second copy)."""
    layers = lora_layers(model)
    if any(m.merged for m in layers):
        raise RuntimeError("cannot disable merged adapters; leave lora.merged first")
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(layers, before):
            m.disabled = d


# ---------------------------------------------------------------------- PEFT layout
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's saved names (`base_model.model.<module>.lora_A.weight`)."""
    return {PEFT_PREFIX + name: t.detach().contiguous().clone()
            for name, t in model.state_dict().items() if ".lora_A." in name or ".lora_B." in name}


def peft_config(spec: LoraSpec, base_model_name_or_path: str | None) -> dict:
    """adapter_config.json: PEFT's LoraConfig. target_modules is a regex over the exact module names,
    so PEFT adapts exactly our modules (transformers' DeepseekV3 has per-expert `gate_proj`s that a
    plain name list would also match)."""
    pattern = "|".join(re.escape(n) for n in spec.module_names)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": spec.r, "lora_alpha": spec.lora_alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": f"^({pattern})$", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }


def save_adapter(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write `model`'s adapter in PEFT's layout: adapter_config.json + adapter_model.safetensors."""
    from safetensors.torch import save_file

    spec = getattr(model, "lora_spec", None)
    if spec is None:
        raise ValueError("the model has no LoRA adapter to save (train with --lora-rank > 0)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), path / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (path / ADAPTER_CONFIG).write_text(json.dumps(peft_config(spec, base_model_name_or_path), indent=2) + "\n")
    return path


def read_adapter_config(path: str | os.PathLike) -> dict:
    f = Path(path) / ADAPTER_CONFIG
    if not f.is_file():
        raise FileNotFoundError(f"{path} has no {ADAPTER_CONFIG}; it is not a LoRA adapter directory")
    cfg = json.loads(f.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{f}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False), ("use_rslora", False), ("bias", "none")):
        if cfg.get(key, ok) != ok:
            raise ValueError(f"{f}: {key}={cfg[key]!r} is not supported (qiusuo loads plain LoRA: {key}={ok!r})")
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save"):
        if cfg.get(key):
            raise ValueError(f"{f}: {key}={cfg[key]!r} is not supported (one rank and alpha for every adapted "
                             "layer, no fully trained modules)")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if type(r) is not int or r < 1 or type(alpha) not in (int, float) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{f}: r must be a positive integer and lora_alpha a positive number "
                         f"(got r={r!r}, lora_alpha={alpha!r})")
    return cfg


def adapter_base(path: str | os.PathLike) -> str:
    """The base an adapter names (adapter_config.json's base_model_name_or_path), for commands whose
    --model defaults to it; ValueError when it names none."""
    base = read_adapter_config(path).get("base_model_name_or_path")
    if not isinstance(base, str) or not base.strip():
        raise ValueError(f"{path}/{ADAPTER_CONFIG} names no base model (base_model_name_or_path); give the base "
                         "with --model")
    return base


def read_adapter(model: nn.Module, path: str | os.PathLike) -> tuple[dict, list[str], dict[str, torch.Tensor]]:
    """(adapter_config, adapted module names, tensors under PEFT's names) of the adapter at `path`, checked
    against `model` before anything changes: exactly one lora_A/lora_B pair per module, every module a
    linear layer of `model`, every tensor the shape that layer needs at rank r."""
    from .checkpoint import mmap_safetensors

    cfg = read_adapter_config(path)
    weights = Path(path) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{path} has no {ADAPTER_WEIGHTS}; it is not a LoRA adapter directory")
    tensors = mmap_safetensors(weights)
    names = sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in tensors if k.startswith(PEFT_PREFIX)})
    expected = {f"{PEFT_PREFIX}{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    if not names or set(tensors) != expected:
        raise ValueError(f"{path}/{ADAPTER_WEIGHTS}: expected exactly {PEFT_PREFIX}<module>.lora_A.weight and "
                         ".lora_B.weight pairs")
    r = cfg["r"]
    if any(tensors[f"{PEFT_PREFIX}{n}.lora_A.weight"].shape[0] != r for n in names):
        raise ValueError(f"{path}: lora_A tensors do not have r={r} rows as adapter_config.json says")
    known = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [n for n in names if n not in known]
    modules = dict(model.named_modules())
    other = [f"{n} is a {type(modules[n]).__name__}" for n in missing if n in modules]
    if other:
        raise ValueError(f"{path}: {other[0]}, not a plain linear layer (quantized weights?); apply LoRA adapters to "
                         "float weights, or merge the adapter and quantize the merged model")
    if missing:
        raise ValueError(f"{path}: the adapter names modules this model lacks: {', '.join(missing[:5])}")
    for n in names:
        want = {"lora_A": (r, known[n].in_features), "lora_B": (known[n].out_features, r)}
        for ab, shape in want.items():
            t = tensors[f"{PEFT_PREFIX}{n}.{ab}.weight"]
            if tuple(t.shape) != shape:
                raise ValueError(f"{path}: {PEFT_PREFIX}{n}.{ab}.weight is {tuple(t.shape)}, the model needs {shape} "
                                 f"(r={r} in adapter_config.json)")
    return cfg, names, tensors


def load_adapter(model: nn.Module, path: str | os.PathLike) -> LoraSpec:
    """Add the adapter saved at `path` (PEFT layout) to `model`: adapters are created where they are
    missing, then every adapter tensor is loaded; missing, unexpected or mis-shaped keys raise."""
    cfg, names, tensors = read_adapter(model, path)
    spec = getattr(model, "lora_spec", None)
    if spec is None:
        targets = ",".join(sorted({n.rsplit(".", 1)[-1] for n in names}))
        if sorted(resolve_targets(model, targets)) != names:  # the short names cover more layers than saved
            raise ValueError(f"{path}: the adapter covers only some layers of its target modules; not supported")
        spec = apply_lora(model, cfg["r"], float(cfg["lora_alpha"]), targets)
    elif sorted(spec.module_names) != names or spec.r != cfg["r"] or spec.lora_alpha != cfg["lora_alpha"]:
        raise ValueError(f"{path}: the adapter (r={cfg['r']}, alpha={cfg['lora_alpha']}, {len(names)} modules) does "
                         f"not match the model's (r={spec.r}, alpha={spec.lora_alpha}, {len(spec.module_names)} "
                         "modules)")
    own = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    for key, t in tensors.items():
        if own[key[len(PEFT_PREFIX):]].shape != t.shape:
            raise ValueError(f"{path}: tensor {key} {tuple(t.shape)} does not fit the model")
    with torch.no_grad():
        for key, t in tensors.items():
            own[key[len(PEFT_PREFIX):]].copy_(t)
    return spec


def _merge_into_plain_linears(model: nn.Module) -> list[tuple[nn.Module, str, "LoRALinear"]]:
    """Fold every adapter into its base weight and put a plain nn.Linear sharing that weight in the
    LoRA layer's place; returns (parent, name, LoRA layer) of each swap, to undo it."""
    swapped = []
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            m.merge()
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            plain.weight, plain.bias = m.weight, m.bias
            swapped.append((*replace_module(model, name, plain), m))
    return swapped


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear layers back (in place): the
    model is then an ordinary one, saved by `save_model` as a full checkpoint (PEFT's name)."""
    _merge_into_plain_linears(model)
    if hasattr(model, "lora_spec"):
        del model.lora_spec
    return model


@contextlib.contextmanager
def unloaded(model: nn.Module) -> Iterator[nn.Module]:
    """The model with adapters merged and plain nn.Linear layers inside the block (for `save_model`),
    the LoRA layers (unmerged) back after. The base weights round-trip as in `merged`."""
    swapped = _merge_into_plain_linears(model)
    try:
        yield model
    finally:
        for parent, child, m in swapped:
            setattr(parent, child, m)
            m.unmerge()


def merge_adapter(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """One call from a base checkpoint and a PEFT adapter to a merged full checkpoint directory."""
    from .checkpoint import load_model, read_metadata, save_model

    model, tokenizer = load_model(base_dir)
    load_adapter(model, adapter_dir)
    merge_and_unload(model)
    meta = {**read_metadata(base_dir), "parent": str(base_dir), "merged_adapter": str(adapter_dir)}
    return save_model(model, tokenizer, out_dir, metadata=meta)


# ---------------------------------------------------------------------- many adapters on one base (serving)
class MultiLoRALinear(nn.Linear):
    """A frozen nn.Linear (the base's Parameters, adopted, as in LoRALinear) plus any number of adapters,
    each row of a batch taking its own (or none): y = x W^T + b + s_a * B_a(A_a(x)) for row b's adapter a.

    Which rows use which adapter is `self.batch` (a `LoRABatch` shared by every layer of the model,
    set by the engine before each forward); the rows of one adapter go through its two small matmuls
    together (gathered, then added back with index_add_), so a step that mixes the base and k adapters
    costs the base forward plus one low-rank product per adapter present, and nothing is merged
    (vLLM's punica kernels do the same grouping, in one kernel). Measured (bench/lora_serving.py,
    SmolLM2-135M's shape, r=16 all-linear, 24 requests a third each on the base and two adapters, 1
    thread, 2 shared cores), two runs: 6.80 / 7.03 CPU s against 5.72 / 6.39 for the base alone (+19% at
    load ~7, +10% at load ~5), and 9.71 / 9.49 for the three served as separate merged models in turn."""

    def __init__(self, base: nn.Linear, batch: "LoRABatch"):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.batch = batch
        self.adapters: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}  # id -> (A (r, in), B (out, r), s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        groups = [(self.adapters[a], rows) for a, rows in self.batch.groups if a in self.adapters]
        if not groups:
            return y
        B = self.batch.num_rows
        assert x.shape[0] == B or x.dim() == 2 and x.shape[0] % B == 0, (tuple(x.shape), B)
        xs = x.reshape(B, -1, self.in_features)  # (B, T, in): rows first, as every caller lays them out
        ys = y.view(B, -1, self.out_features)  # (B, T, out), a view: index_add_ writes into y
        for (A, Bw, s), rows in groups:
            xa = xs.index_select(0, rows).to(A.dtype)  # (b, T, in)
            ys.index_add_(0, rows, (F.linear(F.linear(xa, A), Bw) * s).to(y.dtype))  # (b, T, out)
        return y


class LoRABatch:
    """The adapter of every row of the next forward: `groups` is [(adapter id, row indices)] for the
    adapters present (id 0, the base, is left out); `num_rows` the batch size B."""

    def __init__(self):
        self.groups: list[tuple[int, torch.Tensor]] = []
        self.num_rows = 0

    def set(self, adapter_ids: list[int], device: torch.device) -> None:
        rows: dict[int, list[int]] = {}
        for b, a in enumerate(adapter_ids):
            if a:
                rows.setdefault(a, []).append(b)
        self.groups = [(a, torch.tensor(r, device=device)) for a, r in rows.items()]
        self.num_rows = len(adapter_ids)


class ServingAdapters:
    """The adapters an engine serves on one base model: loaded once, each under a name and an id
    (1, 2, ...; 0 is the base), applied per row through `MultiLoRALinear` layers put in the target
    linears' places on first use. Adapters may differ in rank, alpha and targets."""

    def __init__(self, model: nn.Module):
        if has_lora(model):
            raise ValueError("this model carries a training LoRA adapter; serve adapters on a plain base (save the "
                             "adapter, then load the base checkpoint)")
        self.model = model
        self.batch = LoRABatch()
        self.ids: dict[str, int] = {}
        self.paths: dict[str, str] = {}

    def add(self, name: str, path: str | os.PathLike) -> int:
        """Load the adapter at `path` as `name`; returns its id. ValueError when it does not fit the model."""
        if not isinstance(name, str) or not name or not name.isprintable() or any(c.isspace() for c in name):
            raise ValueError(f"LoRA module name {name!r}: give a non-empty printable name without spaces")
        if name in self.ids:
            raise ValueError(f"a LoRA module named {name!r} is already loaded; give each adapter its own name")
        cfg, names, tensors = read_adapter(self.model, path)
        mla = [n for n in names if n.endswith("kv_b_proj")]
        if mla:
            raise ValueError(f"{path}: adapts {mla[0]}, which MLA's absorbed decode reads as a weight matrix, so a "
                             "per-request adapter cannot reach it; merge this adapter into a checkpoint (qiusuo export "
                             "merged) and serve that")
        for n in names:  # every layer checked before any is wrapped: a refusal leaves the model as it was
            m = self.model.get_submodule(n)
            if not isinstance(m, MultiLoRALinear) and type(m) is not nn.Linear:
                raise ValueError(f"{n} is a {type(m).__name__}, not a plain linear layer (quantized weights?); serve "
                                 "LoRA adapters on float weights, or merge the adapter first")
        aid = len(self.ids) + 1
        scaling = float(cfg["lora_alpha"]) / cfg["r"]
        ref = next(self.model.parameters())
        for n in names:
            layer = self._layer(n)
            A = tensors[f"{PEFT_PREFIX}{n}.lora_A.weight"].to(ref.device, torch.float32).clone()
            Bw = tensors[f"{PEFT_PREFIX}{n}.lora_B.weight"].to(ref.device, torch.float32).clone()
            layer.adapters[aid] = (A, Bw, scaling)
        self.ids[name], self.paths[name] = aid, str(path)
        return aid

    def _layer(self, name: str) -> MultiLoRALinear:
        m = self.model.get_submodule(name)
        if isinstance(m, MultiLoRALinear):
            return m
        layer = MultiLoRALinear(m, self.batch)
        replace_module(self.model, name, layer)
        return layer

    def id_of(self, name: str) -> int:
        if name not in self.ids:
            known = ", ".join(sorted(self.ids)) or "none"
            raise ValueError(f"no LoRA adapter named {name!r} is loaded (loaded: {known})")
        return self.ids[name]

    def prepare(self, adapter_ids: list[int]) -> None:
        """Set which adapter each row of the next forward uses (0: the base)."""
        self.batch.set(adapter_ids, next(self.model.parameters()).device)

__all__ = ["LoRALinear", "LoraSpec", "apply_lora", "resolve_targets", "lora_layers", "has_lora", "merged",
           "disabled", "adapter_state_dict", "save_adapter", "load_adapter", "merge_and_unload", "unloaded",
           "merge_adapter", "read_adapter_config", "adapter_base", "read_adapter", "MultiLoRALinear", "LoRABatch",
           "ServingAdapters", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ALL_LINEAR"]
