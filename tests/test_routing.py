"""Routing figures of an MoE model (qiusuo/eval/routing.py): expert-load balance and routing change."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import randomize_

from qiusuo.eval.routing import describe_routing, greedy_rows, load_balance, routed_experts, routing_change, routing_report
from qiusuo.model import Transformer, preset

VOCAB = 50


def _moe(seed: int = 0) -> Transformer:
    model = Transformer(preset("tiny-moe", vocab_size=VOCAB))  # 4 layers, the first dense: MoE in 1, 2, 3
    randomize_(model, seed)
    return model.eval()


def _rows(B: int = 4, S: int = 12):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (B, S), generator=g)
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[:, 5:] = True
    mask[0, 9:] = False  # a shorter row: its padding never counts
    return ids, mask


def _force(model: Transformer, layer: int, experts: tuple[int, int]) -> None:
    """Bias MoE layer `layer` (0-based among MoE layers) so that every token picks exactly `experts`
    (both in one group of the 2, so the group-limited top-k keeps them)."""
    with torch.no_grad():
        bias = model.moe_layers()[layer].gate.e_score_correction_bias
        bias.zero_()
        bias[list(experts)] = 100.0


def test_identical_models_route_identically():
    model, (ids, mask) = _moe(), _rows()
    a, b = routed_experts(model, ids, mask), routed_experts(copy.deepcopy(model), ids, mask)
    assert len(a) == 3 and all(x.shape == (int(mask.sum()), 2) for x in a)
    assert routing_change(a, b) == [0.0, 0.0, 0.0]
    assert all(1.0 <= r <= 4.0 for r in load_balance(a, 8))  # between even and all-on-K-of-E


def test_a_known_bias_change_moves_exactly_that_layer():
    base, (ids, mask) = _moe(), _rows()
    _force(base, 2, (0, 1))
    tuned = copy.deepcopy(base)
    _force(tuned, 2, (2, 3))  # the last MoE layer now sends every token to {2, 3} instead of {0, 1}
    a, b = routed_experts(base, ids, mask), routed_experts(tuned, ids, mask)
    assert routing_change(a, b) == [0.0, 0.0, 1.0]  # the layers before it see the same inputs
    assert torch.equal(b[2], torch.tensor([[2, 3]]).expand(int(mask.sum()), 2))
    assert load_balance(a, 8)[2] == load_balance(b, 8)[2] == 4.0  # all N tokens on 2 of 8: max/mean = 8/2

    half = copy.deepcopy(base)  # a set that shares one expert still counts as changed; order never does
    _force(half, 2, (1, 0))
    assert routing_change(a, routed_experts(half, ids, mask)) == [0.0, 0.0, 0.0]
    _force(half, 2, (0, 2))
    assert routing_change(a, routed_experts(half, ids, mask)) == [0.0, 0.0, 1.0]

    early = copy.deepcopy(base)  # a change in an earlier layer moves its own routing, and may move later ones
    _force(early, 0, (4, 5))
    changed = routing_change(a, routed_experts(early, ids, mask))
    assert changed[0] > 0 and changed[1] > 0


def test_routing_counts_only_marked_tokens_and_restores_the_mode():
    model, (ids, mask) = _moe().train(), _rows()
    before = [m.expert_load.clone() for m in model.moe_layers()]
    full = routed_experts(model, ids, torch.ones_like(mask))
    part = routed_experts(model, ids, mask)
    assert model.training  # put back as it was
    assert all(torch.equal(m.expert_load, x) for m, x in zip(model.moe_layers(), before))  # no load counted
    flat = mask.reshape(-1)
    assert all(torch.equal(p, f[flat]) for p, f in zip(part, full))


def test_routing_report_and_greedy_rows_on_a_live_engine():
    from qiusuo.engine import LLM
    from qiusuo import tasks
    from qiusuo.tokenizer import Tokenizer

    tok = Tokenizer.builtin()
    model = Transformer(preset("tiny-moe", vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    randomize_(model, 0)
    model.eval()
    task = tasks.get("arithmetic")
    problems = task.generate(3, seed=0, split="test")
    ids, mask = greedy_rows(LLM(model=model, tokenizer=tok), task, problems, max_tokens=6)
    assert ids.shape[0] == 3 and 3 <= int(mask.sum()) <= 18 and not mask[:, 0].any()  # completions only
    tuned = copy.deepcopy(model)
    _force(tuned, 2, (4, 5))
    report = routing_report(model, tuned, (ids, mask), (ids, mask))
    assert report["moe_layers"] == [1, 2, 3] and report["tokens"] == {"before": int(mask.sum()),
                                                                    "after": int(mask.sum())}
    assert report["changed_on_before"][:2] == [0.0, 0.0] and report["balance_after"][2] == 4.0
    text = describe_routing(report)
    assert "(MoE layers 1 / 2 / 3)" in text and "/ 4.00 (1.00 is even, 4.00 all on K experts)" in text, text


def test_a_dense_model_has_no_routing_to_measure():
    model = Transformer(preset("tiny-dense", vocab_size=VOCAB))
    ids, mask = _rows()
    with pytest.raises(ValueError, match="no MoE layers"):
        routed_experts(model, ids, mask)
