"""LoRA: the adapter layer, its targets, PEFT's layout read back by the real `peft` on the transformers
model, and LoRA through the training stages (rollouts merged, reference = base, resume, final/)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import DigitsTask, randomize_

from qiusuo.model import Transformer, load_model, preset, save_model
from qiusuo.model import lora

torch.set_num_threads(1)
VOCAB = 300


def tiny(name="tiny-dense", seed=1, **kw):
    model = Transformer(preset(name, vocab_size=VOCAB, num_hidden_layers=2, **kw)).eval()
    randomize_(model, seed=seed)
    return model


def randomize_adapters_(model, seed=7, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_layers(model):
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * std)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


IDS = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------ the layer
def test_fresh_adapter_changes_nothing_and_only_adapters_train():
    model = tiny()
    with torch.no_grad():
        before = model(IDS)
    base_weight = model.model.layers[0].self_attn.q_proj.weight
    spec = lora.apply_lora(model, r=4, alpha=8)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, lora.LoRALinear) and q.weight is base_weight  # adopted, not copied
    assert q.scaling == 2.0 and torch.all(q.lora_B.weight == 0) and q.lora_A.weight.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(model(IDS), before)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 7 == 2 * len(spec.module_names)  # 2 layers x 7 projections x (A, B)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in dict(model.named_parameters())
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()  # the base keeps its HF name


def test_lora_forward_is_base_plus_scaled_low_rank_update_and_merge_round_trips():
    model = tiny()
    lora.apply_lora(model, r=4, alpha=16)
    randomize_adapters_(model)
    layer = model.model.layers[1].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    expected = x @ layer.weight.T + 4.0 * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}
    with torch.no_grad():
        adapted = model(IDS)
        with lora.merged(model):
            assert layer.merged
            merged_out = model(IDS)
        with lora.disabled(model):
            torch.testing.assert_close(model(IDS), Transformer.forward(tiny(), IDS))
    assert not layer.merged
    torch.testing.assert_close(merged_out, adapted, atol=1e-5, rtol=0)
    # unmerge restores the base up to the merge's rounding: half an ulp of |W + delta| per element
    # (TRL merges and unmerges around every vLLM weight sync alike); everything else is untouched
    deltas = {f"{n}.weight": m.delta_weight().detach() for n, m in model.named_modules()
              if isinstance(m, lora.LoRALinear)}
    for n, p in model.named_parameters():
        if n in deltas:
            bound = (base[n].abs() + deltas[n].abs()) * 2 ** -23
            assert torch.all((p - base[n]).abs() <= bound), n
        elif n in base:
            assert torch.equal(p, base[n]), n


def test_merged_layers_refuse_to_train():
    model = tiny()
    lora.apply_lora(model, r=2, alpha=2)
    with lora.merged(model), pytest.raises(AssertionError, match="unmerge"):
        model(IDS)


def test_targets_default_and_named_and_refused():
    moe = tiny("tiny-moe")
    spec = lora.apply_lora(moe, r=2, alpha=4)
    names = spec.module_names
    assert "model.layers.0.mlp.gate_proj" in names  # the dense first layer's MLP
    assert "model.layers.1.mlp.shared_experts.down_proj" in names
    assert "model.layers.1.self_attn.kv_b_proj" in names and "model.layers.1.self_attn.o_proj" in names
    assert not any(n.startswith("mtp.") or ".gate." in n or n.endswith(".gate") for n in names)
    assert not isinstance(moe.lm_head, lora.LoRALinear)
    dense = tiny()
    assert lora.resolve_targets(dense, "q_proj, v_proj") == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    with pytest.raises(ValueError, match="no linear layer named qq_proj"):
        lora.resolve_targets(dense, "q_proj,qq_proj")
    with pytest.raises(ValueError, match="routed experts are stacked"):
        lora.resolve_targets(tiny("tiny-moe"), "experts")
    with pytest.raises(ValueError, match="names no module"):
        lora.resolve_targets(dense, " , ")
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.apply_lora(moe, r=2, alpha=4)


# ------------------------------------------------------------------ PEFT's layout, read by peft itself
MOE_ATTENTION = "q_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj"
PEFT_CASES = [
    ("tiny-dense", "all-linear"),
    ("tiny-moe", MOE_ATTENTION),
    # peft 0.21 on transformers 5 rewrites DeepSeek-V3 adapter targets named gate_proj/up_proj/down_proj into
    # the routed experts' stacked parameters (its v4 -> v5 MoE conversion, peft/utils/
    # transformers_weight_conversion.py), so adapters on the shared experts and dense MLPs do not load there.
    pytest.param("tiny-moe", "all-linear", marks=pytest.mark.xfail(
        strict=True, reason="peft re-targets DeepSeek-V3 MLP names to the routed experts on transformers 5")),
]


@pytest.mark.parametrize("name,targets", PEFT_CASES, ids=["dense", "moe-attention", "moe-all-linear"])
def test_peft_loads_our_adapter_on_the_transformers_model(tmp_path, name, targets):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = tiny(name, num_nextn_predict_layers=0) if name == "tiny-moe" else tiny(name)
    save_model(model, None, tmp_path / "base")
    lora.apply_lora(model, r=4, alpha=8, targets=targets)
    randomize_adapters_(model)
    lora.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in keys
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    # every module of ours, adapted by peft (peft 0.21 also wraps transformers 5's stacked routed experts
    # with zero-initialised adapters of its own, which add nothing: the logits below show it)
    adapted = {n.removeprefix("base_model.model.").removesuffix(".lora_A") for n, _ in peft_model.named_modules()
               if n.endswith(".lora_A") and ".experts" not in n}
    assert adapted == set(model.lora_spec.module_names)
    with torch.no_grad():
        ours, theirs = model(IDS), peft_model(IDS).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    # and our loader reads the adapter back onto a fresh base
    again, _ = load_model(tmp_path / "base")
    lora.load_adapter(again, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(again(IDS), ours, atol=1e-6, rtol=0)


def test_merge_adapter_is_one_call_and_bad_adapters_fail_loudly(tmp_path):
    model = tiny()
    save_model(model, None, tmp_path / "base")
    lora.apply_lora(model, r=2, alpha=4, targets="q_proj,down_proj")
    randomize_adapters_(model)
    lora.save_adapter(model, tmp_path / "adapter")
    out = lora.merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    merged, _ = load_model(out)  # a plain full checkpoint: strict load, no LoRA keys
    assert not lora.has_lora(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS), model(IDS), atol=1e-5, rtol=0)
    other, _ = load_model(tmp_path / "base")
    lora.apply_lora(other, r=3, alpha=4, targets="q_proj,down_proj")
    with pytest.raises(ValueError, match="does not match"):
        lora.load_adapter(other, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        lora.load_adapter(load_model(tmp_path / "base")[0], tmp_path / "adapter")


# ------------------------------------------------------------------ LoRA through the stages


def grpo(tmp_path, ckpt, name="run", **kw):
    from qiusuo.train.config import GRPOConfig
    from qiusuo.train.grpo import GRPO

    args = dict(model=str(ckpt), out=str(tmp_path / name), prompts_per_step=2, group_size=4, max_tokens=6,
                steps=2, lr=3e-3, threads=1, progress=False, lora_rank=4, lora_alpha=8.0)
    return GRPO(GRPOConfig(**{**args, **kw}), task=DigitsTask())


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe"])
def test_rollout_logprobs_equal_the_trainers_under_lora(tmp_path, make_checkpoint, name):
    """Rollouts decode with the adapters merged into the base (the engine's KV-cached decode; MLA's absorbed
    decode reads kv_b_proj.weight directly, so only a merge reaches it); the trainer computes log-probs through
    the unmerged LoRA layers. The two must agree per token within 1e-5, and differ from the base's."""
    from qiusuo.engine import SamplingParams
    from qiusuo.tasks.prompts import prompt_ids
    from qiusuo.train.objectives import completion_token_logprobs

    run = grpo(tmp_path, make_checkpoint(name, num_hidden_layers=2))
    randomize_adapters_(run.model, std=0.2)
    prompts = [prompt_ids(run.tokenizer, run.task, p) for p in run.task.generate(2, seed=3)]
    params = SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=5, logprobs=0)
    with lora.merged(run.model):
        outs = run.llm.generate(prompts, params)
    run.model.train()
    rows = [(list(r.prompt_token_ids), o) for r in outs for o in r.outputs]
    S = max(len(p) + len(o.token_ids) for p, o in rows)
    ids = torch.zeros(len(rows), S, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.bool)
    engine = torch.zeros(len(rows), S)
    for i, (p, o) in enumerate(rows):
        n = len(o.token_ids)
        ids[i, : len(p) + n] = torch.tensor(p + list(o.token_ids))
        mask[i, len(p): len(p) + n] = True
        engine[i, len(p): len(p) + n] = torch.tensor([lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)])
    with torch.no_grad():
        ours = completion_token_logprobs(run.model, ids, mask)[0]
        with lora.disabled(run.model):
            base = completion_token_logprobs(run.model, ids, mask)[0]
    assert mask.sum() > 20
    torch.testing.assert_close(ours, engine, atol=1e-5, rtol=0)
    assert (base - engine).abs().max() > 1e-3  # the adapter is in the rollouts


