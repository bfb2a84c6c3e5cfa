"""`qiusuo export gguf`: a checkpoint (directory or registry name) as a GGUF file for llama.cpp / Ollama;
`qiusuo export quantized`: the same checkpoint with int8 or int4 weights, in qiusuo's quantized
checkpoint format (docs/quantized-checkpoints.md), which `LLM(path)` and every engine command load
without quantizing again."""

from __future__ import annotations

import argparse
import typing


def register(sub: argparse._SubParsersAction) -> None:
    from qiusuo.engine.config import Int4GroupSize, Quantization

    p = sub.add_parser("export", help="export a checkpoint for other runtimes (GGUF for llama.cpp / Ollama) "
                                      "or as a quantized qiusuo checkpoint")
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    g = formats.add_parser("gguf", help="write a GGUF file (llama/qwen2 dense, deepseek2 for MLA + MoE)")
    g.add_argument("--model", required=True, help="checkpoint directory or registry name (NAME[:TAG])")
    g.add_argument("--out", required=True, help="GGUF file to write")
    g.add_argument("--dtype", default="f16", choices=["f32", "f16", "q8_0", "q4_0"],
                   help="weight type of the matrices; norms and routers stay f32 (default: f16)")
    g.add_argument("--name", default=None, help="general.name in the file (default: the model's name)")
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


def export_gguf(args) -> int:
    from pathlib import Path

    from qiusuo.export import export_gguf as export
    from qiusuo.model import load_model
    from qiusuo.registry import resolve_model

    path = resolve_model(args.model)
    model, tokenizer = load_model(path)
    name = args.name or Path(str(args.model).split(":")[0]).name or "qiusuo"
    out = export(model, tokenizer, args.out, dtype=args.dtype, name=name)
    size = out.stat().st_size
    print(f"wrote {out} ({size / 2**20:.1f} MiB, {args.dtype}, {model.config.model_type})")
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
