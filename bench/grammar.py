"""Benchmark: the per-token cost of grammar masks (structured outputs) at batch 16.

Two measurements in the same run, same model, same 16 prompts, same seeds:

1. A/B wall time: `LLM.generate` of 16 requests x `--tokens` tokens with a JSON-schema grammar that
   cannot finish before `--tokens` (an array of strings), against the same requests without a grammar
   (ignore_eos, so both sides run exactly the same number of decode steps). `--repeats` alternating
   runs; the overhead is median(grammar) / median(plain) - 1.
2. Direct: the engine's own grammar counters (time filling each row's xgrammar bitmask and applying
   it to the logits) per decode step, as a fraction of the plain run's median step time.

Models: the tiny preset (266-token vocabulary, a decode step of a few ms: the worst case for a
fixed per-row cost) and `mid-32k`, a ~40 M dense model (hidden 512, 8 layers, random weights) with a
byte-level BPE vocabulary trained here on JSON-like text (`--vocab`, default 32000 tokens: the mask
scales with the vocabulary; nothing is downloaded). Results: bench/results/grammar-*.json; the target is < 10% of a decode step.

    python bench/grammar.py [--tokens 64] [--repeats 3] [--threads 1] [--models tiny mid-32k]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch

from results import Run

from qiusuo.engine import LLM, SamplingParams, StructuredOutputsParams
from qiusuo.model import build_model
from qiusuo.tokenizer import Tokenizer

# at least 200 strings: never complete within the measured steps, so both sides run the same steps
SCHEMA = {"type": "array", "items": {"type": "string"}, "minItems": 200}
MID_SHAPE = dict(model_type="qwen2", hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)


def trained_tokenizer(vocab: int) -> Tokenizer:
    """A byte-level BPE with `vocab` tokens trained on generated JSON-like text (deterministic)."""
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    words = ["name", "city", "value", "items", "order", "price", "true", "false", "null", "user", "id", "type"]
    text = [json.dumps({rng.choice(words): [rng.random() * 1000, rng.choice(words) * rng.randint(1, 3),
                                             {"k": rng.randint(0, 10**6)}]}) for _ in range(20000)]
    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(text, trainer)
    return Tokenizer(hf, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"})


def build(name: str, vocab: int):
    if name == "tiny":
        return build_model("tiny-dense", seed=0)
    tok = trained_tokenizer(vocab)
    return build_model("tiny-dense", tokenizer=tok, seed=0, **MID_SHAPE)


def timed(llm: LLM, prompts: list[str], tokens: int, guided: bool, check: bool = True) -> tuple[float, float, int]:
    """(wall seconds, grammar seconds, grammar tokens) of one batch."""
    stats0 = llm.llm_engine.stats()
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=tokens, ignore_eos=not guided,
                             structured_outputs=StructuredOutputsParams(json=SCHEMA) if guided else None)
              for i in range(len(prompts))]
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t
    n = [len(o.outputs[0].token_ids) for o in outs]
    assert not check or all(k == tokens for k in n), f"every request must run {tokens} steps, got {n}"
    stats = llm.llm_engine.stats()
    return wall, stats["grammar_seconds"] - stats0["grammar_seconds"], stats["grammar_tokens"] - stats0["grammar_tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--models", nargs="+", default=["tiny", "mid-32k"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Run("grammar", threads=args.threads, args=vars(args))
    rows = []
    for name in args.models:
        model, tok = build(name, args.vocab)
        llm = LLM(model, tok, num_threads=args.threads, max_num_seqs=args.batch)
        prompts = [f"Request {i}: answer in JSON." for i in range(args.batch)]
        timed(llm, prompts, 4, True, check=False)  # compile the grammar, import xgrammar, warm the caches
        timed(llm, prompts, 4, False, check=False)
        plain, guided, per_step = [], [], []
        for r in range(args.repeats):
            for side in (("plain", "guided") if r % 2 == 0 else ("guided", "plain")):
                wall, g_s, g_tok = timed(llm, prompts, args.tokens, side == "guided")
                (guided if side == "guided" else plain).append(wall)
                if side == "guided":
                    per_step.append(g_s / args.tokens)
                run.add(model=name, side=side, repeat=r, wall_s=wall, grammar_s=g_s, grammar_tokens=g_tok,
                        steps=args.tokens, batch=args.batch)
        step_plain = statistics.median(plain) / args.tokens
        step_guided = statistics.median(guided) / args.tokens
        mask_step = statistics.median(per_step)
        rows.append([name, tok.vocab_size, round(step_plain * 1e3, 3), round(step_guided * 1e3, 3),
                     round(100 * (step_guided / step_plain - 1), 1), round(mask_step * 1e6, 1),
                     round(mask_step / args.batch * 1e6, 2), round(100 * mask_step / step_plain, 2)])
        print(rows[-1], flush=True)
        del llm, model
    run.table(f"Grammar mask overhead at batch {args.batch} ({args.tokens} decode steps, medians of {args.repeats})",
              ["model", "vocab", "plain step ms", "guided step ms", "A/B overhead %", "mask us/step",
               "mask us/token", "mask % of step"], rows,
              note="mask = filling xgrammar bitmasks + applying them (the engine's grammar counters); "
                   "A/B = wall time with a JSON-schema grammar vs none, same steps")
    run.save(summary={r[0]: {"ab_overhead_pct": r[4], "mask_pct_of_step": r[7]} for r in rows})


if __name__ == "__main__":
    main()
