"""The engine spec: greedy parity with transformers, paged decode equals the full forward, seeds
reproduce across batch compositions, stop conditions, prefix sharing, preemption, bad input,
abort, streaming, and the live-module contract (no copy, mode restored).
"""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_

from qiusuo.engine import LLM, EngineConfig, LLMEngine, SamplingParams
from qiusuo.model import Transformer, preset, save_model
from qiusuo.tokenizer import Tokenizer

torch.set_num_threads(1)

VOCAB = 300
PRESETS = ["tiny-dense", "tiny-moe"]


def make_model(name: str = "tiny-dense", seed: int = 0, vocab: int = VOCAB, **overrides) -> Transformer:
    kw = dict(vocab_size=vocab, max_position_embeddings=128, num_hidden_layers=2)
    if name == "tiny-moe":
        kw["num_nextn_predict_layers"] = 0  # MTP is a training head; generation never runs it
    cfg = preset(name, **{**kw, **overrides})
    model = Transformer(cfg).eval()
    randomize_(model, seed)
    return model


def prompts(n: int, lo: int = 3, hi: int = 40, seed: int = 0, vocab: int = VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (n_,), generator=g).tolist() for n_ in lens]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def full_forward_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


# ---------------------------------------------------------------------- parity
@pytest.mark.parametrize("arch", ["qwen2", "deepseek_v3"])
def test_greedy_matches_transformers_generate(tmp_path, arch):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, bos_token_id=1, eos_token_id=None,
                  pad_token_id=0)
    if arch == "qwen2":
        hf_cfg = transformers.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True)
    else:
        hf_cfg = transformers.DeepseekV3Config(
            **common, num_key_value_heads=4, moe_intermediate_size=32, q_lora_rank=None, kv_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_shared_experts=1, n_routed_experts=8,
            num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, tie_word_embeddings=False)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    randomize_(hf, seed=1)
    hf.save_pretrained(tmp_path)
    llm = LLM(tmp_path, block_size=8)
    batch = prompts(4, seed=1)
    outs = llm.generate(batch, greedy(20))
    for prompt, out in zip(batch, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
        assert out.outputs[0].token_ids == ref[0, len(prompt):].tolist()
        assert out.outputs[0].finish_reason == "length"
        assert out.num_prompt_tokens == len(prompt) and out.num_completion_tokens == 20


@pytest.mark.parametrize("name", PRESETS)
def test_paged_decode_logprobs_equal_full_forward(name):
    """Every returned logprob (prefill, padded rows, decode across block edges) equals the full forward's."""
    model = make_model(name)
    llm = LLM(model, block_size=4)
    batch = prompts(5, lo=2, hi=30, seed=2)
    outs = llm.generate(batch, greedy(12, logprobs=3))
    for prompt, out in zip(batch, outs):
        o = out.outputs[0]
        ids = torch.tensor([prompt + o.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids)[0].float(), dim=-1)[len(prompt) - 1:-1]  # (n, V)
        want = logp.gather(1, torch.tensor(o.token_ids)[:, None])[:, 0]
        got = torch.tensor([lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert o.token_ids == logp.argmax(-1).tolist()
        top3 = logp.topk(3, dim=-1).indices.tolist()
        for lp, ids3 in zip(o.logprobs, top3):
            assert set(ids3) <= set(lp) and all(lp[i].rank == r + 1 for r, i in enumerate(ids3))
        assert o.cumulative_logprob == pytest.approx(float(want.sum()), abs=1e-3)


def test_mla_cache_is_a_fraction_of_gqa():
    dense, moe = LLMEngine(make_model("tiny-dense")), LLMEngine(make_model("tiny-moe"))
    # GQA: 2 layers * (K + V) * Hk=2 * hd=32 * 4 B; MLA: 2 layers * (C=64 + R=16) * 4 B
    assert dense.kv_cache_bytes_per_token == 2 * 2 * 2 * 32 * 4
    assert moe.kv_cache_bytes_per_token == 2 * (64 + 16) * 4
    assert moe.stats()["kv_cache_bytes_per_token"] < dense.kv_cache_bytes_per_token


# ---------------------------------------------------------------------- sampling
def test_seed_reproduces_across_batch_compositions():
    model = make_model("tiny-moe", seed=3)
    target = prompts(1, seed=5)[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=16, ignore_eos=True, seed=1234)
    alone = LLM(model).generate([target], params)[0].outputs[0].token_ids
    others = prompts(6, seed=6)
    mixed = LLM(model, max_num_batched_tokens=128).generate(
        others[:3] + [target] + others[3:], [SamplingParams(temperature=0.7, max_tokens=30)] * 3 + [params]
        + [SamplingParams(temperature=1.2, max_tokens=5, seed=9)] * 3)
    assert mixed[3].outputs[0].token_ids == alone
    other_seed = LLM(model).generate([target], SamplingParams(temperature=1.0, max_tokens=16, seed=99))
    assert other_seed[0].outputs[0].token_ids != alone


def test_n_samples_differ_and_reproduce():
    model = make_model("tiny-dense", seed=4)
    params = SamplingParams(n=4, temperature=1.0, max_tokens=12, ignore_eos=True, seed=7)
    a = LLM(model).generate([prompts(1, seed=8)[0]], params)[0]
    b = LLM(model).generate([prompts(1, seed=8)[0]], params)[0]
    samples = [o.token_ids for o in a.outputs]
    assert [o.index for o in a.outputs] == [0, 1, 2, 3]
    assert samples == [o.token_ids for o in b.outputs]
    assert len({tuple(s) for s in samples}) > 1


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = make_model("tiny-dense", seed=5)
    batch = prompts(3, seed=9)
    want = [o.outputs[0].token_ids for o in LLM(model).generate(batch, greedy(10))]
    for p in (SamplingParams(temperature=1.5, top_k=1, max_tokens=10, ignore_eos=True, seed=1),
              SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=10, ignore_eos=True)):
        assert [o.outputs[0].token_ids for o in LLM(model).generate(batch, p)] == want


def test_counter_based_gumbel_samples_the_softmax():
    from qiusuo.engine.sampler import uniform_noise

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    n = 20_000
    u = uniform_noise(torch.full((n,), 12345, dtype=torch.int64), torch.arange(n), 5)  # (n, V)
    draws = (logits - torch.log(-torch.log(u))).argmax(dim=-1)
    freq = torch.bincount(draws, minlength=5).float() / n
    torch.testing.assert_close(freq, logits.softmax(-1), atol=0.01, rtol=0)


def test_logits_processors_steer_sampling_and_survive_preemption():
    """A per-request processor (vLLM's hook) sees the sample's output ids and its logits row; its
    result drives sampling and logprobs. Here: after 3 tokens, only token 7 may follow."""
    model = make_model(max_position_embeddings=64)
    calls = []

    def after_three_force_7(output_ids, logits):
        calls.append(len(output_ids))
        if len(output_ids) < 3:
            return logits
        forced = torch.full_like(logits, float("-inf"))
        forced[7] = 0.0
        return forced

    ps = prompts(6, seed=4)
    with_proc = SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True, logprobs=0,
                               logits_processors=[after_three_force_7])
    plain = SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)
    outs = LLM(model=model, tokenizer=None).generate(ps, [with_proc, plain] * 3)
    baseline = LLM(model=model, tokenizer=None).generate(ps, plain)
    for i, out in enumerate(outs):
        ids = out.outputs[0].token_ids
        if i % 2 == 0:
            assert ids[3:] == [7] * 5
            assert ids[:3] == baseline[i].outputs[0].token_ids[:3]  # untouched before it acts
            assert all(out.outputs[0].logprobs[t][7].logprob == 0.0 for t in range(3, 8))
        else:
            assert ids == baseline[i].outputs[0].token_ids  # other requests are not affected
    assert set(calls) == set(range(8))
    # a tiny KV budget forces preemption and recomputation: the stateless processor gives the same tokens
    bytes_per_block = 4 * LLMEngine(model).kv_cache_bytes_per_token
    small = LLM(model=model, tokenizer=None, block_size=4, kv_cache_bytes=18 * bytes_per_block)
    again = small.generate(ps, [with_proc, plain] * 3)
    assert small.llm_engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs]
    with pytest.raises(ValueError, match="logits_processors"):
        SamplingParams(logits_processors=["not callable"])


