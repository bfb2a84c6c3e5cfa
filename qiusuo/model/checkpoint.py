"""Checkpoints in the HF layout, both ways: `save_model` writes what transformers loads,
`load_model` reads what transformers writes (Qwen2, Llama, DeepseekV3).

Directory: config.json, model.safetensors (or shards + model.safetensors.index.json),
tokenizer.json, tokenizer_config.json, generation_config.json, and qiusuo.json (stage,
parent, metrics summary). No pickle: safetensors and JSON only.

Two name mappings are needed; everything else is already HF's name in `Transformer`:
- routed experts: stacked `mlp.experts.gate_up_proj (E, 2I, D)` / `down_proj (E, D, I)` in
  memory, per expert `mlp.experts.{e}.{gate,up,down}_proj.weight` on disk (both 4.x and 5.x load it);
- MTP depth k: `mtp.{k}.*` in memory, `model.layers.{num_hidden_layers + k}.*` on disk, plus the
  copies of the embedding and output head DeepSeek's layout stores there (ignored on load).

Saving is atomic: everything is written to a temporary sibling directory which is then renamed
into place, so a crash never leaves a half-written directory that looks complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from qiusuo.runtime import malloc_trim

from .config import ModelConfig
from .transformer import Transformer

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_IGNORED_ON_LOAD = re.compile(r"rotary_emb\.inv_freq$")


# ---------------------------------------------------------------------- state-dict mapping
def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name.startswith("mtp."):
            k, rest = name[4:].split(".", 1)
            name = f"model.layers.{cfg.num_hidden_layers + int(k)}.{rest}"
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.rsplit(".", 1)[0]
            for e, w in enumerate(t):
                gate, up = w.chunk(2, dim=0)  # (I, D) each
                out[f"{prefix}.{e}.gate_proj.weight"] = gate
                out[f"{prefix}.{e}.up_proj.weight"] = up
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.rsplit(".", 1)[0]
            for e, w in enumerate(t):
                out[f"{prefix}.{e}.down_proj.weight"] = w
        else:
            out[name] = t
    for k in range(len(model.mtp)):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}"
        out[f"{prefix}.embed_tokens.weight"] = model.model.embed_tokens.weight.detach()
        out[f"{prefix}.shared_head.head.weight"] = model.output_weight.detach()
    # safetensors refuses shared storage: give every tensor its own contiguous copy.
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


ExpertParts = dict[str, tuple[list[list[torch.Tensor]], list[torch.Tensor]]]


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig,
                       expert_parts: ExpertParts | None = None) -> dict[str, torch.Tensor]:
    """HF tensor names -> ours; each layer's routed experts stacked into `gate_up_proj` (E, 2I, D) and
    `down_proj` (E, D, I). With `expert_parts` (a dict to fill), the experts are not stacked (stacking
    copies them all in float): their stacked entries are meta tensors of the right shape, and
    `expert_parts[prefix]` holds each expert's [gate, up] and down tensors as they were given (for
    loading straight into quantized experts)."""
    L = cfg.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, t in hf.items():
        if _IGNORED_ON_LOAD.search(name):
            continue
        m = _LAYER.match(name)
        if m and int(m.group(1)) >= L:  # an MTP depth
            k, rest = int(m.group(1)) - L, m.group(2)
            if rest in ("embed_tokens.weight", "shared_head.head.weight"):
                continue  # copies of the main embedding / head
            name = f"mtp.{k}.{rest}"
        m = _EXPERT.match(name) or _EXPERT.match(name.replace("mtp.", "model.layers.", 1))
        if m:
            prefix = name.rsplit(".", 3)[0]
            experts.setdefault(prefix, {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # some writers keep the tied head; it is the embedding
        out[name] = t
    for prefix, by_index in experts.items():
        E = cfg.n_routed_experts or 0
        missing = [f"{prefix}.{e}.{p}.weight" for e in range(E) for p in ("gate_proj", "up_proj", "down_proj")
                   if p not in by_index.get(e, {})]
        extra = [f"{prefix}.{e}.*" for e in by_index if not 0 <= e < E]
        if missing or extra:
            raise ValueError(_key_error(missing, extra))
        if expert_parts is not None:
            gate, down = by_index[0]["gate_proj"], by_index[0]["down_proj"]
            out[f"{prefix}.gate_up_proj"] = torch.empty((E, 2 * gate.shape[0], gate.shape[1]), dtype=gate.dtype,
                                                        device="meta")
            out[f"{prefix}.down_proj"] = torch.empty((E, *down.shape), dtype=down.dtype, device="meta")
            expert_parts[prefix] = ([[by_index[e]["gate_proj"], by_index[e]["up_proj"]] for e in range(E)],
                                    [by_index[e]["down_proj"] for e in range(E)])
            continue
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat((by_index[e]["gate_proj"], by_index[e]["up_proj"])) for e in range(E)]
        )
        out[f"{prefix}.down_proj"] = torch.stack([by_index[e]["down_proj"] for e in range(E)])
    return out


def _key_error(missing, unexpected) -> str:
    def show(keys):
        keys = sorted(keys)
        return ", ".join(keys[:20]) + (f" ... ({len(keys)} in all)" if len(keys) > 20 else "")

    parts = []
    if missing:
        parts.append(f"missing weights: {show(missing)}")
    if unexpected:
        parts.append(f"unexpected weights: {show(unexpected)}")
    return "checkpoint does not match its config.json; " + "; ".join(parts)


# ---------------------------------------------------------------------- save
def save_model(
    model: Transformer,
    tokenizer: Any,
    path: str | os.PathLike,
    *,
    metadata: dict[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write `model` (and `tokenizer`, if given) as an HF checkpoint directory, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        cfg = model.config
        config = cfg.to_hf_dict()
        config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
        from .quantize import is_quantized, quantized_state_dict

        if is_quantized(model):  # low-bit tensors as they are in memory (docs/quantized-checkpoints.md)
            config["quantization_config"] = model.quantization_config
            state = quantized_state_dict(model)
        else:
            state = to_hf_state_dict(model)
        _write_json(tmp / "config.json", config)
        _write_weights(state, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp)
        generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                      "pad_token_id": cfg.pad_token_id}
        _write_json(tmp / "generation_config.json", {k: v for k, v in generation.items() if v is not None})
        from qiusuo import __version__

        _write_json(tmp / "qiusuo.json", {"qiusuo_version": __version__, **(metadata or {})})
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _write_weights(state: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], directory / WEIGHTS_NAME, metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / fname, metadata=meta)
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_json(directory / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move tmp to path; an existing checkpoint at path is replaced only once tmp is complete."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


# ---------------------------------------------------------------------- load
def index_shard_files(path: Path) -> list[str]:
    """The shard files named by `path`'s model.safetensors.index.json, each checked to stay inside
    `path`: the index is untrusted input, and an absolute path, a `..` or a symlink leading out
    would make loading read any file the process can (ValueError naming the entry)."""
    try:
        weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path / INDEX_NAME} is not a valid index (needs a weight_map object): {e}") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{path / INDEX_NAME}: weight_map must be an object of tensor name -> shard file")
    root = path.resolve()
    files = sorted(set(weight_map.values()) if all(isinstance(v, str) for v in weight_map.values()) else [None])
    for fname in files:
        rel = Path(fname) if isinstance(fname, str) else None
        if rel is None or not fname or rel.is_absolute() or ".." in rel.parts or "\\" in fname \
                or not (path / rel).resolve().is_relative_to(root):
            raise ValueError(f"{path / INDEX_NAME}: weight_map entry {fname!r} is not a file inside the checkpoint "
                             "directory (absolute paths, '..' and links leading out are refused)")
    return files


def read_safetensors(path: str | os.PathLike, maps: list | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single file or sharded); clear errors when corrupt.
    `maps`, if given, receives each file's memory map (`FileMap`)."""
    path = Path(path)
    index = path / INDEX_NAME
    if index.exists():
        files = index_shard_files(path)
    elif (path / WEIGHTS_NAME).exists():
        files = [WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f"{path} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    tensors: dict[str, torch.Tensor] = {}
    for fname in files:
        fpath = path / fname
        if not fpath.exists():
            raise FileNotFoundError(f"{fpath} is listed in {INDEX_NAME} but does not exist")
        try:
            tensors.update(mmap_safetensors(fpath, maps))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"{fpath} is truncated or corrupt ({e}); re-save or re-download the checkpoint") from None
    return tensors


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class FileMap:
    """A checkpoint file's private memory map, and `release` to drop the pages of a tensor viewing it.

    Pages of a file map that were only read are the page cache's, counted in the process's RSS
    while mapped; `madvise(MADV_DONTNEED)` unmaps them (a later read maps them again from the file,
    whose bytes never change: the map is private). `load_model(path, quantization=...)` releases
    each float matrix once it is quantized, so the float weights are never resident whole."""

    def __init__(self, mm):
        self.mm = mm
        self.base = torch.frombuffer(mm, dtype=torch.uint8).data_ptr() if len(mm) else 0

    def release(self, t: torch.Tensor) -> bool:
        """Drop the whole pages under t if t views this map (not its first and last partial page,
        which other tensors may share). False if t is not in this map (e.g. a copy)."""
        import mmap

        start = t.data_ptr() - self.base
        end = start + t.numel() * t.element_size()
        if not t.is_contiguous() or start < 0 or end > len(self.mm) or not hasattr(self.mm, "madvise"):
            return False
        page = mmap.PAGESIZE
        lo, hi = -(-start // page) * page, end // page * page
        if hi > lo:
            self.mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        return True


def release_pages(maps: list[FileMap], trim_every: int = 4 << 20) -> Callable[[torch.Tensor], None]:
    """A `release` for quantize_model: drops t's pages from whichever of `maps` it views (else nothing:
    a copy is freed when its last reference goes).

    Every `trim_every` bytes released it also asks glibc to hand its freed heap back (malloc_trim):
    after the first large free glibc serves chunk-sized transients from its heap and keeps the holes
    they leave between the quantized tensors, ~+25% of the weights at the SmolLM2-135M shape (peak
    RSS growth 172 MB for 129 MB of int8 weights without, measured; tests/test_quantize.py)."""
    trim = malloc_trim()
    released = 0

    def release(t: torch.Tensor) -> None:
        nonlocal released
        if any(m.release(t) for m in maps):
            released += t.numel() * t.element_size()
            if trim is not None and released >= trim_every:
                trim(0)
                released = 0
    return release


def mmap_safetensors(fpath: Path, maps: list | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one .safetensors file as views of a private memory map of it: no copy is read
    into memory, pages come from the page cache as they are touched, and a tensor written in place
    gets private copies of its pages (the file never changes). Loading then holds the weights once
    (issue 15: safe_open's get_tensor copies every tensor, and the model's own storage was a second
    copy). The header is checked against the file (offsets in bounds, sizes matching shapes)."""
    import mmap

    with open(fpath, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ValueError("shorter than a safetensors header")
        n = int.from_bytes(f.read(8), "little")
        if n > min(size - 8, 100 << 20):
            raise ValueError(f"header length {n} exceeds the file")
        header = json.loads(f.read(n))
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else b""
    if maps is not None and len(mm):
        maps.append(FileMap(mm))
    base = 8 + n
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(f"tensor {name}: dtype {info.get('dtype')!r} is not supported")
        shape, (begin, end) = [int(d) for d in info["shape"]], info["data_offsets"]
        count = 1
        for d in shape:
            count *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= size - base or end - begin != count * itemsize:
            raise ValueError(f"tensor {name}: data_offsets {begin}..{end} do not fit the file or its shape {shape}")
        if count == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        elif (base + begin) % itemsize:
            # Misaligned (not a safetensors writer's output): copy this one tensor.
            out[name] = torch.frombuffer(bytearray(mm[base + begin:base + end]), dtype=dtype).view(shape)
        else:
            out[name] = torch.frombuffer(mm, dtype=dtype, count=count, offset=base + begin).view(shape)
    return out


def load_model(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = "float32",
    quantization: str | None = None,
    int4_group_size: int = 32,
) -> tuple[Transformer, Any]:
    """Load an HF checkpoint directory -> (model in eval mode, tokenizer or None).

    dtype: the compute dtype (default float32; None keeps the checkpoint's torch_dtype).
    quantization: None, or a `qiusuo.model.quantize` mode to quantize a float checkpoint into as it
    loads, one matrix at a time (peak RSS ~ the quantized weights, not the float ones); a quantized
    checkpoint of that mode loads as it is, of another mode is refused.
    Loading is strict: missing, unexpected or mis-shaped weights raise a ValueError naming them.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
    cfg = ModelConfig.from_json(path / "config.json")
    if dtype is None:
        dtype = cfg.torch_dtype
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}: use one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    qc = json.loads((path / "config.json").read_text()).get("quantization_config")
    if qc is not None:
        model = _load_quantized(path, cfg, qc, torch.device(device), dtype)
        if quantization:
            from .quantize import quantize_model

            quantize_model(model, quantization, int4_group_size)  # the same mode: nothing; another: ValueError
    elif quantization:
        model = _load_float_quantized(path, cfg, torch.device(device), dtype, quantization, int4_group_size)
    else:
        model = _load_float(path, cfg, torch.device(device), dtype)
    tokenizer = None
    if (path / "tokenizer.json").exists():
        from qiusuo.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(path)
    return model, tokenizer


def _load_quantized(path: Path, cfg: ModelConfig, qc: Any, device: torch.device, dtype: torch.dtype) -> Transformer:
    """A checkpoint `save_model` wrote from a quantized model: the low-bit tensors are assigned as
    they are (memory-mapped, never re-quantized), into the structure `quantize_model` builds on the
    meta device. Its float parts (norms, biases, scales) are float32, as quantizing writes them."""
    from .quantize import check_quantization_config, load_quantized_state, quantize_model

    mode, group_size = check_quantization_config(qc)
    if dtype != torch.float32:
        raise ValueError(f"dtype={dtype}: a quantized checkpoint loads as written (low-bit weights, float32 norms "
                         "and scales); use dtype='float32' (or 'auto')")
    if device.type != "cpu":
        raise ValueError(f"a quantized checkpoint loads on the CPU only (its kernels are CPU kernels), not {device}")
    with torch.device("meta"):
        model = Transformer(cfg)
        quantize_model(model, mode, group_size)
    maps: list[FileMap] = []
    state = read_safetensors(path, maps)
    load_quantized_state(model, state, source=str(path), release=release_pages(maps))
    del state
    _materialize_buffers(model, device)
    return model.eval()


def _materialize_buffers(model: Transformer, device: torch.device) -> None:
    for module in model.modules():  # non-persistent buffers (RoPE table, expert loads) are still on meta
        for bname, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[bname] = torch.empty_like(buf, device=device)
    model.init_buffers()


def _load_float_quantized(path: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, mode: str,
                          group_size: int) -> Transformer:
    """A float checkpoint quantized while it loads: the file's tensors are assigned as they are
    (memory-mapped views, any float dtype), each matrix is quantized in row chunks and its pages
    released as soon as they are read (`FileMap.release`), then the float parts left (norms, biases,
    what quantize_model keeps in float) are cast to float32. Peak RSS is the quantized weights plus
    one chunk, not the float weights plus the quantized ones (tests/test_quantize.py). Routed experts
    are quantized from the file's per-expert tensors, never stacked in float first."""
    from .quantize import MODES, Int4Weight, Int8Weight, QuantizedExperts, quantize_model

    if mode not in MODES:
        raise ValueError(f"quantization {mode!r}: use one of {MODES}")
    if device.type != "cpu":
        raise ValueError(f"quantization runs on the CPU only (its kernels are CPU kernels), not {device}")
    if dtype != torch.float32:
        raise ValueError(f"dtype={dtype}: a quantized model computes in float32; use dtype='float32' (or 'auto')")
    maps: list[FileMap] = []
    experts: ExpertParts = {}
    state = from_hf_state_dict(read_safetensors(path, maps), cfg, experts)
    model = _assign_state(cfg, state, device, cast=False)
    del state
    small = [t for t in model.parameters() if t.dim() == 1 and t.dtype != torch.float32]
    for t in small:  # norms and biases first: the quantized embedding's rows take the norm's dtype
        t.data = t.data.float()
    release = release_pages(maps)
    for prefix, (gate_up, down) in experts.items():  # on meta in the model; built from the file's tensors
        parent, _, child = prefix.rpartition(".")
        stacked = model.get_submodule(prefix)
        setattr(model.get_submodule(parent), child,
                QuantizedExperts(stacked, mode, group_size, release, parts=(gate_up, down)))
    del experts
    quantize_model(model, mode, group_size, release=release)
    for module in model.modules():  # what stays in float (kv_b_proj, routers), in the file's dtype so far
        if isinstance(module, (Int8Weight, Int4Weight)):
            continue  # scales made in float32 by quantizing; the kernels' own bf16 copies are bf16 by design
        for t in [*module._parameters.values(), *module._buffers.values()]:
            if t is not None and t.is_floating_point() and t.dtype != torch.float32:
                t.data = t.data.float()
    _materialize_buffers(model, device)
    return model.eval()


def _load_float(path: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> Transformer:
    """A float checkpoint in `dtype`. Loaded into another dtype on the CPU, each matrix is cast on its
    own and the file's pages under it dropped right after (`release_pages`), so the load never holds
    the file's weights and the cast ones whole at once (it did: 2.3x the fp32 weights' peak RSS when
    loading as bf16; tests/test_quantize.py). Routers stay as `to_dtype` keeps them (fp32, from the file)."""
    maps: list[FileMap] = []
    casting = device.type == "cpu" and dtype != torch.float32
    experts: ExpertParts | None = {} if casting else None  # (unstacked: stacking copies them all in fp32)
    model = _assign_state(cfg, from_hf_state_dict(read_safetensors(path, maps), cfg, experts), device, cast=True)
    _materialize_buffers(model, device)
    if casting:
        release = release_pages(maps)
        for prefix, (gate_up, down) in experts.items():  # stacked in `dtype`, an expert at a time
            module = model.get_submodule(prefix)
            module.gate_up_proj = nn.Parameter(_stack_cast(gate_up, dtype, release))
            module.down_proj = nn.Parameter(_stack_cast([[d] for d in down], dtype, release))
        del experts
        routers = {id(m.gate.weight) for m in model.moe_layers()}  # to_dtype keeps these in fp32
        for p in model.parameters():
            if id(p) not in routers and p.dtype != dtype:
                old = p.data
                p.data = old.to(dtype)
                release(old)
                del old
    return model.to_dtype(dtype).eval()


def _stack_cast(parts: list[list[torch.Tensor]], dtype: torch.dtype, release: Callable[[torch.Tensor], None]
                ) -> torch.Tensor:
    """torch.stack([torch.cat(p) for p in parts]) in `dtype`, each part copied in (cast) and released."""
    rows = sum(t.shape[0] for t in parts[0])
    out = torch.empty((len(parts), rows, *parts[0][0].shape[1:]), dtype=dtype)
    for e, pieces in enumerate(parts):
        at = 0
        for t in pieces:
            out[e, at:at + t.shape[0]].copy_(t)
            at += t.shape[0]
            release(t)
    return out


def _assign_state(cfg: ModelConfig, state: dict[str, torch.Tensor], device: torch.device, cast: bool) -> Transformer:
    """A `Transformer` built on the meta device with the checkpoint's tensors assigned (checked first)."""
    if cfg.is_deepseek and cfg.num_nextn_predict_layers and not any(k.startswith("mtp.") for k in state):
        # transformers writes num_nextn_predict_layers=1 but no MTP weights; MTP is optional at
        # inference, so load the main model alone (a partial MTP layer still fails below).
        cfg.num_nextn_predict_layers = 0
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        raise ValueError(_key_error(missing, unexpected))
    for name, t in state.items():
        if t.shape != expected[name].shape:
            raise ValueError(
                f"weight {name} has shape {tuple(t.shape)} but config.json implies "
                f"{tuple(expected[name].shape)}; check the config's size fields"
            )
    # The checkpoint's tensors become the parameters (assign=True: no second copy; on the CPU they
    # stay views of the file's memory map until written), cast only where the dtype differs.
    state = {k: v if v.is_meta else v.to(device=device, dtype=expected[k].dtype if cast else v.dtype)
             for k, v in state.items()}  # (meta: experts from_hf_state_dict left unstacked, built later)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """qiusuo.json of a checkpoint ({} for checkpoints written by other tools)."""
    f = Path(path) / "qiusuo.json"
    return json.loads(f.read_text()) if f.exists() else {}
