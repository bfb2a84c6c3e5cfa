"""GRPO from rule-based rewards, with rollouts through the engine on the live policy weights.

Defaults (the variant): per step, P prompts x G samples at T=1; advantage (r - mean_g) / (std_g + 1e-4);
groups whose rewards are all equal are dropped (DAPO's 0 < correct < G rule, no refill);
loss -min(r A, clip(r, 1-0.2, 1+0.28) A) summed over tokens / all active tokens (DAPO token-level,
clip-higher); beta = 0 (no reference model); mu = 1 so r == 1 and this is the group-baseline policy gradient.
Flags: --scale-rewards none --loss-agg constant (Dr.GRPO), --loss-agg sequence (DeepSeekMath),
--beta > 0 (k3 KL to the initial policy), --dynamic-sampling (refill dropped groups),
--overlong-filter (mask truncated samples), --updates-per-batch / --minibatches (stored old log-probs).
--ray: the same stage on Ray (distributed/: rollout actors, a data-parallel learner group).
--lora-rank: adapters on the frozen base; rollouts run with the adapters merged into the base weights
(merged for the rollout, unmerged for the update), the reference policy is the base with the adapters
disabled (no copy).

The stage is three pieces both paths share: `RolloutBuilder` (prompts -> G samples each -> rewards ->
advantages -> a padded batch), `policy.PolicyUpdate` (the update on that batch) and `grpo_step` (one step:
rollouts, update, held-out check). `GRPO` wires them to the engine on the live weights in this process;
`distributed.RayGRPO` wires the same ones to rollout actors and a learner group.

Dimension letters (qiusuo/model/__init__.py): P prompts, G samples per prompt, B = P * G rows, S positions.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from qiusuo.model import lora
from qiusuo.tasks.prompts import chat_template, prompt_ids

from .config import GRPOConfig

from .data import load_task, pad_id, pad_rows, step_seed
from .final import save_final
from .loop import FitResult, Trainer, setup_torch
from .objectives import group_advantages, zero_variance_groups
from .policy import PolicyUpdate, Rollouts, load_policy

# (problems (P,), one seed each) -> (request outputs (P,), completions group-major (B,), scores (B,), seconds)
Sampler = Callable[[list, list[int]], tuple[list, list, list, float]]


class GRPO:
    """`GRPO(cfg).run()`; pass `task`, or a live `model`/`tokenizer`, to skip loading them by name."""

    def __init__(self, cfg: GRPOConfig, task: Any = None, model=None, tokenizer=None,
                 on_step: Callable[[int, dict], None] | None = None):
        from qiusuo.engine import LLM

        self.cfg, self.on_step = cfg, on_step
        setup_torch(cfg)
        self.task = load_task(task if task is not None else cfg.task, cfg.template)
        self.model, self.tokenizer = load_policy(cfg, model, tokenizer)
        self.tokenizer.chat_template = chat_template(self.task, self.tokenizer)  # checkpoints render prompts as trained
        self.trainer = Trainer(cfg, self.model, self.tokenizer, "grpo", metadata=run_metadata(cfg, self.task))
        self.update = PolicyUpdate(cfg, self.trainer)  # and the frozen reference when beta > 0
        self.llm = LLM(model=self.model, tokenizer=self.tokenizer)  # live weights: no copy, no second sampler
        self.rollout = RolloutBuilder(cfg, self.task, self.tokenizer, self._sample, self.trainer.device)

    def _sample(self, problems: list, seeds: list[int]):
        with lora.merged(self.model):  # LoRA: decode at the base's cost (see qiusuo/model/lora.py)
            out = sample_groups(self.llm, self.tokenizer, self.task, problems, seeds, self.cfg)
        self.model.train()
        return out

    def train_step(self, step: int) -> dict[str, Any]:
        return grpo_step(self.cfg, step, self.rollout, self.update, self.evaluate, self.on_step)

    def evaluate(self, num_problems: int | None = None, seed: int = 1234) -> dict[str, float]:
        """Held-out greedy accuracy and T=1 pass@1 of the live policy (the same problems every call)."""
        from .evaluate import evaluate

        problems = self.task.generate(num_problems or self.cfg.eval_problems, seed=seed, split="test")
        with lora.merged(self.model):
            return evaluate(self.llm, self.task, problems, max_tokens=self.cfg.max_tokens, seed=seed)

    def run(self) -> FitResult:
        self.trainer.resume_if_asked()
        result = self.trainer.fit(self.train_step)
        if result.status == "completed":
            save_final(self.trainer, "grpo", parent=self.cfg.model)
        return result


def run_metadata(cfg: GRPOConfig, task) -> dict[str, Any]:
    """What every GRPO checkpoint records about its run (qiusuo.json)."""
    return {"parent": cfg.model, "task": task.name}


def grpo_step(cfg: GRPOConfig, step: int, rollout: Callable[[int], tuple[Rollouts | None, dict]],
              update: Callable[[Rollouts], dict[str, float]], evaluate: Callable[[], dict[str, float]],
              on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """One GRPO step, the same in one process and on Ray: rollouts, the update, every eval_every steps
    the held-out check; the step's metrics."""
    batch, metrics = rollout(step)
    t0 = time.perf_counter()
    if batch is None:  # every group had equal rewards: nothing to learn from this step
        metrics.update(loss=0.0, entropy=0.0, clip_fraction=0.0, kl=0.0, grad_norm=0.0)
    else:
        metrics.update(update(batch))
    metrics["update_time"] = round(time.perf_counter() - t0, 4)
    if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
        metrics.update({f"eval_{k}": v for k, v in evaluate().items()
                        if k in ("accuracy", "pass1", "format_rate", "length", "empty_think_rate")})
    if on_step is not None:
        on_step(step, metrics)
    return metrics


