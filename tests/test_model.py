"""The model spec: parity with transformers both ways, the fast MoE equals the per-expert oracle,
balancing works, MTP trains the trunk, checkpoints round-trip bit-exactly and fail loudly."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import randomize_

from qiusuo.model import DynamicCache, ModelConfig, Transformer, preset
from qiusuo.model.checkpoint import load_model, read_safetensors, save_model
from qiusuo.model.moe import MoE

transformers = pytest.importorskip("transformers")

VOCAB = 300


def hf_config(arch: str, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "qwen2":
        return transformers.Qwen2Config(**{**common, "num_key_value_heads": 2, "tie_word_embeddings": True, **overrides})
    if arch == "llama":
        return transformers.LlamaConfig(**{**common, "num_key_value_heads": 2, "tie_word_embeddings": False,
                                           "attention_bias": True, **overrides})
    return transformers.DeepseekV3Config(**{
        **common, "num_key_value_heads": 4, "moe_intermediate_size": 32, "q_lora_rank": 48,
        "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "n_shared_experts": 1, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2,
        "topk_group": 1, "first_k_dense_replace": 1, "routed_scaling_factor": 2.5,
        "norm_topk_prob": True, "rope_interleave": True, "tie_word_embeddings": False, **overrides})


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


CASES = [("qwen2", {}), ("llama", {}), ("deepseek_v3", {}), ("deepseek_v3", {"q_lora_rank": None})]


@pytest.mark.parametrize("arch,overrides", CASES, ids=["qwen2", "llama", "deepseek_v3", "deepseek_v3-no-q-lora"])
def test_loads_transformers_checkpoint(tmp_path, arch, overrides):
    hf = transformers.AutoModelForCausalLM.from_config(hf_config(arch, **overrides)).eval()
    randomize_(hf)
    hf.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(ids) - hf_logits(hf, ids)).abs().max().item()
    assert diff < 1e-4, f"{arch}: max |logit diff| = {diff}"


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe"])
def test_transformers_loads_our_checkpoint(tmp_path, name):
    model = Transformer(preset(name, vocab_size=VOCAB)).eval()
    randomize_(model, seed=3)
    save_model(model, None, tmp_path / "ck")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    ids = torch.randint(0, VOCAB, (3, 21), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (model(ids) - hf_logits(hf, ids)).abs().max().item()
    assert diff < 1e-4, f"{name}: max |logit diff| = {diff}"


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe"])
def test_save_load_round_trip_is_bit_exact(tmp_path, name):
    model = Transformer(preset(name, vocab_size=VOCAB))
    randomize_(model, seed=4)
    save_model(model, None, tmp_path / "ck", max_shard_bytes=400_000)  # forces shards
    assert (tmp_path / "ck" / "model.safetensors.index.json").exists()
    loaded, _ = load_model(tmp_path / "ck")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bf16_checkpoint_loads(tmp_path):
    hf = transformers.AutoModelForCausalLM.from_config(hf_config("deepseek_v3")).eval()
    randomize_(hf)
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    # Both sides upcast the same bf16 weights to fp32 (rounding can flip a near-tie expert choice,
    # so the reference is transformers on the bf16 checkpoint, not the fp32 original).
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    model, _ = load_model(tmp_path)
    with torch.no_grad():
        assert (model(ids) - hf_logits(ref_model, ids)).abs().max() < 1e-4
    model16, _ = load_model(tmp_path, dtype=None)
    assert model16.dtype == torch.bfloat16
    assert model16.moe_layers()[0].gate.e_score_correction_bias.dtype == torch.float32


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe"])
def test_kv_cache_decode_equals_full_forward(name):
    model = Transformer(preset(name, vocab_size=VOCAB)).eval()
    randomize_(model, seed=5)
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        full = model(ids)
        cache = DynamicCache()
        parts = [model(ids[:, :10], cache=cache)]
        parts.append(model(ids[:, 10:13], positions=torch.arange(10, 13).expand(2, 3), cache=cache))
        for t in range(13, 24):
            parts.append(model(ids[:, t : t + 1], positions=torch.full((2, 1), t), cache=cache))
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-4


def test_fast_moe_equals_per_expert_oracle():
    model = Transformer(preset("tiny-moe", vocab_size=VOCAB, n_routed_experts=8, num_experts_per_tok=3,
                               n_group=2, topk_group=2)).eval()
    randomize_(model, seed=6)
    ids = torch.randint(0, VOCAB, (4, 19))
    with torch.no_grad():
        fast = model.hidden_states(ids)
        oracle = model.hidden_states(ids, reference_moe=True)
    assert (fast - oracle).abs().max() < 1e-5
    # and gradients agree
    moe = model.moe_layers()[0].train()
    x = torch.randn(2, 7, model.config.hidden_size, requires_grad=True)
    g1 = torch.autograd.grad(moe(x).square().sum(), [x, moe.experts.gate_up_proj])
    g2 = torch.autograd.grad(moe(x, reference=True).square().sum(), [x, moe.experts.gate_up_proj])
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() < 1e-5


def test_bias_update_balances_a_skewed_router():
    torch.manual_seed(0)
    cfg = preset("tiny-moe", vocab_size=VOCAB, n_group=1, topk_group=1)
    moe = MoE(cfg).train()
    randomize_(moe)
    with torch.no_grad():
        moe.gate.weight[:2] += 0.1  # with inputs sharing a mean direction, experts 0 and 1 win
    x = torch.randn(8, 32, cfg.hidden_size) + 0.5

    def load_ratio():
        with torch.no_grad():
            moe(x)
        load = moe.expert_load.clone()
        moe.expert_load.zero_()
        return (load.max() / load.mean()).item()

    before = load_ratio()
    for _ in range(200):
        with torch.no_grad():
            moe(x)
        moe.update_bias(gamma=0.01)
    after = load_ratio()
    assert before > 2.5, before
    assert after < 1.5 and after < before / 2, (before, after)


def test_router_load_stats_skip_layers_that_saw_no_tokens():
    """A forward without the MTP loss (GRPO's log-probs) routes no token through the MTP head's MoE:
    the reported max/mean load is the trunk's, not pulled down by that layer's 0 / 0."""
    model = Transformer(preset("tiny-moe", vocab_size=VOCAB)).train()
    assert len(model.moe_layers()) == 4 and len(model.mtp) == 1  # MoE in trunk layers 1-3 and the MTP head
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (2, 16)))  # the trunk only
    trunk = [m.expert_load.clone() for m in model.moe_layers()[:3]]
    assert all(x.sum() > 0 for x in trunk) and model.moe_layers()[3].expert_load.sum() == 0
    stats = model.update_router_bias()
    ratios = [float(x.max() / x.mean()) for x in trunk]
    assert stats["moe_load_max_over_mean"] == pytest.approx(sum(ratios) / 3)
    assert stats["moe_load_worst"] == pytest.approx(max(ratios))
    assert model.update_router_bias() == {}  # nothing routed since the last update


def test_sequence_balance_loss_is_differentiable():
    model = Transformer(preset("tiny-moe", vocab_size=VOCAB, aux_loss_alpha=1e-2)).train()
    out = model.compute_loss(torch.randint(0, VOCAB, (2, 12)))
    assert out.aux_loss is not None and out.aux_loss > 0
    out.aux_loss.backward()
    assert model.moe_layers()[0].gate.weight.grad.abs().sum() > 0


def test_mtp_loss_is_finite_and_reaches_the_trunk():
    model = Transformer(preset("tiny-moe", vocab_size=VOCAB)).train()
    out = model.compute_loss(torch.randint(0, VOCAB, (2, 16)))
    assert out.mtp_loss is not None and torch.isfinite(out.mtp_loss)
    out.mtp_loss.backward()
    trunk = model.model.layers[0].self_attn.kv_a_proj_with_mqa.weight.grad
    assert trunk is not None and trunk.abs().sum() > 0


def test_loss_mask_selects_targets():
    model = Transformer(preset("tiny-dense", vocab_size=VOCAB)).eval()
    ids = torch.randint(0, VOCAB, (1, 8))
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 5:] = True
    out = model.compute_loss(ids, mask)
    with torch.no_grad():
        logp = model(ids)[0, :-1].log_softmax(-1)
    expected = -logp[torch.arange(4, 7), ids[0, 5:]].mean()
    assert torch.allclose(out.lm_loss, expected, atol=1e-5)
    assert out.num_tokens == 3


# ---------------------------------------------------------------------- bad input
def _saved(tmp_path, name="tiny-moe"):
    model = Transformer(preset(name, vocab_size=VOCAB))
    return save_model(model, None, tmp_path / "ck")


def _rewrite_weights(path, edit):
    from safetensors.torch import save_file

    tensors = read_safetensors(path)
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_and_unexpected_weights_are_listed(tmp_path):
    ck = _saved(tmp_path)
    _rewrite_weights(ck, lambda t: (t.pop("model.norm.weight"), t.__setitem__("model.extra.weight", torch.zeros(2))))
    with pytest.raises(ValueError, match=r"missing weights: model\.norm\.weight.*unexpected weights: model\.extra\.weight"):
        load_model(ck)


def test_missing_expert_is_named(tmp_path):
    ck = _saved(tmp_path)
    _rewrite_weights(ck, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        load_model(ck)


def test_unknown_model_type_names_the_field(tmp_path):
    ck = _saved(tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type='mamba'"):
        load_model(ck)


@pytest.mark.parametrize("field,value,match", [
    ("hidden_size", 96, r"has shape .* config\.json implies"),
    ("n_group", 3, "n_routed_experts=8 must be divisible by n_group=3"),
    ("num_key_value_heads", 2, "num_key_value_heads must equal num_attention_heads"),
])
def test_inconsistent_config_names_the_problem(tmp_path, field, value, match):
    ck = _saved(tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    cfg[field] = value
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        load_model(ck)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    ck = _saved(tmp_path)
    f = ck / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(ck)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_save_is_atomic(tmp_path, monkeypatch):
    from qiusuo.model import checkpoint

    model = Transformer(preset("tiny-dense", vocab_size=VOCAB))
    ck = save_model(model, None, tmp_path / "ck")
    before = read_safetensors(ck)

    def crash(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "_write_weights", crash)
    randomize_(model, seed=9)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(model, None, ck)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(model, None, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no partial dirs, old one intact
    after = read_safetensors(ck)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_config_mistakes_fail_with_the_fix():
    with pytest.raises(ValueError, match="num_experts_per_tok=9"):
        ModelConfig(model_type="deepseek_v3", n_routed_experts=8, num_experts_per_tok=9, n_group=1)
    with pytest.raises(ValueError, match="rope_scaling"):
        ModelConfig(rope_scaling={"rope_type": "yarn", "factor": 4})
    with pytest.raises(ValueError, match="preset"):
        preset("huge")
