"""Hostile model files: a malformed config.json or a model.safetensors.index.json pointing outside
the checkpoint is a ValueError naming the field or entry, before anything is allocated or read.
(Kept apart from test_model.py, which needs transformers.)"""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("field, value, message", [
    ("num_hidden_layers", 100000, r"num_hidden_layers=100000 must be in \[1, 1024\]"),
    ("hidden_size", 0, r"hidden_size=0 must be in"),
    ("vocab_size", -5, r"vocab_size=-5 must be in"),
    ("intermediate_size", "352", r"intermediate_size='352' must be an integer"),
    ("num_attention_heads", 4.0, r"num_attention_heads=4.0 must be an integer"),
    ("tie_word_embeddings", 1, r"tie_word_embeddings=1 must be true or false"),
    ("hidden_size", True, r"hidden_size=True must be an integer"),
    ("rms_norm_eps", -1e-6, r"rms_norm_eps=-1e-06 must be positive"),
    ("eos_token_id", "2", r"eos_token_id='2' must be an integer or a list of integers or null"),
    ("max_position_embeddings", 10**12, r"max_position_embeddings=1000000000000 must be in"),
])
def test_malformed_config_json_names_the_field_before_allocating(tmp_path, field, value, message):
    from qiusuo.model.config import ModelConfig, PRESETS

    d = {**PRESETS["tiny-dense"], "vocab_size": 64, field: value}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        ModelConfig.from_json(path)


def test_index_weight_map_must_stay_inside_the_checkpoint(tmp_path):
    from qiusuo.model import build_model, load_model, save_model
    from qiusuo.model.checkpoint import INDEX_NAME

    model, tokenizer = build_model("tiny-dense", seed=0)
    ckpt = save_model(model, tokenizer, tmp_path / "ckpt", max_shard_bytes=200_000)
    index = json.loads((ckpt / INDEX_NAME).read_text())
    outside = tmp_path / "outside.safetensors"
    first = sorted(set(index["weight_map"].values()))[0]
    outside.write_bytes((ckpt / first).read_bytes())
    (ckpt / "link.safetensors").symlink_to(outside)
    for entry in (str(outside), "../outside.safetensors", "link.safetensors", "sub/../../outside.safetensors"):
        bad = {**index, "weight_map": {k: entry if v == first else v for k, v in index["weight_map"].items()}}
        (ckpt / INDEX_NAME).write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="is not a file inside the checkpoint directory"):
            load_model(ckpt)
    (ckpt / INDEX_NAME).write_text(json.dumps(index))
    load_model(ckpt)  # the honest index still loads