def test_grpo_lora_trains_adapters_only_and_saves_merged_final_and_peft_adapter(tmp_path, make_checkpoint):
    ckpt = make_checkpoint(num_hidden_layers=2)
    run = grpo(tmp_path, ckpt, steps=3)
    frozen = {n: p.detach().clone() for n, p in run.model.named_parameters() if ".lora_" not in n}
    assert {id(p) for g in run.trainer.optimizer.param_groups for p in g["params"]} == {
        id(p) for n, p in run.model.named_parameters() if ".lora_" in n}
    run.run()
    for n, p in run.model.named_parameters():  # the base is the parent's, to the merges' rounding
        if n in frozen:
            torch.testing.assert_close(p, frozen[n], atol=1e-6, rtol=0)
    assert any(float(m.lora_B.weight.detach().abs().sum()) > 0 for m in lora.lora_layers(run.model))  # it learned
    final = tmp_path / "run" / "final"
    assert (final / "adapter" / "adapter_config.json").is_file() and not (final / "adapter_config.json").exists()
    cfg = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(ckpt) and cfg["r"] == 4
    merged, _ = load_model(final)  # a plain checkpoint every later stage reads
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS % 40), run.model(IDS % 40), atol=1e-5, rtol=0)
    again = lora.merge_adapter(ckpt, final / "adapter", tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(load_model(again)[0](IDS % 40), merged(IDS % 40), atol=1e-5, rtol=0)
    step_ckpt = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    assert (step_ckpt / "adapter_model.safetensors").is_file() and not (step_ckpt / "model.safetensors").exists()


def test_grpo_lora_resume_equals_an_uninterrupted_run(tmp_path, make_checkpoint):
    ckpt = make_checkpoint(num_hidden_layers=2)
    straight = grpo(tmp_path, ckpt, "straight", steps=3)
    straight.run()
    first = grpo(tmp_path, ckpt, "split", steps=3)
    inner = first.train_step

    def stop_after_one(step):
        out = inner(step)
        first.trainer._stop_requested = step == 0
        return out

    first.train_step = stop_after_one
    assert first.run().status == "interrupted"
    second = grpo(tmp_path, ckpt, "split", steps=3, resume=True)
    assert second.run().step == 3
    a, b = lora.adapter_state_dict(straight.model), lora.adapter_state_dict(second.model)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)  # the merges round the base alike
    with pytest.raises(ValueError, match="lora"):
        grpo(tmp_path, ckpt, "split", steps=4, resume=True, lora_rank=0).run()


