"""GRPO's objective against hand-computed tensors, and a short run that moves toward a known optimum."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import DigitsTask

from qiusuo.train.objectives import group_advantages, kl_k3, policy_loss, zero_variance_groups

torch.set_num_threads(1)


# ------------------------------------------------------------------ advantages
def test_group_advantages_std_scaled_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.1, 0.1, 0.1, 0.1]])
    adv = group_advantages(r)
    # group 0: mean 0.5, Bessel std sqrt(4 * 0.25 / 3) = 0.57735
    s0 = math.sqrt(1 / 3)
    expected0 = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s0 + 1e-4)
    # group 1: mean 0.35, deviations 0.75, -0.25 x3, std sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5
    expected1 = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4)
    torch.testing.assert_close(adv, torch.stack([expected0, expected1]), rtol=1e-5, atol=1e-6)


def test_dr_grpo_advantages_have_no_std_division():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(group_advantages(r, scale="none"), torch.tensor([[0.75, -0.25, -0.25, -0.25]]))
    # the two variants differ exactly by the std factor: this is what tells them apart
    assert not torch.allclose(group_advantages(r, scale="group"), group_advantages(r, scale="none"))


def test_zero_variance_groups_get_zero_advantage_and_are_flagged():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.1, 0.0]])
    assert zero_variance_groups(r).tolist() == [True, True, False]
    adv = group_advantages(r)
    assert torch.all(adv[:2] == 0)
    assert torch.all(torch.isfinite(adv))


# ------------------------------------------------------------------ policy loss
def test_on_policy_token_loss_equals_plain_policy_gradient_with_padding():
    """ratio = 1 on-policy: value is -sum(mask * A) / tokens and the gradient is -A * mask / tokens
    w.r.t. logp (REINFORCE with the group baseline); padded positions get no gradient."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # second row is padded at the end
    adv = torch.tensor([2.0, -1.0])
    out = policy_loss(logp, logp.detach(), adv, mask)
    assert out.loss.item() == pytest.approx(-(2.0 * 3 + -1.0 * 2) / 5)
    out.loss.backward()
    expected = -torch.tensor([[2.0, 2.0, 2.0], [-1.0, -1.0, 0.0]]) / 5
    torch.testing.assert_close(logp.grad, expected)
    assert out.clip_fraction == 0.0 and out.ratio_mean == pytest.approx(1.0)


def test_sequence_and_constant_aggregations_by_hand():
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = torch.tensor([1.0, -1.0])
    seq = policy_loss(logp, logp.detach(), adv, mask, agg="sequence")
    assert seq.loss.item() == pytest.approx(((-1.0 * 3 / 3) + (1.0 * 1 / 1)) / 2)  # = 0
    const = policy_loss(logp, logp.detach(), adv, mask, agg="constant", normalizer=2 * 4)
    assert const.loss.item() == pytest.approx((-3.0 + 1.0) / 8)
    tok = policy_loss(logp, logp.detach(), adv, mask)
    assert tok.loss.item() == pytest.approx((-3.0 + 1.0) / 4)
    with pytest.raises(ValueError, match="normalizer"):
        policy_loss(logp, logp.detach(), adv, mask, agg="constant")


def test_clip_higher_is_asymmetric():
    """ratio 1.25: inside [0.8, 1.28] so a positive advantage still pushes it up (with eps=0.2 it
    would be clipped); ratio 1.3 with A > 0 is clipped: no gradient. A negative advantage is
    clipped below 0.8."""
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.25, 1.3, 0.75, 0.85]])).requires_grad_(True)
    adv = torch.tensor([1.0])
    out = policy_loss(logp, old, adv, torch.ones(1, 4))
    out.loss.backward()
    g = logp.grad[0]
    assert g[0] != 0 and g[1] == 0  # upper bound 1.28, not 1.2
    assert g[2] != 0 and g[3] != 0  # A > 0: the lower clip never binds (min picks the unclipped term)
    assert out.clip_high_fraction == pytest.approx(1 / 4) and out.clip_low_fraction == 0

    logp2 = torch.log(torch.tensor([[0.75, 0.85, 1.3]])).requires_grad_(True)
    out2 = policy_loss(logp2, torch.zeros(1, 3), torch.tensor([-1.0]), torch.ones(1, 3))
    out2.loss.backward()
    assert logp2.grad[0, 0] == 0 and logp2.grad[0, 1] != 0 and logp2.grad[0, 2] != 0
    assert out2.clip_low_fraction == pytest.approx(1 / 3)

    sym = policy_loss(logp.detach().requires_grad_(True), old, adv, torch.ones(1, 4), epsilon_high=0.2)
    assert sym.clip_high_fraction == pytest.approx(2 / 4)  # symmetric clip: 1.25 is clipped too


