"""`qiusuo eval`: pass@1 / pass@k / maj@k of a model on a task, through the engine."""

from __future__ import annotations

import argparse

from .common import (add_compile_flag, add_runtime_flags, add_speculative_flag, apply_threads, compile_setting,
                     speculative_setting)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a task's held-out problems (pass@k, maj@k, format, length)")
    p.add_argument("--model", required=True, help="checkpoint directory or registry name")
    p.add_argument("--task", required=True, help="task name (arithmetic, countdown, ...)")
    p.add_argument("--n", type=int, default=500, help="number of held-out problems")
    p.add_argument("--samples", type=int, default=1, help="samples per problem (k of pass@k)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--difficulty", type=int, nargs="*", default=None, help="one or more difficulty levels")
    p.add_argument("--template", default="compact", choices=["compact", "r1", "chat"])
    p.add_argument("--split", default="test", choices=["test", "train"])
    p.add_argument("--quantize", default=None, choices=["int8", "int8-dynamic", "int4"],
                   help="low-bit weights (qiusuo/model/quantize.py): int8 per channel, int8-dynamic (8-bit "
                        "activations too, faster on x86, less exact), int4 in groups of 32")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    add_compile_flag(p)
    add_speculative_flag(p)
    p.add_argument("--out", default=None, help="directory for report.json, samples.jsonl and accuracy.png")
    add_runtime_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from qiusuo import tasks
    from qiusuo.engine import LLM
    from qiusuo.eval import evaluate, print_table, write_report
    from qiusuo.registry import resolve_model

    apply_threads(args.threads)
    task = tasks.get(args.task, template=args.template)
    difficulty = args.difficulty[0] if args.difficulty and len(args.difficulty) == 1 else args.difficulty
    problems = task.generate(args.n, seed=args.seed, split=args.split, difficulty=difficulty)
    llm = LLM(str(resolve_model(args.model)), device=args.device, dtype=args.dtype, quantization=args.quantize,
              compile=compile_setting(args), speculative_config=speculative_setting(args))
    try:
        result = evaluate(llm, task, problems, samples=args.samples, temperature=args.temperature,
                          top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    finally:
        task.close()
    print_table(result)
    if args.out:
        path = write_report(result, args.out, extra={"model": args.model})
        print(f"wrote {path}")
    return 0
