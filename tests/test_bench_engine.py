"""bench/engine.py's accounting: the FLOP count's parameters ignore the MTP layers (run only in
training, never subtracted twice), and transformers' static-batch sweep covers one batch of everything."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import engine  # noqa: E402
from qiusuo.model import Transformer, preset  # noqa: E402


def test_matmul_parameters_ignore_the_mtp_layers():
    with_mtp = Transformer(preset("tiny-moe", vocab_size=64))
    without = Transformer(preset("tiny-moe", vocab_size=64, num_nextn_predict_layers=0))
    assert len(with_mtp.mtp) == 1 and len(without.mtp) == 0
    assert engine.matmul_parameters(with_mtp) == engine.matmul_parameters(without)
    cfg = without.config  # all parameters but the embedding lookup, less the routed experts a token skips
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    skipped = moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    tied_head = without.output_weight.numel() if without.lm_head is None else 0
    expected = without.num_parameters() - without.model.embed_tokens.weight.numel() - skipped + tied_head
    assert engine.matmul_parameters(without) == expected


def test_static_sweep_ends_with_one_batch_of_everything():
    assert engine.static_sweep(16) == [32]
    assert engine.static_sweep(48) == [32, 64]
    assert engine.static_sweep(256) == [32, 64, 128, 256]
    assert engine.static_sweep(300) == [32, 64, 128, 256]