def test_sequence_level_ratio_gspo_by_hand():
    """GSPO: one ratio per sequence, the geometric mean of its tokens' ratios. Row 0's token log-ratios
    are +0.5 and -0.5: per token r = 1.65 (clipped at 1.28 for A > 0: no gradient) and 0.61; per sequence
    r = exp(0) = 1, unclipped, and each token's gradient is -A * r / N_tokens (its |y| loss terms each
    depend on it through r / |y|). Row 1 (padded) has one
    token at log-ratio 0.1: both levels agree there. The padded position never counts."""
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.5, -0.5, 0.0], [0.1, 0.0, 7.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([1.0, -1.0])
    seq = policy_loss(logp, old, adv, mask, importance_sampling_level="sequence")
    r1 = math.exp(0.1)
    assert seq.loss.item() == pytest.approx((-1.0 - 1.0 + r1) / 3)
    seq.loss.backward()
    expected = torch.tensor([[-1.0, -1.0, 0.0], [r1, 0.0, 0.0]]) / 3
    torch.testing.assert_close(logp.grad, expected)
    assert seq.ratio_mean == pytest.approx((1 + 1 + r1) / 3) and seq.clip_fraction == 0

    logp_t = logp.detach().requires_grad_(True)
    tok = policy_loss(logp_t, old, adv, mask)  # token level: the same inputs give another loss and gradient
    assert tok.loss.item() == pytest.approx((-1.28 - math.exp(-0.5) + r1) / 3)
    tok.loss.backward()
    torch.testing.assert_close(logp_t.grad, torch.tensor([[0.0, -math.exp(-0.5), 0.0], [r1, 0.0, 0.0]]) / 3)
    assert tok.clip_high_fraction == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        policy_loss(logp, old, adv, mask, importance_sampling_level="step")


def test_kl_k3_value_and_loss_term():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    # k3 = ref/pi - log(ref/pi) - 1 : (0.5 + log 2 - 1, 0)
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([[0.5 + math.log(2) - 1, 0.0]]))
    assert torch.all(kl_k3(torch.randn(50), torch.randn(50)) >= 0)
    lp = logp.clone().requires_grad_(True)
    out = policy_loss(lp, lp.detach(), torch.tensor([0.0]), torch.ones(1, 2), beta=0.1, ref_logp=ref)
    assert out.loss.item() == pytest.approx(0.1 * (0.5 + math.log(2) - 1) / 2)
    assert out.kl == pytest.approx((0.5 + math.log(2) - 1) / 2)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(lp, lp.detach(), torch.tensor([0.0]), torch.ones(1, 2), beta=0.1)


def test_completion_logprobs_match_a_manual_log_softmax():
    from qiusuo.model import build_model
    from qiusuo.train.objectives import completion_token_logprobs

    model, tok = build_model("tiny-dense", seed=0)
    ids = torch.tensor([[1, 20, 21, 22, 2], [1, 20, 23, 0, 0]])
    cmask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]], dtype=torch.bool)
    logp, ent = completion_token_logprobs(model, ids, cmask, with_entropy=True)
    full = torch.log_softmax(model(ids).float(), -1)
    assert logp[0, 3].item() == pytest.approx(full[0, 2, 22].item(), abs=1e-5)
    assert logp[1, 2].item() == pytest.approx(full[1, 1, 23].item(), abs=1e-5)
    assert logp[1, 3] == 0 and logp[0, 1] == 0 and ent[1, 4] == 0 and ent[0, 4] > 0


# ------------------------------------------------------------------ the stage, end to end on a toy task


