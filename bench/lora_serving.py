"""Benchmark: several LoRA adapters served on one base (per-row adapters in the forward) against the base
alone and against each adapter merged into a model of its own.

SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads / 3 KV heads, intermediate 1536; vocab cut to 4096
so the output head does not hide the adapters' cost), random weights, fp32, greedy, ignore_eos. Two
adapters, r=16 on all linear layers (PEFT's all-linear). Workload: `--requests` requests, prompts of
`--prompt-len` tokens, `--new-tokens` outputs, all submitted at once:

- base: every request on the base (the floor: no adapter work at all);
- mixed: the same requests, a third each on the base, adapter 1 and adapter 2, in one engine;
- merged: each third on its own model (the base, merged-1, merged-2), one after the other: what serving
  the three as separate models would cost on one machine, with a third of the batch each.

Reported: wall and CPU seconds (process_time) and output tokens/s, median of `--repeats` alternating runs;
the first 16 greedy tokens of every request of `mixed` must equal `merged`'s (asserted).

    python bench/lora_serving.py [--requests 24] [--prompt-len 32] [--new-tokens 32] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build(root: Path, seed: int = 0) -> tuple[Path, dict[str, Path]]:
    from qiusuo.model import Transformer, load_model, save_model
    from qiusuo.model import lora
    from qiusuo.model.config import ModelConfig

    cfg = ModelConfig(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, vocab_size=4096, tie_word_embeddings=True,
                      max_position_embeddings=2048)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.05)
    base = save_model(model, None, root / "base")
    adapters = {}
    for i in (1, 2):
        model, _ = load_model(base)
        lora.apply_lora(model, r=16, alpha=32, targets="all-linear")
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for m in lora.lora_layers(model):
                m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.02)
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.02)
        adapters[f"a{i}"] = lora.save_adapter(model, root / f"a{i}")
    return base, adapters


def timed(fn) -> tuple[float, float, object]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from qiusuo.engine import LLM, SamplingParams
    from qiusuo.model import lora

    root = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    base, adapters = build(root)
    merged = {name: lora.merge_adapter(base, path, root / f"merged-{name}") for name, path in adapters.items()}
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 4096, (args.prompt_len,), generator=g).tolist() for _ in range(args.requests)]
    which = [[None, "a1", "a2"][i % 3] for i in range(args.requests)]
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    opts = dict(num_threads=args.threads, enable_prefix_caching=False, kv_cache_bytes=256 << 20)
    served = LLM(str(base), lora_modules={k: str(v) for k, v in adapters.items()}, **opts)
    alone = {None: LLM(str(base), **opts), **{k: LLM(str(v), **opts) for k, v in merged.items()}}

    def run_base():
        return alone[None].generate(prompts, params)

    def run_mixed():
        return served.generate(prompts, params, lora_request=which)

    def run_merged():
        outs = {}
        for m, llm in alone.items():
            idx = [i for i, w in enumerate(which) if w == m]
            for i, o in zip(idx, llm.generate([prompts[i] for i in idx], params)):
                outs[i] = o
        return [outs[i] for i in range(len(prompts))]

    runs = {"base": run_base, "mixed": run_mixed, "merged": run_merged}
    results = {k: [] for k in runs}
    outputs = {}
    for _ in range(args.repeats):
        for k, fn in runs.items():
            wall, cpu, outs = timed(fn)
            results[k].append((wall, cpu))
            outputs[k] = outs
    for a, b in zip(outputs["mixed"], outputs["merged"]):
        assert list(a.outputs[0].token_ids[:16]) == list(b.outputs[0].token_ids[:16])
    tokens = args.requests * args.new_tokens
    print(f"{args.requests} requests x {args.new_tokens} tokens, prompt {args.prompt_len}, threads {args.threads}, "
          f"median of {args.repeats}")
    for k, rs in results.items():
        wall = statistics.median(r[0] for r in rs)
        cpu = statistics.median(r[1] for r in rs)
        print(f"{k:>7}: wall {wall:6.2f} s  cpu {cpu:6.2f} s  {tokens / wall:7.1f} tok/s")
    bw = statistics.median(r[0] for r in results["base"])
    for k in ("mixed", "merged"):
        w = statistics.median(r[0] for r in results[k])
        print(f"{k} / base wall: {w / bw:.2f}x")


if __name__ == "__main__":
    main()
