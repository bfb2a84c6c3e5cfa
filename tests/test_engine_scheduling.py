"""Engine scheduling spec: stop conditions finishing out of order, prefix sharing (on/off identical,
blocks really shared), preemption under a tiny KV budget, bad input, abort, streaming, the
live-module contract and checkpoint loading with the chat template.
"""

from __future__ import annotations

import pytest
import torch

from qiusuo.engine import LLM, EngineConfig, LLMEngine, SamplingParams
from qiusuo.model import save_model
from qiusuo.tokenizer import Tokenizer
from test_engine import full_forward_greedy, greedy, make_model, prompts

torch.set_num_threads(1)


def run_all(engine: LLMEngine) -> tuple[dict, list[str]]:
    final, order = {}, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
                order.append(out.request_id)
    return final, order


# ---------------------------------------------------------------------- stop conditions
def test_stop_conditions_finish_out_of_order():
    tok = Tokenizer.builtin()
    model = make_model("tiny-dense", seed=11, vocab=tok.vocab_size, eos_token_id=tok.eos_token_id)
    texts = ["the quick brown fox", "jumps over", "the lazy dog and then some more words", "hi"]
    free = LLM(model, tok).generate(texts, greedy(40))
    ref_ids = [o.outputs[0].token_ids for o in free]
    ref_text = [o.outputs[0].text for o in free]
    assert ref_text[0] == tok.decode(ref_ids[0], skip_special_tokens=True)

    engine = LLMEngine(model, tok)
    stop_str = ref_text[2][6:8]  # a string the free run produces
    cut = ref_text[2].find(stop_str)
    engine.add_request("long", texts[0], greedy(40))
    engine.add_request("short", texts[1], greedy(3))
    engine.add_request("stop-str", texts[2], greedy(40, stop=[stop_str, "never-appears"]))
    engine.add_request("stop-id", texts[3], greedy(40, stop_token_ids=[ref_ids[3][4]]))
    final, order = run_all(engine)
    assert order[-1] == "long" and order[0] == "short"

    assert final["long"].outputs[0].token_ids == ref_ids[0]
    assert final["long"].outputs[0].finish_reason == "length"
    short = final["short"].outputs[0]
    assert short.token_ids == ref_ids[1][:3] and short.finish_reason == "length"
    s = final["stop-str"].outputs[0]
    assert s.finish_reason == "stop" and s.stop_reason == stop_str
    assert s.text == ref_text[2][:cut] and stop_str not in s.text
    first = ref_ids[3].index(ref_ids[3][4])
    i = final["stop-id"].outputs[0]
    assert i.token_ids == ref_ids[3][: first + 1] and i.finish_reason == "stop" and i.stop_reason == ref_ids[3][4]


