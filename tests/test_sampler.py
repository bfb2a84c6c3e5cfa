"""The sampler's logits-processor path: no copy of the batch when no processor changes a row, and
the same tokens and logprobs as applying the processors to a copy (the sampler before it edited
the runner's logits in place)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qiusuo.engine import SamplingParams
from qiusuo.engine.reasoning import ThinkingBudget
from qiusuo.engine.sampler import Sampler, apply_logits_processors
from qiusuo.engine.sequence import Sequence

V = 1000
THINK, END_THINK = 5, 6


def make_seq(b: int, params: SamplingParams, outputs: list[int]) -> Sequence:
    seq = Sequence(b, str(b), 0, [1, 2, 3], params, seed=100 + b, eos_token_ids=frozenset(),
                   max_model_len=64, decoder=None)
    for t in outputs:
        seq.append_token(t)
    return seq


class OpShapes(TorchDispatchMode):
    """Every ATen op run inside, with the shapes of its tensor outputs."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.ops.append((str(func), tuple(t.shape)))
        return out


def replace_row(ids, logits):  # returns a new row: token 7 only, once 2 tokens are out
    if len(ids) < 2:
        return logits
    forced = torch.full_like(logits, float("-inf"))
    forced[7] = 0.0
    return forced


def edit_in_place(ids, logits):  # vLLM-style: ban token ids 0..9 in place
    logits[:10] = float("-inf")
    return logits


def unchanged(ids, logits):
    return logits


def budget(n: int) -> ThinkingBudget:
    return ThinkingBudget(n, THINK, END_THINK, opened_by_prompt=True)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_processors_that_change_nothing_copy_nothing(temperature):
    """A thinking budget that has not run out (every chat request carries one) and an identity
    processor: no op makes a (B, V) tensor on the greedy path, no clone or copy_ on either, and the
    runner's logits are sampled from as they are."""
    B = 16
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    params = [SamplingParams(temperature=temperature, seed=1, logits_processors=[budget(1000), unchanged]),
              SamplingParams(temperature=temperature, seed=2)]
    seqs = [make_seq(b, params[b % 2], [11, 12, 13]) for b in range(B)]
    assert apply_logits_processors(logits, seqs) == 0
    with OpShapes() as mode:
        out = Sampler()(logits, seqs)
    names = {name for name, _ in mode.ops}
    assert not names & {"aten.clone.default", "aten.copy_.default"}, names  # (the noise is cast with _to_copy)
    if temperature == 0:
        assert not [op for op in mode.ops if op[1] == (B, V)], mode.ops
        assert out.token_ids == before.argmax(-1).tolist()
    torch.testing.assert_close(logits, before, rtol=0, atol=0)  # nothing edited


def reference(logits: torch.Tensor, seqs: list[Sequence]):
    """The sampler before this change: processors applied row by row to a clone, then sampled."""
    logits = logits.clone()
    for b, seq in enumerate(seqs):
        for proc in seq.params.logits_processors:
            logits[b] = proc(seq.output_token_ids, logits[b].clone())
    plain = [make_seq(s.seq_id, dataclasses.replace(s.params, logits_processors=[]), s.output_token_ids)
             for s in seqs]
    for s, p in zip(seqs, plain):
        p.seed = s.seed
    return Sampler()(logits, plain)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_processors_that_change_rows_give_the_tokens_and_logprobs_of_a_copy(temperature):
    """Rows replaced, edited in place, forced to `</think>` by a spent budget, left alone, or with
    no processor: the in-place sampler's tokens and logprobs equal the copying sampler's."""
    procs = [[replace_row], [edit_in_place], [budget(2)], [budget(50), unchanged], [], [edit_in_place, replace_row]]
    seqs = []
    for b in range(12):
        p = SamplingParams(temperature=temperature, seed=7, top_k=50 if b % 3 == 0 else 0,
                           top_p=0.9 if b % 4 == 1 else 1.0, logprobs=2, logits_processors=procs[b % len(procs)])
        seqs.append(make_seq(b, p, [20, 21, 22][: b % 4]))
    logits = torch.randn(12, V, generator=torch.Generator().manual_seed(3)) * 3
    want = reference(logits, seqs)
    got = Sampler()(logits.clone(), seqs)
    assert got.token_ids == want.token_ids
    assert got.logprobs == want.logprobs
    assert got.top_logprobs == want.top_logprobs
    forced = [b for b in range(12) if b % 6 == 2 and len(seqs[b].output_token_ids) >= 2]
    assert forced and all(got.token_ids[b] == END_THINK for b in forced)
    with torch.inference_mode():  # as the engine runs it (inference tensors: no version counter)
        again = Sampler()(logits.clone(), seqs)
    assert again.token_ids == got.token_ids and again.top_logprobs == got.top_logprobs
    replaced = [b for b, s in enumerate(seqs) if replace_row in s.params.logits_processors
                and len(s.output_token_ids) >= 2] + forced
    assert apply_logits_processors(logits.clone(), seqs) == len(replaced)


def test_a_processor_returning_a_wrong_shape_is_named():
    def bad(ids, logits):
        return logits[:-1].clone()

    seqs = [make_seq(0, SamplingParams(temperature=0, logits_processors=[bad]), [])]
    with pytest.raises(ValueError, match="bad.*shape"):
        Sampler()(torch.randn(1, V), seqs)


@pytest.mark.parametrize("vocab_size", [1, 5, 37, 151_936])
def test_int32_noise_is_the_int64_hash_bit_for_bit(vocab_size):
    """The sampler's noise runs on int32 bits (wrapping multiplies, masked shifts); any drift from
    the int64 hash would change every seeded sample. Seeds span the whole int64 range used."""
    from qiusuo.engine.sampler import uniform_noise, uniform_noise_reference

    g = torch.Generator().manual_seed(0)
    seeds = torch.cat([torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1]),
                       torch.randint(0, 2**63 - 1, (9,), generator=g)])
    counters = torch.tensor([0, 1, 2, 3, 7, 100, 4095, 2**20, 2**31, 2**32 + 5, 9, 10, 11, 12, 13, 14])
    got = uniform_noise(seeds, counters, vocab_size)
    want = uniform_noise_reference(seeds, counters, vocab_size)
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want)
    assert 0 < got.min() and got.max() < 1
