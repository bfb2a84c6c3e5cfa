"""`qiusuo export gguf`: a checkpoint (directory or registry name) as a GGUF file for llama.cpp / Ollama."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint for other runtimes (GGUF for llama.cpp / Ollama)")
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    g = formats.add_parser("gguf", help="write a GGUF file (llama/qwen2 dense, deepseek2 for MLA + MoE)")
    g.add_argument("--model", required=True, help="checkpoint directory or registry name (NAME[:TAG])")
    g.add_argument("--out", required=True, help="GGUF file to write")
    g.add_argument("--dtype", default="f16", choices=["f32", "f16", "q8_0", "q4_0"],
                   help="weight type of the matrices; norms and routers stay f32 (default: f16)")
    g.add_argument("--name", default=None, help="general.name in the file (default: the model's name)")
    g.set_defaults(func=export_gguf)


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
