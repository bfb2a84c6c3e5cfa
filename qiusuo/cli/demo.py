"""`qiusuo demo`: the R1-Zero recipe in miniature (pretrain -> eval -> GRPO -> eval), ~5-10 min on 2 CPU cores."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from qiusuo.cli.flags import add_config_flags
    from qiusuo.train.demo import DemoConfig

    p = sub.add_parser(
        "demo",
        help="R1-Zero in miniature: pretrain a tiny base on arithmetic (or countdown), GRPO it, compare on "
        "held-out problems",
        description="Pretrain a tiny model on arithmetic (--task countdown: Countdown) worked solutions, evaluate it "
        "on held-out problems, "
        "train it with GRPO on answer-only rewards, evaluate again, and print a before/after table. "
        "Writes OUT/report.json and OUT/grpo_curves.png.",
    )
    add_config_flags(p, DemoConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    from qiusuo.cli.flags import config_from_args
    from qiusuo.train.demo import DemoConfig, run_demo

    run_demo(config_from_args(DemoConfig, args))
    return 0