def test_live_module_never_serves_kv_from_old_weights():
    """Regression: GRPO keeps one LLM on the live weights; after an update, a prompt sharing a full
    block with an earlier one reused KV computed with the old weights (found by the Ray work)."""
    model = make_model(max_position_embeddings=96)
    prompt = prompts(1, lo=40, hi=41, seed=11)[0]
    llm = LLM(model=model, tokenizer=None, block_size=16)
    llm.generate([prompt], greedy(8))
    with torch.no_grad():  # an optimizer step, in place
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    after = llm.generate([prompt], greedy(8))[0].outputs[0].token_ids
    fresh = LLM(model=model, tokenizer=None, block_size=16).generate([prompt], greedy(8))[0].outputs[0].token_ids
    assert after == fresh == full_forward_greedy(model, prompt, 8)


def test_prefix_cache_survives_across_calls_for_a_loaded_checkpoint(tmp_path):
    model = make_model()
    save_model(model, None, tmp_path / "m")
    llm = LLM(str(tmp_path / "m"), block_size=4)
    ps = prompts(1, lo=20, hi=21, seed=12)
    llm.generate(ps, greedy(4))
    out = llm.generate(ps, greedy(4))[0]
    assert out.num_cached_tokens == 16  # all full blocks but the last (its last token needs logits)
