"""MTP speculative decoding: greedy output identical to plain decoding (random and briefly trained
weights, batch 1 and batched with mixed lengths, stop tokens/strings and max_tokens landing inside
the drafts, prefix caching, preemption, logprobs, logits processors), sampling that follows the
target distribution (chi-square on a small vocabulary, fixed seeds), KV rollback, the metrics and
the refusals.
"""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_

from qiusuo.engine import LLM, EngineConfig, SamplingParams
from qiusuo.model import Transformer, preset

torch.set_num_threads(1)

VOCAB = 40


def spec(k: int) -> dict:
    return {"method": "mtp", "num_speculative_tokens": k}


def small_moe(vocab: int = VOCAB, **overrides) -> Transformer:
    kw = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, max_position_embeddings=128,
              n_routed_experts=4, n_group=1, topk_group=1, moe_intermediate_size=32, intermediate_size=128,
              kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_attention_heads=2,
              num_key_value_heads=2, num_nextn_predict_layers=1, mtp_loss_weight=1.0)
    return Transformer(preset("tiny-moe", **{**kw, **overrides}))


def pattern(g: torch.Generator, B: int, T: int, vocab: int = VOCAB) -> torch.Tensor:
    """Arithmetic progressions mod (vocab - 2), shifted past ids 0 and 1: easy for the MTP head."""
    start = torch.randint(0, vocab - 2, (B, 1), generator=g)
    stride = torch.randint(1, 4, (B, 1), generator=g)
    return (start + stride * torch.arange(T)) % (vocab - 2) + 2  # (B, T)


@pytest.fixture(scope="module")
def random_model() -> Transformer:
    m = small_moe().eval()
    randomize_(m, 0)
    return m


@pytest.fixture(scope="module")
def trained_model() -> Transformer:
    """Trained briefly (main + MTP loss) on progressions, so drafts are often accepted."""
    torch.manual_seed(0)
    m = small_moe()
    m.reset_parameters(seed=0)
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        loss = m.compute_loss(pattern(g, 8, 32)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def mixed_prompts(n: int, seed: int = 0, trained: bool = False) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, 30, (n,), generator=g).tolist()
    if trained:
        return [pattern(g, 1, L)[0].tolist() for L in lens]
    return [torch.randint(2, VOCAB, (L,), generator=g).tolist() for L in lens]


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


# ---------------------------------------------------------------------- greedy: identical output
@pytest.mark.parametrize("which", ["random_model", "trained_model"])
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_is_identical_batched_and_alone(request, which, k):
    model = request.getfixturevalue(which)
    prompts = mixed_prompts(6, trained=which == "trained_model")
    params = [greedy(m) for m in (1, 2, 5, 17, 30, 23)]  # max_tokens lands inside drafts too
    want = tokens(LLM(model).generate(prompts, params))
    llm = LLM(model, speculative_config=spec(k))
    assert tokens(llm.generate(prompts, params)) == want
    for p, sp, w in zip(prompts[:3], params[3:], want[3:]):
        assert tokens(llm.generate([p], sp))[0] == tokens(LLM(model).generate([p], sp))[0]
    st = llm.llm_engine.stats()["spec_decode"]
    assert st["num_draft_tokens"] >= st["num_drafts"] > 0
    if which == "trained_model":  # the drafts are good: most steps yield more than one token
        assert st["num_accepted_tokens_per_pos"][0] > 0.5 * st["num_drafts"]
    assert llm.llm_engine.block_manager.num_used_blocks == 0  # every block came back