def test_eos_stops_unless_ignored():
    tok = Tokenizer.builtin()
    model = make_model("tiny-dense", seed=12, vocab=tok.vocab_size)
    ids = LLM(model, tok).generate("abc", greedy(20))[0].outputs[0].token_ids
    model.config.eos_token_id = ids[5]  # the engine reads eos ids from the config and the tokenizer
    out = LLM(model, tok).generate("abc", SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    assert out.token_ids == ids[: ids.index(ids[5]) + 1] and out.finish_reason == "stop"
    assert LLM(model, tok).generate("abc", greedy(20))[0].outputs[0].token_ids == ids


# ---------------------------------------------------------------------- prefix sharing
@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe"])
def test_prefix_sharing_on_off_identical(name):
    model = make_model(name, seed=13)
    base = prompts(1, lo=40, hi=41, seed=14)[0]
    batch = [base, base[:35] + [5, 6, 7], base, prompts(1, seed=15)[0]]
    params = [SamplingParams(n=3, temperature=1.0, max_tokens=20, ignore_eos=True, seed=s) for s in range(4)]
    on = LLM(model, block_size=8).generate(batch, params)
    off = LLM(model, block_size=8, enable_prefix_caching=False).generate(batch, params)
    assert [[o.token_ids for o in r.outputs] for r in on] == [[o.token_ids for o in r.outputs] for r in off]
    assert on[2].num_cached_tokens == 32 and off[2].num_cached_tokens == 0


def test_prefix_sharing_reuses_blocks():
    model = make_model("tiny-dense", seed=16)
    prompt = prompts(1, lo=40, hi=41, seed=17)[0]  # 40 tokens: 2 full shareable blocks of 16 + a tail of 8
    counts = {}
    for caching in (True, False):
        engine = LLMEngine(model, config=EngineConfig(enable_prefix_caching=caching))
        engine.add_request("g", prompt, SamplingParams(n=4, temperature=1.0, max_tokens=4, seed=0))
        engine.step()  # prefill of all 4 samples in one forward
        counts[caching] = engine.block_manager.num_used_blocks
        cached = [s.num_cached_tokens for s in engine._groups["g"].seqs]
        if caching:
            assert cached == [0, 32, 32, 32]
        run_all(engine)
        assert engine.block_manager.num_used_blocks == 0
        if caching:  # a later request with the same prompt finds the freed-but-cached blocks
            engine.add_request("again", prompt, greedy(2))
            engine.step()
            assert engine._groups["again"].seqs[0].num_cached_tokens == 32
    assert counts == {True: 2 + 4 * 1, False: 4 * 3}


# ---------------------------------------------------------------------- preemption
@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe"])
def test_tiny_kv_budget_preempts_and_completes(name):
    model = make_model(name, seed=18, max_position_embeddings=64)
    batch = prompts(6, lo=5, hi=15, seed=19)
    params = greedy(40)
    big = LLM(model).generate(batch, params)
    bytes_per_block = 4 * LLMEngine(model).kv_cache_bytes_per_token
    llm = LLM(model, block_size=4, kv_cache_bytes=20 * bytes_per_block)  # 80 slots for 6 x ~50 tokens
    small = llm.generate(batch, params)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert llm.llm_engine.block_manager.num_used_blocks == 0
    for a, b in zip(big, small):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert all(len(o.outputs[0].token_ids) == 40 for o in small)


def test_budget_smaller_than_one_sequence_is_rejected():
    model = make_model("tiny-dense")
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        LLMEngine(model, config=EngineConfig(kv_cache_bytes=1024))


# ---------------------------------------------------------------------- bad input, abort
BAD = [
    ([], {}, "empty"),
    (list(range(3, 131)), {}, "context"),
    ([5, 6], {"max_tokens": 0}, "max_tokens"),
    ([5, 6], {"top_p": 0.0}, "top_p"),
    ([5, 6], {"top_p": 1.5}, "top_p"),
    ([5, 6], {"temperature": -0.1}, "temperature"),
    ([5, 6], {"n": 0}, "n="),
    ([5, 10_000], {}, "token ids"),
]


def test_bad_input_raises_and_engine_keeps_serving():
    model = make_model("tiny-dense", seed=20)
    engine = LLMEngine(model)
    good = prompts(1, seed=21)[0]
    engine.add_request("good", good, greedy(10))
    engine.step()
    for i, (prompt, kw, match) in enumerate(BAD):
        with pytest.raises(ValueError, match=match):
            engine.add_request(f"bad{i}", prompt, SamplingParams(**kw) if kw else greedy(4))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("good", good, greedy(4))
    final, _ = run_all(engine)
    assert list(final) == ["good"]
    assert final["good"].outputs[0].token_ids == full_forward_greedy(model, good, 10)
    llm = LLM(model)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([good, []], greedy(4))
    assert not llm.llm_engine.has_unfinished_requests()  # all or nothing
    assert llm.generate([good], greedy(10))[0].outputs[0].token_ids == final["good"].outputs[0].token_ids


def test_abort_frees_blocks():
    model = make_model("tiny-dense", seed=22)
    engine = LLMEngine(model, config=EngineConfig(block_size=4, enable_prefix_caching=False))
    a, b = prompts(2, lo=10, hi=11, seed=23)
    engine.add_request("a", a, greedy(30))
    engine.add_request("b", b, greedy(30))
    for _ in range(5):
        engine.step()
    used = engine.block_manager.num_used_blocks
    assert used == 2 * 4  # 15 tokens each -> 4 blocks of 4
    engine.abort_request("a")
    assert engine.block_manager.num_used_blocks == 4
    assert all(out.request_id == "b" for out in engine.step())
    engine.abort_request(["b", "unknown"])
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished_requests()


# ---------------------------------------------------------------------- streaming, live module, checkpoints
def test_streaming_deltas_add_up():
    tok = Tokenizer.builtin()
    model = make_model("tiny-dense", seed=24, vocab=tok.vocab_size)
    llm = LLM(model, tok)
    params = SamplingParams(temperature=0.8, max_tokens=30, seed=3, ignore_eos=True, stop=["zz"])
    chunks = list(llm.stream("stream me", params))
    last = chunks[-1].outputs[0]
    assert chunks[-1].finished and not any(c.finished for c in chunks[:-1])
    assert "".join(c.outputs[0].delta_text for c in chunks) == last.text
    assert sum((c.outputs[0].delta_token_ids for c in chunks), []) == last.token_ids
    assert last.token_ids == llm.generate("stream me", params)[0].outputs[0].token_ids
    gen = llm.stream("stop early", params)
    next(gen)
    gen.close()  # the consumer went away: the request is aborted, its blocks freed
    assert not llm.llm_engine.has_unfinished_requests() and llm.llm_engine.block_manager.num_used_blocks == 0


def test_live_module_not_copied_and_mode_restored():
    model = make_model("tiny-moe", seed=25)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    llm = LLM(model)
    assert llm.llm_engine.model is model
    out = llm.generate([[5, 6, 7]], greedy(5))[0].outputs[0].token_ids
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(-1)  # the trainer updates its weights ...
    assert llm.generate([[5, 6, 7]], greedy(5))[0].outputs[0].token_ids != out  # ... the engine sees them


def test_checkpoint_dir_and_chat(tmp_path):
    tok = Tokenizer.builtin()
    model = make_model("tiny-moe", seed=26, vocab=tok.vocab_size, eos_token_id=tok.eos_token_id)
    save_model(model, tok, tmp_path / "ck")
    llm = LLM(tmp_path / "ck")
    messages = [{"role": "user", "content": "What is 2+2?"}]
    out = llm.chat(messages, greedy(8))[0]
    assert out.prompt_token_ids == tok.encode(tok.apply_chat_template(messages))
    assert out.outputs[0].token_ids == full_forward_greedy(model, out.prompt_token_ids, 8)
    assert len(llm.chat([messages, messages], greedy(2))) == 2


# ---------------------------------------------------------------------- prefill grouping
def test_length_groups_minimise_padding_plus_overhead():
    from itertools import combinations

    from qiusuo.engine.model_runner import length_groups

    def cost(lens, sizes, overhead):
        total, a = 0, 0
        for s in sizes:
            total += overhead + s * lens[a]
            a += s
        return total

    def brute(lens, overhead):  # every way to cut the sorted list into contiguous groups
        n = len(lens)
        return min(cost(lens, [b - a for a, b in zip((0, *cuts), (*cuts, n))], overhead)
                   for k in range(n) for cuts in combinations(range(1, n), k))

    for lens, overhead in [([64, 63, 10, 9, 8], 64), ([64, 8, 8, 8, 8, 8, 8, 8], 16), ([5, 5, 5], 64),
                           ([40, 39, 38, 12, 11, 3], 0), ([30], 64)]:
        sizes = length_groups(lens, overhead)
        assert sum(sizes) == len(lens)
        assert cost(lens, sizes, overhead) == brute(lens, overhead), (lens, overhead, sizes)
    assert length_groups([5, 5, 5], 0) == [3]  # equal lengths are never split