@pytest.fixture(scope="module")
def base_ckpt(make_checkpoint):
    return str(make_checkpoint(num_hidden_layers=2))


def grpo_cfg(tmp_path, base_ckpt, name="run", **kw):
    from qiusuo.train.config import GRPOConfig

    args = dict(model=base_ckpt, out=str(tmp_path / name), prompts_per_step=4, group_size=8, max_tokens=6,
                steps=2, lr=3e-3, threads=1, progress=False)
    return GRPOConfig(**{**args, **kw})


def test_grpo_moves_toward_a_known_optimum(tmp_path, base_ckpt):
    import json

    from qiusuo.train.grpo import GRPO

    GRPO(grpo_cfg(tmp_path, base_ckpt, steps=25), task=DigitsTask()).run()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(r["reward_mean"] for r in rows[:3]) / 3, sum(r["reward_mean"] for r in rows[-3:]) / 3
    assert first < 0.2 and last > first + 0.3, (first, last)
    for key in ("reward_mean", "reward_std", "accuracy", "format_rate", "zero_variance_frac", "truncation_rate",
                "completion_len", "entropy", "clip_fraction", "kl", "rollout_tokens_per_s", "step_time",
                "empty_think_rate", "loss", "lr", "tokens"):
        assert key in rows[0], key


@pytest.mark.parametrize("flags", [
    dict(scale_rewards="none", loss_agg="constant"),  # Dr.GRPO
    dict(loss_agg="sequence", beta=0.04),  # DeepSeekMath GRPO with KL k3
    dict(updates_per_batch=2, minibatches=2),  # off-policy passes with stored old log-probs
    dict(dynamic_sampling=True, overlong_filter=True),
    dict(importance_sampling_level="sequence", updates_per_batch=2, loss_agg="sequence"),  # GSPO
])
def test_grpo_variants_run_and_report(tmp_path, base_ckpt, flags):
    import json

    from qiusuo.train.grpo import GRPO

    GRPO(grpo_cfg(tmp_path, base_ckpt, **flags), task=DigitsTask()).run()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    if flags.get("updates_per_batch"):
        assert rows[0]["ratio_mean"] != 1.0  # the second minibatch/pass sees an updated policy
    if flags.get("beta"):
        assert rows[-1]["kl"] > 0


def test_grpo_on_moe_logs_the_expert_load(tmp_path, make_checkpoint):
    """An MoE policy's step metrics carry the router's max/mean expert load (the trainer's bias update
    sees it after every optimizer step), counted over the trunk's layers only: >= 1, never 0."""
    import json

    from qiusuo.train.grpo import GRPO

    moe = str(make_checkpoint("tiny-moe", num_hidden_layers=2))
    GRPO(grpo_cfg(tmp_path, moe, filter_zero_variance=False), task=DigitsTask()).run()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(1.0 <= r["moe_load_max_over_mean"] <= r["moe_load_worst"] <= 4.0 for r in rows), rows


def test_zero_variance_groups_are_kept_with_the_filter_off(tmp_path, base_ckpt):
    """--no-filter-zero-variance keeps every group in the update (as TRL does); the default drops
    the ones whose rewards are all equal. A random base on DigitsTask mostly scores 0 everywhere."""
    import json

    import dataclasses

    from qiusuo.train.grpo import GRPO

    used = {}
    for keep in (False, True):
        name = "keep" if keep else "drop"
        GRPO(grpo_cfg(tmp_path, base_ckpt, name, filter_zero_variance=not keep), task=DigitsTask()).run()
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        used[name] = [(r["groups_used"], r["zero_variance_frac"]) for r in rows]
    assert all(g == 4 for g, _ in used["keep"]), used
    assert any(frac > 0 for _, frac in used["drop"]), used  # the case the flag is about happened
    assert all(g == round(4 * (1 - frac)) for g, frac in used["drop"]), used
    with pytest.raises(ValueError, match="--dynamic-sampling"):
        dataclasses.replace(grpo_cfg(tmp_path, base_ckpt), dynamic_sampling=True, filter_zero_variance=False)