def test_lora_reference_policy_is_the_base_without_a_copy(tmp_path, make_checkpoint):
    """beta > 0 under LoRA: no deepcopy; the reference log-probs are the base checkpoint's own."""
    from qiusuo.train.data import pad_rows
    from qiusuo.train.objectives import completion_token_logprobs
    from qiusuo.train.policy import Rollouts

    ckpt = make_checkpoint(num_hidden_layers=2)
    run = grpo(tmp_path, ckpt, beta=0.04)
    assert run.update.ref is None and run.update.ref_is_base
    randomize_adapters_(run.model, std=0.2)
    ids, mask = pad_rows([[1, 20, 21, 22, 23], [1, 20, 24, 25]], [[0, 0, 1, 1, 1], [0, 0, 1, 1]], 0)
    batch = Rollouts(ids, mask, torch.tensor([1.0, -1.0]), 1)
    ref = run.update.reference_logprobs(batch, slice(0, 2))
    base, _ = load_model(ckpt)
    with torch.no_grad():
        expected = completion_token_logprobs(base, ids, mask)[0]
        adapted = completion_token_logprobs(run.model, ids, mask)[0]
    torch.testing.assert_close(ref, expected, atol=1e-6, rtol=0)
    assert (adapted - expected).abs().max() > 1e-3
    metrics = run.update(batch)  # the KL term sees the adapter's distance from the base
    assert metrics["kl"] > 0