class RolloutBuilder:
    """Step s's batch: its prompts, G samples each from `sample`, rewards, group advantages, the groups
    with a learning signal (more rounds of prompts with --dynamic-sampling), padded on `device`."""

    def __init__(self, cfg: GRPOConfig, task, tokenizer, sample: Sampler, device: torch.device | str):
        self.cfg, self.task, self.tokenizer, self.sample, self.device = cfg, task, tokenizer, sample, device

    def problems(self, step: int, round_: int) -> tuple[list, list[int]]:
        """The prompts of (step, round) and one sampling seed each: a function of (seed, step, round, i)
        alone, which makes resume exact and lets any worker re-issue any prompt with the same result."""
        cfg = self.cfg
        problems = self.task.generate(cfg.prompts_per_step, seed=step_seed(cfg.seed, step, round_), split="train")
        return problems, [step_seed(cfg.seed, step, round_, i) for i in range(len(problems))]

    def __call__(self, step: int) -> tuple[Rollouts | None, dict[str, float]]:
        cfg, G = self.cfg, self.cfg.group_size
        t0 = time.perf_counter()
        kept_rows, kept_masks, kept_adv, first_stats = [], [], [], None
        rounds = cfg.max_sampling_rounds if cfg.dynamic_sampling else 1
        gen_tokens, gen_seconds = 0, 0.0
        refusals: list[str] = []
        for round_ in range(rounds):
            outs, completions, scores, seconds = self.sample(*self.problems(step, round_))
            gen_tokens, gen_seconds = gen_tokens + sum(len(o.token_ids) for o in completions), gen_seconds + seconds
            refusals += [s.refused for s in scores if s.refused is not None]
            rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32).view(-1, G)  # (P, G)
            if first_stats is None:
                first_stats = self._stats(completions, scores, rewards)
            adv = group_advantages(rewards, cfg.scale_rewards)  # (P, G)
            signal = ~zero_variance_groups(rewards)  # (P,) groups with a learning signal
            if not cfg.filter_zero_variance:
                signal = torch.ones_like(signal)
            for g in torch.nonzero(signal).flatten().tolist():
                prompt = outs[g].prompt_token_ids
                for j in range(G):
                    c = completions[g * G + j]
                    kept_rows.append(list(prompt) + list(c.token_ids))
                    drop = cfg.overlong_filter and c.finish_reason == "length"
                    kept_masks.append([0] * len(prompt) + [0 if drop else 1] * len(c.token_ids))
                    kept_adv.append(float(adv[g, j]))
            if len(kept_rows) >= cfg.batch_completions:
                break
        kept_rows, kept_masks, kept_adv = (x[: cfg.batch_completions] for x in (kept_rows, kept_masks, kept_adv))
        stats = {**first_stats, "rollout_time": round(time.perf_counter() - t0, 4),
                 "rollout_tokens_per_s": round(gen_tokens / max(gen_seconds, 1e-9), 1),
                 "tokens": gen_tokens, "groups_used": len(kept_rows) // G, "sampling_rounds": round_ + 1,
                 **sandbox_refusal_metrics(refusals)}
        if not kept_rows:
            return None, stats
        ids, mask = pad_rows(kept_rows, kept_masks, pad_id(self.tokenizer), self.device)
        return Rollouts(ids, mask, torch.tensor(kept_adv, device=ids.device), len(kept_rows) // G), stats

    def _stats(self, completions, scores, rewards: torch.Tensor) -> dict[str, float]:
        n = len(completions)
        think, end = self.tokenizer.think_start_id, self.tokenizer.think_end_id
        empty = sum(1 for o in completions if list(o.token_ids[:2]) == [think, end])
        return {
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "accuracy": sum(s.accuracy for s in scores) / n, "format_rate": sum(s.format for s in scores) / n,
            "zero_variance_frac": float(zero_variance_groups(rewards).float().mean()),
            "truncation_rate": sum(o.finish_reason == "length" for o in completions) / n,
            "completion_len": sum(len(o.token_ids) for o in completions) / n,
            "empty_think_rate": empty / n,
        }


def sandbox_refusal_metrics(refusals: list[str]) -> dict[str, int]:
    """`sandbox_refusals`: completions of this step the checker refused to run (the code sandbox
    could not confine them: each scored 0 whatever it says, so a run where this is not 0 learns
    nothing from its code problems), and `sandbox_refused/<reason>` per missing layer when any."""
    from qiusuo.tasks.sandbox import refusal_reasons

    counts: dict[str, int] = {}
    for refused in refusals:
        for reason in refusal_reasons(refused):
            counts[f"sandbox_refused/{reason}"] = counts.get(f"sandbox_refused/{reason}", 0) + 1
    return {"sandbox_refusals": len(refusals), **dict(sorted(counts.items()))}


def sample_groups(llm, tokenizer, task, problems: list, seeds: list[int], cfg: GRPOConfig):
    """G completions of each problem (problem i sampled with seed seeds[i]), scored by the task.

    Returns (request outputs (P,), completions group-major (B,), scores (B,), generation seconds). The one
    rollout path: the single process calls it on the live weights, a Ray rollout worker on its copy.
    """
    from qiusuo.engine import SamplingParams

    # One seed per prompt: with a shared seed every prompt's k-th sample would draw the same
    # noise at each position (the engine's noise is a function of seed and position only).
    params = [SamplingParams(n=cfg.group_size, temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=seed)
              for seed in seeds]
    t0 = time.perf_counter()
    outs = llm.generate([prompt_ids(tokenizer, task, p) for p in problems], params)
    seconds = time.perf_counter() - t0
    completions = [o for r in outs for o in r.outputs]  # group-major (B,)
    group_problems = [p for p in problems for _ in range(cfg.group_size)]
    scores = task.score_many(group_problems, [o.text for o in completions])
    return outs, completions, scores, seconds


__all__ = ["GRPO", "RolloutBuilder", "Rollouts", "grpo_step", "run_metadata", "sample_groups",
           "sandbox_refusal_metrics"]
