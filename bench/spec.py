"""MTP self-speculative decoding: acceptance rate and decode speed-up against plain decoding.

    python bench/spec.py --model runs/spec-pretrain/final          # tiny-moe from `qiusuo pretrain`
    python bench/spec.py --shape dsv3-moe-130m                      # V3-shaped MoE, random weights

For each model, the same requests run through `LLM(model)` and `LLM(model, speculative_config=
{"method": "mtp", "num_speculative_tokens": k})` for each k, greedy, fp32, one torch thread, at
batch 1 (requests one after another) and batch 16 (16 requests in one `generate`). The orders
alternate between repeats (results.alternating); medians are reported. Correctness is asserted:
every speculative run's tokens equal the plain run's (greedy is exact).

Figures: output tokens per second (wall and CPU `process_time`), the ratio to plain decoding in
the same repeat, the acceptance rate (accepted / draft tokens), accepted per draft position, and
the mean tokens a step yields per row (1 + accepted / drafts). A trained model's prompts are its
task's held-out prompts with the think block opened (it writes its scratchpad); a random model's are random ids.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from results import Run, alternating, median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import REAL_SHAPES  # noqa: E402  (bench/engine.py: config.json values of public checkpoints)


def requests_for(llm, model, n: int, seed: int, task: str | None) -> list[list[int]]:
    tok = llm.get_tokenizer()
    if task is not None and tok is not None:
        from qiusuo import tasks
        from qiusuo.eval.evaluate import encode_prompt

        t = tasks.get(task, template="compact")
        # The prompt opens the think block, so the model writes its scratchpad (~40 tokens), not a blurt.
        opened = [tok.think_start_id] if getattr(tok, "think_start_id", None) is not None else []
        try:
            return [encode_prompt(tok, t, p) + opened for p in t.generate(n, seed=seed, split="test")]
        finally:
            t.close()
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    return [torch.randint(2, V, (int(L),), generator=g).tolist() for L in torch.randint(8, 64, (n,), generator=g)]


def timed(llm, prompts, params, batch: int) -> tuple[list[list[int]], float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    out = []
    for i in range(0, len(prompts), batch):
        out += [o.outputs[0].token_ids for o in llm.generate(prompts[i:i + batch], params)]
    return out, time.perf_counter() - t0, time.process_time() - c0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (a tiny-moe trained with MTP)")
    ap.add_argument("--shape", default=None, choices=list(REAL_SHAPES), help="a real shape, random weights")
    ap.add_argument("--task", default="arithmetic", help="prompts of a trained model (its held-out problems)")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 3], help="num_speculative_tokens to measure")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--requests", type=int, default=16, help="requests per (batch, side) run")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if (args.model is None) == (args.shape is None):
        ap.error("give --model DIR or --shape NAME")
    torch.set_num_threads(args.threads)

    from qiusuo.engine import LLM, SamplingParams
    from qiusuo.model import ModelConfig, Transformer

    if args.model:
        name = Path(args.model).name if Path(args.model).name not in ("final", "") else Path(args.model).parent.name
        plain = LLM(args.model, max_num_seqs=max(args.batch))
        model, tok, task = plain.llm_engine.model, plain.get_tokenizer(), args.task
    else:
        name = args.shape + " (random weights)"
        cfg = ModelConfig(**{**REAL_SHAPES[args.shape], "num_nextn_predict_layers": 1})
        torch.manual_seed(args.seed)
        model = Transformer(cfg).eval()
        model.reset_parameters(seed=args.seed)
        tok, task = None, None
        plain = LLM(model, max_num_seqs=max(args.batch))
    # ignore_eos: every side produces the same number of tokens (a trained model may still stop on EOS
    # through a stop id; greedy makes both sides stop at the same token).
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=tok is None, detokenize=False)
    prompts = requests_for(plain, model, args.requests, args.seed, task)
    sides = ["plain"] + [f"mtp k={k}" for k in args.k]
    engines = {"plain": plain}
    for k in args.k:
        engines[f"mtp k={k}"] = LLM(model, tok, max_num_seqs=max(args.batch),
                                    speculative_config={"method": "mtp", "num_speculative_tokens": k})
    run = Run("spec", threads=args.threads, args=vars(args))
    for e in engines.values():  # warm-up: allocator, first-call costs
        e.generate(prompts[:2], params)
    for batch in args.batch:
        ref = None
        for rep, side in alternating(sides, args.repeats):
            llm = engines[side]
            before = dict(llm.llm_engine.stats().get("spec_decode") or {})
            out, wall, cpu = timed(llm, prompts, params, batch)
            after = llm.llm_engine.stats().get("spec_decode") or {}
            if side == "plain" and ref is None:
                ref = out
            elif ref is not None:
                assert out == ref, f"{side} at batch {batch}: speculative greedy tokens differ from plain decoding"
            n = sum(len(o) for o in out)
            rec = dict(model=name, batch=batch, side=side, repeat=rep, tokens=n, wall_s=wall, cpu_s=cpu,
                       tok_s=n / wall, cpu_tok_s=n / cpu)
            if after:
                d = {key: after[key] - before.get(key, 0) for key in ("num_drafts", "num_draft_tokens",
                                                                     "num_accepted_tokens")}
                d["per_pos"] = [a - b for a, b in zip(after["num_accepted_tokens_per_pos"],
                                                      before.get("num_accepted_tokens_per_pos", [0] * 16))]
                rec.update(d)
            run.add(**rec)
            print(f"{name} batch {batch} {side} repeat {rep}: {n / wall:.1f} tok/s wall, {n / cpu:.1f} tok/s CPU",
                  flush=True)
    rows = []
    for batch in args.batch:
        recs = {s: [r for r in run.records if r["batch"] == batch and r["side"] == s] for s in sides}
        base = {r["repeat"]: r for r in recs["plain"]}
        for side in sides:
            rs = recs[side]
            wall, cpu = median([r["tok_s"] for r in rs]), median([r["cpu_tok_s"] for r in rs])
            sw = median([r["tok_s"] / base[r["repeat"]]["tok_s"] for r in rs])
            sc = median([r["cpu_tok_s"] / base[r["repeat"]]["cpu_tok_s"] for r in rs])
            if side == "plain":
                rows.append([name, batch, side, round(wall, 1), round(cpu, 1), 1.0, 1.0, "–", "–", "–"])
                continue
            drafts = sum(r["num_drafts"] for r in rs)
            dtok = sum(r["num_draft_tokens"] for r in rs)
            acc = sum(r["num_accepted_tokens"] for r in rs)
            per_pos = [sum(r["per_pos"][j] for r in rs) / max(drafts, 1) for j in range(len(rs[0]["per_pos"]))]
            rows.append([name, batch, side, round(wall, 1), round(cpu, 1), round(sw, 2), round(sc, 2),
                         round(acc / max(dtok, 1), 3), " / ".join(f"{p:.2f}" for p in per_pos),
                         round(1 + acc / max(drafts, 1), 2)])
    run.table(f"MTP speculative decoding, {name}: tok/s (medians of {args.repeats}), speed-up vs plain in the "
              "same repeat, acceptance",
              ["model", "batch", "side", "tok/s wall", "tok/s CPU", "speed-up wall", "speed-up CPU",
               "acceptance", "accepted per position", "tokens per step"], rows,
              note="greedy, fp32, one thread; speculative tokens asserted equal to plain decoding")
    run.save(summary={"rows": rows})
    for r in rows:
        print(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