def test_sft_with_lora_and_config_errors(tmp_path, make_checkpoint):
    from qiusuo.train.config import GRPOConfig, SFTConfig
    from qiusuo.train.sft import SFT

    ckpt = make_checkpoint(num_hidden_layers=2)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(8)))
    sft = SFT(SFTConfig(model=str(ckpt), data=str(data), out=str(tmp_path / "sft"), steps=2, batch_size=4,
                        threads=1, progress=False, lora_rank=2, lora_targets="q_proj,v_proj"))
    sft.run()
    assert json.loads((tmp_path / "sft" / "final" / "adapter" / "adapter_config.json").read_text())["r"] == 2
    assert lora.resolve_targets(load_model(ckpt)[0], "q_proj,v_proj") == sft.model.lora_spec.module_names
    with pytest.raises(ValueError, match="--lora-rank must be >= 0"):
        SFTConfig(model=str(ckpt), data=str(data), lora_rank=-1)
    with pytest.raises(ValueError, match="--lora-alpha"):
        SFTConfig(model=str(ckpt), data=str(data), lora_rank=4, lora_alpha=0)
    with pytest.raises(ValueError, match="--ray"):
        GRPOConfig(model=str(ckpt), lora_rank=4, ray=True)
    with pytest.raises(ValueError, match="no linear layer named"):
        grpo(tmp_path, ckpt, "bad", lora_targets="q_proj,nope")


def test_hostile_adapters_are_refused_before_the_model_changes(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny()
    lora.apply_lora(model, r=2, alpha=4, targets="q_proj")
    randomize_adapters_(model)
    good = tmp_path / "good"
    lora.save_adapter(model, good)
    cfg = json.loads((good / "adapter_config.json").read_text())
    tensors = load_file(good / "adapter_model.safetensors")
    a_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def variant(name, config=None, weights=None):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
        save_file(weights if weights is not None else tensors, d / "adapter_model.safetensors")
        return d

    cases = [
        (variant("r", {"r": 10**9}), "rows as adapter_config"),
        (variant("r-str", {"r": "2"}), "positive integer"),
        (variant("alpha", {"lora_alpha": float("nan")}), "positive number"),
        (variant("pattern", {"rank_pattern": {"q_proj": 8}}), "rank_pattern"),
        (variant("extra", weights={**tensors, "base_model.model.lm_head.weight": torch.zeros(2, 2)}), "exactly"),
        (variant("half", weights={k: v for k, v in tensors.items() if k != a_key}), "exactly"),
        (variant("shape", weights={**tensors, a_key: torch.zeros(2, 7)}), "the model needs"),
        (variant("foreign", weights={k.replace("q_proj", "zz_proj"): v for k, v in tensors.items()}), "lacks"),
    ]
    for path, match in cases:
        fresh = tiny()
        with pytest.raises(ValueError, match=match):
            lora.load_adapter(fresh, path)
        assert not lora.has_lora(fresh), path.name  # refused before any layer was wrapped
    fresh = tiny()
    lora.load_adapter(fresh, good)
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS), model(IDS), atol=1e-6, rtol=0)
