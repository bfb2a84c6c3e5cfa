"""`qiusuo export gguf|quantized|merged`: a checkpoint for other runtimes, a quantized checkpoint, or an
adapter folded into its base.

`export gguf` writes a GGUF file for llama.cpp / Ollama, or with `--adapter` a LoRA adapter GGUF that
llama.cpp applies on the exported base (`--lora`). `export quantized` writes the same checkpoint with int8
or int4 weights in qiusuo's quantized checkpoint format (docs/quantized-checkpoints.md), which `LLM(path)`
and every engine command load without quantizing again. `export merged` is one command from a LoRA
adapter (PEFT's layout) to a plain full checkpoint: it sits under `export` because, like `gguf`, it
reads a model and writes a standalone artifact for whatever runs next (serve, eval, transformers,
another export), and it keeps `--model` / `--out` meaning what they mean there (PEFT's name for the
operation is `merge_and_unload`).
"""

from __future__ import annotations

import argparse
import typing


def register(sub: argparse._SubParsersAction) -> None:
    from qiusuo.engine.config import Int4GroupSize, Quantization

    p = sub.add_parser("export", help="export a checkpoint for other runtimes (GGUF for llama.cpp / Ollama), as a "
                                      "quantized qiusuo checkpoint, or merge a LoRA adapter into a full checkpoint")
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    g = formats.add_parser("gguf", help="write a GGUF file (llama/qwen2 dense, deepseek2 for MLA + MoE)")
    g.add_argument("--model", default=None, help="checkpoint directory or registry name (NAME[:TAG]); with "
                                                 "--adapter, its base (default: the adapter's base)")
    g.add_argument("--adapter", default=None, help="write this LoRA adapter (directory or registry adapter) as a "
                                                   "llama.cpp adapter GGUF for the exported base (llama.cpp's --lora), "
                                                   "not the model")
    g.add_argument("--out", required=True, help="GGUF file to write")
    g.add_argument("--dtype", default=None, choices=["f32", "f16", "q8_0", "q4_0"],
                   help="weight type of the matrices; norms and routers stay f32 (default: f16; an adapter: f32 or "
                        "f16, default f32)")
    g.add_argument("--name", default=None, help="general.name in the file (default: the model's name)")
    g.add_argument("--mtp", action=argparse.BooleanOptionalAction, default=True,
                   help="keep DeepSeek-V3's MTP layers as llama.cpp's nextn blocks (after the main blocks; "
                        "llama.cpp loads the file either way and does not run them); --no-mtp drops them")
    g.set_defaults(func=export_gguf)
    q = formats.add_parser("quantized", help="write a quantized qiusuo checkpoint (int8 / int4 weights) that "
                                             "loads without quantizing again (docs/quantized-checkpoints.md)")
    q.add_argument("--model", required=True, help="float checkpoint directory or registry name (NAME[:TAG])")
    q.add_argument("--out", required=True, help="checkpoint directory to write (replaced if it exists)")
    # the engine's names and choices (EngineConfig.quantization's --quantize, --int4-group-size)
    q.add_argument("--quantize", dest="quantization", required=True, choices=typing.get_args(Quantization),
                   help="int8 per channel, int8-dynamic (8-bit activations too at run time), int4 in groups")
    q.add_argument("--int4-group-size", type=int, default=32, choices=typing.get_args(Int4GroupSize),
                   help="weights per int4 scale and zero point (default: 32)")
    q.set_defaults(func=export_quantized)

    m = formats.add_parser("merged", help="fold a LoRA adapter (PEFT layout) into its base: a full checkpoint")
    m.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json + "
                                                    "adapter_model.safetensors) or registry adapter (NAME[:TAG])")
    m.add_argument("--model", default=None, help="the base: checkpoint directory or registry name (default: the "
                                                 "registry adapter's base, else adapter_config.json's "
                                                 "base_model_name_or_path)")
    m.add_argument("--out", required=True, help="checkpoint directory to write")
    m.set_defaults(func=export_merged)


def export_gguf(args) -> int:
    from pathlib import Path

    from qiusuo.export import export_gguf as export
    from qiusuo.model import load_model
    from qiusuo.registry import resolve_model

    if args.adapter is not None:
        return export_lora_gguf(args)
    if args.model is None:
        raise ValueError("give --model (the checkpoint to export), or --adapter for a LoRA adapter GGUF")
    dtype = args.dtype or "f16"
    path = resolve_model(args.model)
    model, tokenizer = load_model(path)
    name = args.name or Path(str(args.model).split(":")[0]).name or "qiusuo"
    out = export(model, tokenizer, args.out, dtype=dtype, name=name, mtp=args.mtp)
    size = out.stat().st_size
    mtp = f", {len(model.mtp)} MTP layer(s)" if args.mtp and len(model.mtp) else ""
    print(f"wrote {out} ({size / 2**20:.1f} MiB, {dtype}, {model.config.model_type}{mtp})")
    return 0


def _adapter_and_base(args):
    """(adapter directory, base checkpoint directory) from --adapter and --model (default: the adapter's base)."""
    from qiusuo.model.lora import adapter_base
    from qiusuo.registry import adapter_base_of, resolve_adapter, resolve_model

    adapter = resolve_adapter(args.adapter)  # a directory, or a registry adapter (which names its base)
    base = args.model or adapter_base_of(args.adapter) or adapter_base(adapter)
    return adapter, resolve_model(base)


def export_lora_gguf(args) -> int:
    from pathlib import Path

    from qiusuo.export import export_lora_gguf as export
    from qiusuo.model import load_model

    adapter, base = _adapter_and_base(args)
    dtype = args.dtype or "f32"
    if dtype not in ("f32", "f16"):
        raise ValueError(f"--dtype {dtype}: a LoRA adapter GGUF is f32 or f16 (llama.cpp applies it in float)")
    model, _ = load_model(base)
    name = args.name or Path(str(args.adapter).split(":")[-1]).name or "qiusuo-lora"
    out = export(model, adapter, args.out, dtype=dtype, name=name)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB, LoRA adapter for {base}, {dtype}); load it on the "
          f"exported base with llama.cpp's --lora")
    return 0


def export_merged(args) -> int:
    from qiusuo.model.lora import merge_adapter

    adapter, base = _adapter_and_base(args)
    out = merge_adapter(base, adapter, args.out)
    print(f"wrote {out} ({base} + adapter {args.adapter}, merged)")
    return 0


def export_quantized(args) -> int:
    from pathlib import Path

    from qiusuo.model import load_model, save_model
    from qiusuo.model.checkpoint import read_metadata
    from qiusuo.registry import resolve_model

    path = Path(resolve_model(args.model))
    out = Path(args.out)
    if out.resolve() == path.resolve():
        raise ValueError(f"--out {out} is the source checkpoint; write the quantized one to another directory")
    # quantized as it loads, one matrix at a time (peak RSS ~ the quantized weights)
    model, tokenizer = load_model(path, quantization=args.quantization, int4_group_size=args.int4_group_size)
    meta = {**read_metadata(path), "quantized_from": str(path)}
    save_model(model, tokenizer, out, metadata=meta)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    group = f", groups of {args.int4_group_size}" if args.quantization == "int4" else ""
    print(f"wrote {out} ({size / 2**20:.1f} MiB of weights, {args.quantization}{group}); "
          f"load it with LLM({str(out)!r}) or --model {out}")
    return 0
