"""`qiusuo demo`: the largest end-to-end path that exists, run in one command."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build the tiny MoE preset, save it as an HF checkpoint, reload it and run it")
    p.add_argument("--out", default="runs/demo", help="directory for the demo's outputs")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    import time
    from pathlib import Path

    import torch

    from qiusuo.model import build_model, describe, load_model, save_model

    t0 = time.perf_counter()
    out = Path(args.out)
    model, tokenizer = build_model("tiny-moe", seed=args.seed)
    path = save_model(model, tokenizer, out / "tiny-moe", metadata={"stage": "init", "seed": args.seed})
    loaded, tok = load_model(path)
    print(f"saved and reloaded {path}")
    for key, value in describe(loaded).items():
        print(f"  {key:>26}: {value}")
    ids = torch.tensor([tok.encode("347+285=")])
    with torch.inference_mode():
        same = torch.equal(model.eval()(ids), loaded(ids))
    print(f"  forward pass on {ids.shape[1]} tokens: logits identical after reload: {same}")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0 if same else 1
