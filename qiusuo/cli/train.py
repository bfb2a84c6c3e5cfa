"""`qiusuo pretrain | sft | distill | grpo`: flags generated from the stage config dataclasses.

Each flag is a field of `qiusuo.train.config` (same name with dashes, same default, the field's
help text; qiusuo/cli/flags.py), so there is no second list of defaults here; the dataclass
validates the values.
"""

from __future__ import annotations

import argparse
import sys

from .flags import add_config_flags, config_from_args

STAGES = {
    "pretrain": ("PretrainConfig", "qiusuo.train.pretrain:Pretrain",
                 "pretrain a fresh model on a task's synthetic corpus of worked solutions"),
    "sft": ("SFTConfig", "qiusuo.train.sft:SFT",
            "fine-tune on prompt/completion or chat JSONL records (loss on completions only)"),
    "distill": ("DistillConfig", "qiusuo.train.distill:Distill",
                "rejection-sample a teacher with the task's reward, fine-tune a student on the correct samples"),
    "grpo": ("GRPOConfig", "qiusuo.train.grpo:GRPO",
             "GRPO from rule-based rewards (rollouts through the engine on the live weights)"),
}


def register(sub: argparse._SubParsersAction) -> None:
    from qiusuo.train import config

    for name, (cls_name, _, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_config_flags(p, getattr(config, cls_name))
        p.set_defaults(func=run_stage, stage=name)


def run_stage(args) -> int:
    import importlib

    from qiusuo.train import config
    from qiusuo.train.loop import NonFiniteLossError

    cls_name, target, _ = STAGES[args.stage]
    cfg = config_from_args(getattr(config, cls_name), args)
    if getattr(cfg, "ray", False):  # the same stage on Ray actors; without --ray, ray is never imported
        target = "qiusuo.train.distributed:RayGRPO"
    module, attr = target.split(":")
    stage = getattr(importlib.import_module(module), attr)(cfg)
    try:
        result = stage.run()
    except NonFiniteLossError as e:
        print(f"qiusuo {args.stage}: stopped: {e}", file=sys.stderr)
        return 3
    if result.status == "interrupted":
        return 130
    print(f"{args.stage}: {result.step} steps in {result.seconds:.0f}s; model in {cfg.out}/final")
    return 0
