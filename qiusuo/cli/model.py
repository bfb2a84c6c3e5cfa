"""`qiusuo init` (a fresh model from a preset or config.json) and `qiusuo info` (what a checkpoint is)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="build a randomly initialised model from a preset or config.json and save it")
    p.add_argument("--preset", default="tiny-moe", help="tiny-moe, tiny-dense, or a path to a config.json")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=init)

    p = sub.add_parser("info", help="describe a checkpoint: architecture, parameters, KV-cache bytes per token")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.set_defaults(func=info)


def init(args) -> int:
    from qiusuo.model import build_model, save_model

    model, tokenizer = build_model(args.preset, seed=args.seed)
    save_model(model, tokenizer, args.out, metadata={"stage": "init", "preset": args.preset, "seed": args.seed})
    print(f"wrote {args.out} ({model.num_parameters():,} parameters)")
    return 0


def info(args) -> int:
    from qiusuo.model import describe, load_model

    model, _ = load_model(args.model)
    for key, value in describe(model).items():
        print(f"{key:>24}: {value}")
    return 0