def test_grpo_resume_equals_an_uninterrupted_run(tmp_path, base_ckpt):
    from qiusuo.train.grpo import GRPO

    straight = GRPO(grpo_cfg(tmp_path, base_ckpt, "straight", steps=4), task=DigitsTask())
    straight.run()
    first = GRPO(grpo_cfg(tmp_path, base_ckpt, "split", steps=4), task=DigitsTask())
    inner = first.train_step

    def stop_after_two(step):
        out = inner(step)
        first.trainer._stop_requested = step == 1
        return out

    first.train_step = stop_after_two
    assert first.run().status == "interrupted"
    second = GRPO(grpo_cfg(tmp_path, base_ckpt, "split", steps=4, resume=True), task=DigitsTask())
    assert second.run().step == 4
    for (k, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_rollout_noise_differs_across_prompts(tmp_path, base_ckpt):
    """Regression: all prompts of a step once shared one seed, so with the engine's counter-based
    noise every prompt's k-th sample drew the same noise at each position. With uniform logits the
    samples are the noise alone: identical prompts must still get different groups."""
    import torch

    from qiusuo.train.grpo import GRPO

    class SamePrompt(DigitsTask):
        def generate(self, n, seed, split="train"):
            from qiusuo.tasks.base import Problem

            return [Problem(prompt="7=", question="q", answer="0") for _ in range(n)]

    grpo = GRPO(grpo_cfg(tmp_path, base_ckpt), task=SamePrompt())
    with torch.no_grad():
        grpo.model.model.embed_tokens.weight.zero_()  # tied head: every logit equal, sampling is noise
    outs, _, _, _ = grpo._sample(*grpo.rollout.problems(step=0, round_=0))
    groups = [tuple(tuple(o.token_ids) for o in r.outputs) for r in outs]
    assert len(set(groups)) == len(groups), "prompts of one step drew identical samples"


def _padded_logprobs(model, ids, cmask):
    """The plain reference: one forward over the padded batch."""
    logp = torch.log_softmax(model.logits(model.hidden_states(ids)[:, :-1]).float(), -1)
    tok = logp.gather(-1, ids[:, 1:, None])[..., 0] * cmask[:, 1:]
    return torch.nn.functional.pad(tok, (1, 0))


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe"])
def test_grouped_logprobs_equal_one_padded_forward(name):
    """completion_token_logprobs runs each shared prompt once, cuts rows after their last completion token
    and groups them by length; values and gradients must equal the plain padded forward."""
    from helpers import randomize_

    from qiusuo.model import Transformer, preset
    from qiusuo.train import objectives
    from qiusuo.train.objectives import completion_token_logprobs

    torch.manual_seed(0)
    model = Transformer(preset(name, vocab_size=40, num_hidden_layers=2)).train()
    randomize_(model, seed=1)
    p1, p2 = [1, 5, 6, 7, 8], [1, 9, 9]  # two prompts of different lengths, each shared by a group
    rows = [(p1, [3, 11, 12, 2]), (p1, [3, 4, 20, 21, 22, 23, 2]), (p1, [13]), (p2, [14, 15, 2]),
            (p2, [16, 2]), (p2, [])]  # the last row has no completion token
    S = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(len(rows), S, dtype=torch.long)
    cmask = torch.zeros(len(rows), S)
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        cmask[i, len(p): len(p) + len(c)] = 1
    for overhead in (0, 64):  # many length groups, and one
        model.zero_grad()
        ref = _padded_logprobs(model, ids, cmask)
        g_ref = torch.autograd.grad((ref * torch.arange(S)).sum(), list(model.parameters()), allow_unused=True)
        objectives.SPLIT_OVERHEAD_TOKENS, saved = overhead, objectives.SPLIT_OVERHEAD_TOKENS
        try:
            got, ent = completion_token_logprobs(model, ids, cmask, with_entropy=True)
        finally:
            objectives.SPLIT_OVERHEAD_TOKENS = saved
        assert (got - ref).abs().max() < 1e-5
        assert (got[cmask == 0] == 0).all() and (ent[cmask == 0] == 0).all()
        g = torch.autograd.grad((got * torch.arange(S)).sum(), list(model.parameters()), allow_unused=True)
        for a, b in zip(g, g_ref):
            if b is None:
                continue
            assert a is not None and (a - b).abs().max() < 1e-4
