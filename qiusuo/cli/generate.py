"""`qiusuo generate` (one completion, reasoning and answer shown apart) and `qiusuo chat` (a REPL
that streams tokens, the <think> part dimmed). Argument handling only; the work is in `engine`."""

from __future__ import annotations

import argparse

from .common import add_compile_flag, add_speculative_flag, compile_setting, speculative_setting


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="registry name (NAME[:TAG]) or checkpoint directory")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads while generating")
    p.add_argument("--quantize", default=None, choices=["int8", "int8-dynamic", "int4"],
                   help="low-bit weights (qiusuo/model/quantize.py): int8 per channel, int8-dynamic (8-bit "
                        "activations too, faster on x86, less exact), int4 in groups of 32")
    add_compile_flag(p)
    add_speculative_flag(p)


def register(subparsers) -> None:
    g = subparsers.add_parser("generate", help="complete a prompt (reasoning and answer shown apart)")
    _add_common(g)
    g.add_argument("prompt")
    g.add_argument("--n", type=int, default=1, help="samples to draw")
    g.add_argument("--raw", action="store_true", help="complete the text as is, without the chat template")
    g.set_defaults(func=generate)
    c = subparsers.add_parser("chat", help="interactive chat that streams tokens")
    _add_common(c)
    c.add_argument("--system", default=None, help="system message")
    c.set_defaults(func=chat)


def _load(args):
    from qiusuo.engine import LLM, SamplingParams

    from qiusuo.registry import resolve_model

    llm = LLM(str(resolve_model(args.model)), device=args.device, dtype=args.dtype, quantization=args.quantize,
              num_threads=args.threads, compile=compile_setting(args),
              speculative_config=speculative_setting(args))
    params = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  max_tokens=args.max_tokens, seed=args.seed)
    return llm, SamplingParams, params


def generate(args) -> int:
    from rich.console import Console

    from qiusuo.engine.reasoning import split_final, strip_answer_tags

    llm, SamplingParams, params = _load(args)
    sp = SamplingParams(n=args.n, **params)
    tok = llm.get_tokenizer()
    if args.raw or tok is None or tok.chat_template is None:
        out = llm.generate(args.prompt, sp)[0]
    else:
        out = llm.chat([{"role": "user", "content": args.prompt}], sp)[0]
    console = Console(highlight=False)
    for o in out.outputs:
        if args.n > 1:
            console.print(f"[bold]--- sample {o.index}[/bold]")
        reasoning, answer = None, o.text
        if tok is not None:
            reasoning, answer, _ = split_final(tok, out.prompt_token_ids, o, sp.skip_special_tokens)
        if reasoning:
            console.print("[bold]reasoning:[/bold]")
            console.print(reasoning.strip(), style="dim", markup=False)
        console.print("[bold]answer:[/bold]")
        console.print(strip_answer_tags(answer).strip(), markup=False)
        console.print(f"[dim]({len(o.token_ids)} tokens, finish_reason={o.finish_reason})[/dim]")
    return 0


def chat(args) -> int:
    from rich.console import Console

    from qiusuo.engine.reasoning import REASONING, ReasoningSplitter, strip_answer_tags

    llm, SamplingParams, params = _load(args)
    tok = llm.get_tokenizer()
    if tok is None or tok.chat_template is None:
        raise ValueError(f"{args.model} has no tokenizer with a chat template; use `qiusuo generate --raw`")
    console = Console(highlight=False)
    console.print("[dim]/reset clears the conversation, /exit or Ctrl-D quits[/dim]")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            console.print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        prompt = tok.apply_chat_template(system + history, add_generation_prompt=True)
        ids = tok.encode(prompt)  # the template writes its own bos
        sp = SamplingParams(**params)
        splitter, answer = ReasoningSplitter(tok, ids, sp.skip_special_tokens), ""
        for out in llm.stream(ids, sp):
            # The splitter decides on token ids, so a template that opens `<think>` itself (as
            # DeepSeek-R1's does) starts the reply inside the reasoning, and tags cut across
            # deltas are handled; the `<answer>` tags are display noise here.
            for kind, piece in splitter.feed(out.outputs[0]):
                if kind == REASONING:
                    console.print(piece, style="dim", end="", markup=False)
                else:
                    answer += piece
                    console.print(strip_answer_tags(piece), end="", markup=False)
        console.print()
        history.append({"role": "assistant", "content": strip_answer_tags(answer).strip()})