def test_stop_tokens_and_strings_inside_accepted_drafts(trained_model):
    class Tok:  # a tokenizer whose text is the ids, so stop strings can be tested on token boundaries
        eos_token_id = None

        def encode(self, text, add_special_tokens=True):
            return [int(t) for t in text.split()]

        def decode(self, ids):
            return "".join(f"<{i}>" for i in ids)

        def incremental_decoder(self, skip_special_tokens=True):
            class D:
                def step(self, i):
                    return f"<{i}>"

                def flush(self):
                    return ""
            return D()

    prompts = mixed_prompts(5, seed=3, trained=True)
    plain = LLM(trained_model, Tok())
    ref = tokens(plain.generate(prompts, greedy(30)))
    # stop at the 5th/9th generated token of each: a token the drafts would have run past
    stop_ids = [[r[4]] for r in ref]
    stop_strs = [f"<{r[8]}>" for r in ref]
    llm = LLM(trained_model, Tok(), speculative_config=spec(3))
    for mk in (lambda i: SamplingParams(temperature=0, max_tokens=30, stop_token_ids=stop_ids[i]),
               lambda i: SamplingParams(temperature=0, max_tokens=30, stop=stop_strs[i]),
               lambda i: SamplingParams(temperature=0, max_tokens=30, stop=stop_strs[i], logprobs=2)):
        params = [mk(i) for i in range(len(prompts))]
        a, b = plain.generate(prompts, params), llm.generate(prompts, params)
        for x, y in zip(a, b):
            ox, oy = x.outputs[0], y.outputs[0]
            assert (ox.token_ids, ox.text, ox.finish_reason, ox.stop_reason) == \
                   (oy.token_ids, oy.text, oy.finish_reason, oy.stop_reason)
    assert llm.llm_engine.stats()["spec_decode"]["num_accepted_tokens"] > 0


def test_logprobs_are_the_target_models(trained_model):
    prompts = mixed_prompts(4, seed=5, trained=True)
    sp = greedy(20, logprobs=3)
    a = LLM(trained_model).generate(prompts, sp)
    b = LLM(trained_model, speculative_config=spec(2)).generate(prompts, sp)
    for x, y in zip(a, b):
        ox, oy = x.outputs[0], y.outputs[0]
        assert ox.token_ids == oy.token_ids
        assert len(oy.logprobs) == len(oy.token_ids)
        for dx, dy in zip(ox.logprobs, oy.logprobs):
            assert dx.keys() == dy.keys()
            for t in dx:
                assert dx[t].rank == dy[t].rank
                assert dx[t].logprob == pytest.approx(dy[t].logprob, abs=1e-4)
        assert ox.cumulative_logprob == pytest.approx(oy.cumulative_logprob, abs=1e-3)


def test_logits_processor_sees_each_draft_position(trained_model):
    def after_four_force_7(output_ids, logits):  # stateless, as the thinking budget is
        if len(output_ids) >= 4:
            logits = torch.full_like(logits, -1e9)
            logits[7] = 0.0
        return logits

    prompts = mixed_prompts(3, seed=7, trained=True)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logits_processors=[after_four_force_7])
    want = tokens(LLM(trained_model).generate(prompts, sp))
    got = tokens(LLM(trained_model, speculative_config=spec(3)).generate(prompts, sp))
    assert got == want
    assert all(t[4:] == [7] * 8 for t in got)


def test_prefix_caching_and_preemption_keep_the_output(trained_model):
    g = torch.Generator().manual_seed(11)
    base = pattern(g, 1, 40)[0].tolist()
    prompts = [base[:35] + [int(t)] for t in range(2, 10)]  # share two full 16-token blocks
    sp = greedy(24)
    want = tokens(LLM(trained_model).generate(prompts, sp))
    llm = LLM(trained_model, speculative_config=spec(2))
    first = llm.generate(prompts, sp)
    assert tokens(first) == want and first[-1].num_cached_tokens == 32
    # The engine itself (LLM forgets a live module's prefixes between calls): the generated blocks
    # are found again, their MTP states included.
    engine = llm.llm_engine
    for i, p in enumerate(prompts):
        engine.add_request(f"again-{i}", p + want[i][:20], greedy(4))
    again = {}
    while engine.has_unfinished_requests():
        for out in engine.step(finished_only=True):
            again[out.request_id] = out
    for i in range(len(prompts)):
        out = again[f"again-{i}"]
        assert out.num_cached_tokens == 48 and out.outputs[0].token_ids == want[i][20:]
    # a KV pool for a few sequences: rows are preempted and recomputed mid-generation
    per_token = LLM(trained_model, speculative_config=spec(3)).llm_engine.kv_cache_bytes_per_token
    small = LLM(trained_model, speculative_config=spec(3), max_model_len=64, kv_cache_bytes=per_token * 16 * 9)
    assert tokens(small.generate(prompts, sp)) == want
    assert small.llm_engine.stats()["num_preemptions"] > 0
    assert small.llm_engine.block_manager.num_used_blocks == 0


