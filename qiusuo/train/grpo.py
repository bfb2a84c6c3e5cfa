"""GRPO from rule-based rewards, with rollouts through the engine on the live policy weights.

Defaults (the variant): per step, P prompts x G samples at T=1; advantage (r - mean_g) / (std_g + 1e-4);
groups whose rewards are all equal are dropped (DAPO's 0 < correct < G rule, no refill);
loss -min(r A, clip(r, 1-0.2, 1+0.28) A) summed over tokens / all active tokens (DAPO token-level,
clip-higher); beta = 0 (no reference model); mu = 1 so r == 1 and this is the group-baseline policy gradient.
Flags: --scale-rewards none --loss-agg constant (Dr.GRPO), --loss-agg sequence (DeepSeekMath),
--beta > 0 (k3 KL to the initial policy), --dynamic-sampling (refill dropped groups),
--overlong-filter (mask truncated samples), --updates-per-batch / --minibatches (stored old log-probs).
--ray: the same stage on Ray (distributed/: rollout actors, a data-parallel learner group).

Dimension letters: P prompts, G samples per prompt, N = P*G sequences, S prompt+completion positions.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .config import GRPOConfig
from qiusuo.tasks.prompts import chat_template, prompt_ids

from .data import load_task, pad_id, pad_rows, step_seed
from .loop import FitResult, Trainer, setup_torch
from .objectives import completion_logprobs, group_advantages, policy_loss, zero_variance_groups


@dataclass
class Rollouts:
    """One step's kept groups, flattened group-major: rows g*G .. g*G+G-1 belong to prompt g."""

    input_ids: torch.Tensor  # (N, S)
    completion_mask: torch.Tensor  # (N, S) bool: generated tokens (eos included)
    advantages: torch.Tensor  # (N,)
    num_groups: int