def test_rejected_drafts_give_their_blocks_back(random_model):
    """Random weights: nearly every draft is rejected; the blocks held for them are trimmed each step."""
    engine = LLM(random_model, speculative_config=spec(4), block_size=4).llm_engine
    engine.add_request("r", [5, 6, 7], greedy(20))
    seen = []
    while engine.has_unfinished_requests():
        engine.step()
        seq = engine.scheduler.running[0] if engine.scheduler.running else None
        if seq is not None:
            assert len(seq.block_table) == -(-seq.num_tokens // 4)
            assert seq.num_computed_tokens == seq.num_tokens - 1
            seen.append(seq.num_tokens)
    assert seen and engine.block_manager.num_used_blocks == 0


# ---------------------------------------------------------------------- sampling: the target distribution
def _chi_square_p(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's chi-square test; cells expected < 5 are pooled into one."""
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]]) if small.any() else observed
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2,
                                                                                                   dtype=torch.float64)))


def _exact_joint(model: Transformer, prompt: list[int], n: int, temperature: float, top_k: int) -> torch.Tensor:
    """P(t1..tn | prompt) under temperature/top-k, every sequence enumerated: (V**n,)."""
    V = model.config.vocab_size
    seqs = torch.tensor([prompt])
    probs = torch.ones(1, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(n):
            logits = model(seqs)[:, -1].double() / temperature  # (S, V)
            if top_k:
                kth = logits.topk(top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = (probs[:, None] * logits.softmax(dim=-1)).reshape(-1)  # (S * V,)
            seqs = torch.cat((seqs.repeat_interleave(V, 0), torch.arange(V).repeat(len(seqs))[:, None]), dim=1)
    return probs


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 5)])
def test_sampling_follows_the_target_distribution(temperature, top_k):
    """Speculative sampling draws (t1, t2, t3) from the target's joint distribution: 4000 samples,
    fixed seeds, chi-square p > 0.001 (the draft is a random MTP head, so both accept and
    resample paths run often)."""
    V = 8
    model = small_moe(vocab=V).eval()
    randomize_(model, 1, std=0.3)
    prompt = [1, 5, 3]
    sp = SamplingParams(n=4000, temperature=temperature, top_k=top_k, max_tokens=3, ignore_eos=True, seed=1234)
    llm = LLM(model, speculative_config=spec(2), max_model_len=16)
    out = llm.generate([prompt], sp)[0]
    counts = torch.zeros(V**3, dtype=torch.float64)
    for o in out.outputs:
        a, b, c = o.token_ids
        counts[(a * V + b) * V + c] += 1
    expected = _exact_joint(model, prompt, 3, temperature, top_k) * len(out.outputs)
    assert _chi_square_p(counts, expected) > 1e-3
    st = llm.llm_engine.stats()["spec_decode"]
    assert 0.02 * st["num_draft_tokens"] < st["num_accepted_tokens"] < 0.9 * st["num_draft_tokens"]  # both paths ran
    # max_tokens=3 leaves room for one draft per sample (after the prefill's token), never two: the
    # counters once also counted rows verified without drafts (a stale loop variable).
    assert st["num_drafts"] == st["num_draft_tokens"] <= len(out.outputs)


def test_chi_square_catches_a_biased_sampler(monkeypatch):
    """The check above can fail: a sampler that accepts every draft the target does not rule out
    (acceptance uniforms of 0) draws from the draft, and the same check rejects it."""
    import qiusuo.engine.spec_decode as sd

    real = sd.uniform_noise
    monkeypatch.setattr(sd, "uniform_noise", lambda seeds, counters, v: real(seeds, counters, v) * (v > 1))
    V = 8
    model = small_moe(vocab=V).eval()
    randomize_(model, 1, std=0.3)
    prompt = [1, 5, 3]
    sp = SamplingParams(n=4000, temperature=1.0, max_tokens=3, ignore_eos=True, seed=1234)
    out = LLM(model, speculative_config=spec(2), max_model_len=16).generate([prompt], sp)[0]
    counts = torch.zeros(V**3, dtype=torch.float64)
    for o in out.outputs:
        a, b, c = o.token_ids
        counts[(a * V + b) * V + c] += 1
    expected = _exact_joint(model, prompt, 3, 1.0, 0) * len(out.outputs)
    assert _chi_square_p(counts, expected) < 1e-3


def test_a_seed_gives_the_same_samples_whatever_the_batch(trained_model):
    prompts = mixed_prompts(5, seed=9, trained=True)
    sp = SamplingParams(temperature=0.8, max_tokens=16, ignore_eos=True, seed=7)
    llm = LLM(trained_model, speculative_config=spec(3))
    together = tokens(llm.generate(prompts, sp))
    alone = [tokens(llm.generate([p], sp))[0] for p in prompts]
    assert together == alone


# ---------------------------------------------------------------------- config and refusals
def test_bad_configs_are_refused_with_the_rule(random_model):
    with pytest.raises(ValueError, match="only 'mtp'"):
        EngineConfig(speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match=r"\[1, 16\]"):
        EngineConfig(speculative_config=spec(0))
    with pytest.raises(ValueError, match="unknown keys"):
        EngineConfig(speculative_config={"method": "mtp", "k": 2})
    with pytest.raises(ValueError, match="do not combine"):
        EngineConfig(compile=True, speculative_config=spec(2))
    dense = Transformer(preset("tiny-dense", vocab_size=VOCAB, num_hidden_layers=1)).eval()
    with pytest.raises(ValueError, match="has none"):
        LLM(dense, speculative_config=spec(2))
    assert EngineConfig(speculative_config={"method": "deepseek_mtp", "num_speculative_tokens": 2}) \
        .speculative_config.method == "mtp"


# ---------------------------------------------------------------------- the server's metrics
def test_server_exports_spec_decode_counters():
    import httpx
    import openai

    from qiusuo.engine import LLMEngine
    from qiusuo.model import build_model
    from qiusuo.serve import create_app
    from qiusuo.serve.server import ServerThread

    model, tok = build_model("tiny-moe", max_position_embeddings=256)
    engine = LLMEngine(model, tok, EngineConfig(kv_cache_bytes=8 << 20, num_threads=1, speculative_config=spec(2)))
    with ServerThread(create_app(engine, served_model_name="t")) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        r = client.completions.create(model="t", prompt="1+1=", max_tokens=9, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 9
        text = httpx.get(srv.url + "/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[-1]) for line in text.splitlines()
              if line.startswith("qiusuo:spec_decode")}
    assert values['qiusuo:spec_decode_num_drafts_total{model_name="t"}'] >= 1
    drafts = values['qiusuo:spec_decode_num_draft_tokens_total{model_name="t"}']
    accepted = values['qiusuo:spec_decode_num_accepted_tokens_total{model_name="t"}']
    assert drafts >= accepted >= 0
    per_pos = [values[f'qiusuo:spec_decode_num_accepted_tokens_per_pos_total{{model_name="t",position="{j}"}}']
               for j in range(2)]
    assert sum(per_pos) == accepted