class GRPO:
    """`GRPO(cfg).run()`; pass `task`, or a live `model`/`tokenizer`, to skip loading them by name."""

    def __init__(self, cfg: GRPOConfig, task: Any = None, model=None, tokenizer=None,
                 on_step: Callable[[int, dict], None] | None = None):
        from qiusuo.engine import LLM
        from qiusuo.model import load_model

        self.cfg = cfg
        setup_torch(cfg)
        self.task = load_task(task if task is not None else cfg.task, cfg.template)
        if model is None:
            model, tokenizer = load_model(cfg.model, device=cfg.device)
        if tokenizer is None:
            raise ValueError(f"{cfg.model} has no tokenizer.json; GRPO needs the tokenizer to build prompts")
        self.model, self.tokenizer = model, tokenizer
        tokenizer.chat_template = chat_template(self.task, tokenizer)  # checkpoints render prompts as trained
        model.train().requires_grad_(True)
        # The reference is the one extra copy GRPO keeps, and only when beta > 0 (it is never sampled from).
        self.ref = copy.deepcopy(model).eval().requires_grad_(False) if cfg.beta > 0 else None
        self.llm = LLM(model=model, tokenizer=tokenizer)  # live weights: no copy, no second sampler
        self.trainer = Trainer(cfg, model, tokenizer, "grpo", metadata={"parent": cfg.model, "task": self.task.name})
        self.on_step = on_step

    # ------------------------------------------------------------------ rollouts
    def _problems(self, step: int, round_: int) -> tuple[list, list[int]]:
        """The prompts of (step, round) and one sampling seed each: a function of (seed, step, round, i)
        alone, which makes resume exact and lets any worker re-issue any prompt with the same result."""
        cfg = self.cfg
        problems = self.task.generate(cfg.prompts_per_step, seed=step_seed(cfg.seed, step, round_), split="train")
        return problems, [step_seed(cfg.seed, step, round_, i) for i in range(len(problems))]

    def _sample(self, step: int, round_: int):
        problems, seeds = self._problems(step, round_)
        outs, completions, scores, seconds = sample_groups(self.llm, self.tokenizer, self.task, problems, seeds,
                                                           self.cfg)
        self.generate_seconds += seconds
        self.model.train()
        return outs, completions, scores

    def rollout(self, step: int) -> tuple[Rollouts | None, dict[str, float]]:
        cfg, G = self.cfg, self.cfg.group_size
        t0 = time.perf_counter()
        kept_rows, kept_masks, kept_adv, first_stats = [], [], [], None
        rounds = cfg.max_sampling_rounds if cfg.dynamic_sampling else 1
        gen_tokens, self.generate_seconds = 0, 0.0
        for round_ in range(rounds):
            outs, completions, scores = self._sample(step, round_)
            gen_tokens += sum(len(o.token_ids) for o in completions)
            rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32).view(-1, G)  # (P, G)
            if first_stats is None:
                first_stats = self._rollout_stats(completions, scores, rewards)
            adv = group_advantages(rewards, cfg.scale_rewards)  # (P, G)
            signal = ~zero_variance_groups(rewards)
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
        dt = time.perf_counter() - t0
        stats = {**first_stats, "rollout_time": round(dt, 4),
                 "rollout_tokens_per_s": round(gen_tokens / max(self.generate_seconds, 1e-9), 1),
                 "tokens": gen_tokens, "groups_used": len(kept_rows) // G, "sampling_rounds": round_ + 1}
        if not kept_rows:
            return None, stats
        ids, mask = pad_rows(kept_rows, kept_masks, pad_id(self.tokenizer), self.trainer.device)
        return Rollouts(ids, mask, torch.tensor(kept_adv, device=ids.device), len(kept_rows) // G), stats

    def _rollout_stats(self, completions, scores, rewards: torch.Tensor) -> dict[str, float]:
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

    # ------------------------------------------------------------------ update
    def _logprobs(self, model, batch: Rollouts, rows: slice, entropy: bool = False):
        with self.trainer.autocast():
            return completion_logprobs(model, batch.input_ids[rows], batch.completion_mask[rows], entropy)

    def _shard(self, rows: slice) -> tuple[slice, int]:
        """The rows of minibatch `rows` this process trains on, and how many processes share it.
        One process trains on all of them; a data-parallel learner (distributed/learner.py) takes its slice."""
        return rows, 1

    def _normalizer(self, batch: Rollouts, rows: slice, world: int) -> float | None:
        """The loss denominator of minibatch `rows`, divided among `world` ranks: each rank's loss is its rows'
        sum over (whole minibatch's normaliser / world), so the ranks' averaged gradient is the whole one's."""
        n_rows, agg = rows.stop - rows.start, self.cfg.loss_agg
        if agg == "constant":
            return n_rows * self.cfg.max_tokens / world
        if world == 1:
            return None  # policy_loss's own: this minibatch's active tokens or sequences
        whole = float(batch.completion_mask[rows].sum().clamp(min=1)) if agg == "token" else n_rows
        return whole / world

    def update(self, batch: Rollouts) -> dict[str, float]:
        cfg, G = self.cfg, self.cfg.group_size
        N = batch.input_ids.shape[0]
        on_policy = cfg.updates_per_batch == 1 and cfg.minibatches == 1
        old_logp = ref_logp = None
        with torch.no_grad():
            if not on_policy:  # the policy that sampled, frozen before the first update
                old_logp = self._logprobs(self.model, batch, slice(0, N))[0]
            if self.ref is not None:
                ref_logp = self._logprobs(self.ref, batch, slice(0, N))[0]
        groups_per_mb = max(1, batch.num_groups // cfg.minibatches)
        stats: dict[str, list[float]] = {k: [] for k in ("loss", "clip_fraction", "kl", "ratio_mean", "grad_norm")}
        entropy = None
        for _ in range(cfg.updates_per_batch):
            for start in range(0, batch.num_groups, groups_per_mb):
                rows = slice(start * G, min(batch.num_groups, start + groups_per_mb) * G)
                mine, world = self._shard(rows)
                if mine.stop > mine.start:  # a data-parallel rank may hold none of a small minibatch
                    logp, ent = self._logprobs(self.model, batch, mine, entropy=entropy is None)
                    mask = batch.completion_mask[mine]
                    if ent is not None:
                        entropy = float((ent * mask).sum() / mask.sum().clamp(min=1))
                    out = policy_loss(
                        logp, logp.detach() if on_policy else old_logp[mine], batch.advantages[mine], mask,
                        epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, beta=cfg.beta,
                        ref_logp=None if ref_logp is None else ref_logp[mine], agg=cfg.loss_agg,
                        normalizer=self._normalizer(batch, rows, world),
                    )
                    self.trainer.backward(out.loss)
                    for k in ("clip_fraction", "kl", "ratio_mean"):
                        stats[k].append(getattr(out, k))
                    stats["loss"].append(float(out.loss.detach()))
                stats["grad_norm"].append(self.trainer.optimizer_step()["grad_norm"])
        result = {k: sum(v) / len(v) for k, v in stats.items() if v}
        result["entropy"] = entropy if entropy is not None else 0.0
        return result

    def train_step(self, step: int) -> dict[str, Any]:
        batch, metrics = self.rollout(step)
        t0 = time.perf_counter()
        if batch is None:  # every group had equal rewards: nothing to learn from this step
            metrics.update(loss=0.0, entropy=0.0, clip_fraction=0.0, kl=0.0, grad_norm=0.0)
        else:
            metrics.update(self.update(batch))
        metrics["update_time"] = round(time.perf_counter() - t0, 4)
        if self.cfg.eval_every and (step + 1) % self.cfg.eval_every == 0:
            metrics.update({f"eval_{k}": v for k, v in self.evaluate().items()
                            if k in ("accuracy", "pass1", "format_rate", "length", "empty_think_rate")})
        if self.on_step is not None:
            self.on_step(step, metrics)
        return metrics

    def evaluate(self, num_problems: int | None = None, seed: int = 1234) -> dict[str, float]:
        """Held-out greedy accuracy and T=1 pass@1 of the live policy (the same problems every call)."""
        from .evaluate import evaluate

        problems = self.task.generate(num_problems or self.cfg.eval_problems, seed=seed, split="test")
        return evaluate(self.llm, self.task, problems, max_tokens=self.cfg.max_tokens, seed=seed)

    # ------------------------------------------------------------------ run
    def run(self) -> FitResult:
        self.trainer.resume_if_asked()
        result = self.trainer.fit(self.train_step)
        if result.status == "completed":
            save_final(self.trainer, "grpo", parent=self.cfg.model)
        return result


def sample_groups(llm, tokenizer, task, problems: list, seeds: list[int], cfg: GRPOConfig):
    """G completions of each problem (problem i sampled with seed seeds[i]), scored by the task.

    Returns (request outputs (P,), completions group-major (N,), scores (N,), generation seconds). The one
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
    completions = [o for r in outs for o in r.outputs]  # group-major (N,)
    group_problems = [p for p in problems for _ in range(cfg.group_size)]
    scores = task.score_many(group_problems, [o.text for o in completions])
    return outs, completions, scores, seconds


def save_final(trainer: Trainer, stage: str, parent: str | None = None) -> Path:
    """RUN/final: the model in HF layout with stage, parent, recipe and a metrics summary."""
    from qiusuo.model import save_model

    summary = last_metrics(trainer.run / "metrics.jsonl")
    path = save_model(trainer.model, trainer.tokenizer, trainer.run / "final", metadata={
        "stage": stage, "parent": parent, "recipe": trainer.cfg.to_dict(), "metrics": summary,
        "steps": trainer.step, "run_dir": str(trainer.run)})
    if trainer.cfg.register:
        from qiusuo.registry import Registry

        info = Registry().import_dir(path, trainer.cfg.register, source_run=str(trainer.run))
        print(f"registered {path} as {info.ref}")
    return path


def last_metrics(path: Path, window: int = 10) -> dict[str, float]:
    """Mean of the numeric metrics over the last `window` steps of a metrics.jsonl."""
    import json

    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][-window:]
    keys = [k for k in (rows[-1] if rows else {})
            if isinstance(rows[-1][k], (int, float)) and k not in ("step", "time")]
    return {k: round(sum(r.get(k, 0) for r in rows) / len(rows), 6) for k in keys}


__all__ = ["GRPO", "Rollouts", "sample_groups", "save_final", "last_metrics"]
