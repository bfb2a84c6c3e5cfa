"""The policy GRPO trains, and one update of it on a batch of rollouts.

Both pieces are shared by the single process (`grpo.GRPO`) and the Ray path: the driver loads
the policy with `load_policy`, and every rank of the learner group (distributed/learner.py)
runs `PolicyUpdate` on its slice of each minibatch. With rank 0 of 1 the update is the
single process's; with M ranks each trains on a contiguous slice of the minibatch's rows and
divides its loss by the whole minibatch's normaliser / M, so the ranks' averaged gradient is
the one the single process computes on the whole minibatch.

Dimension letters (qiusuo/model/__init__.py): B = P * G rows of the batch, S positions of a padded row.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from qiusuo.model import lora

from .config import GRPOConfig
from .loop import Trainer
from .objectives import completion_token_logprobs, policy_loss


@dataclass
class Rollouts:
    """One step's kept groups, flattened group-major: rows g*G .. g*G+G-1 belong to prompt g."""

    input_ids: torch.Tensor  # (B, S)
    completion_mask: torch.Tensor  # (B, S) bool: generated tokens (eos included)
    advantages: torch.Tensor  # (B,)
    num_groups: int

    def to(self, device: torch.device | str) -> "Rollouts":
        return Rollouts(self.input_ids.to(device), self.completion_mask.to(device), self.advantages.to(device),
                        self.num_groups)


def load_policy(cfg: GRPOConfig, model=None, tokenizer=None, device: str | None = None):
    """(model, tokenizer) to train: `model`/`tokenizer` as given, else cfg.model loaded on `device`
    (default cfg.device); in train mode with gradients on."""
    if model is None:
        from qiusuo.model import load_model

        model, tokenizer = load_model(cfg.model, device=device or cfg.device)
    if tokenizer is None:
        raise ValueError(f"{cfg.model} has no tokenizer.json; GRPO needs the tokenizer to build prompts")
    return model.train().requires_grad_(True), tokenizer


class PolicyUpdate:
    """GRPO's update of `trainer.model` on a batch, as rank `rank` of `world` (0 of 1: the single process).

    Holds the frozen reference policy when beta > 0: a copy of the model as it is now, i.e. the
    initial policy (built before any --resume loads a checkpoint), the one extra copy GRPO keeps;
    under LoRA no copy: the base with the adapters disabled is the initial policy.
    `trainer` supplies autocast, the finite-loss check and the optimizer step (a data-parallel
    trainer's step averages the ranks' gradients first).
    """

    def __init__(self, cfg: GRPOConfig, trainer: Trainer, rank: int = 0, world: int = 1):
        assert 0 <= rank < world, (rank, world)
        self.cfg, self.trainer, self.model, self.rank, self.world = cfg, trainer, trainer.model, rank, world
        # Under LoRA the initial policy is the base with the adapters disabled: no copy is kept.
        self.ref_is_base = cfg.beta > 0 and lora.has_lora(self.model)
        self.ref = copy.deepcopy(self.model).eval().requires_grad_(False) \
            if cfg.beta > 0 and not self.ref_is_base else None

    def logprobs(self, model, batch: Rollouts, rows: slice, entropy: bool = False):
        with self.trainer.autocast():
            return completion_token_logprobs(model, batch.input_ids[rows], batch.completion_mask[rows], entropy)

    def reference_logprobs(self, batch: Rollouts, rows: slice) -> torch.Tensor:
        """log pi_ref of `rows`: the frozen copy's, or under LoRA the base's (adapters disabled)."""
        with torch.no_grad():
            if self.ref is not None:
                return self.logprobs(self.ref, batch, rows)[0]
            with lora.disabled(self.model):
                return self.logprobs(self.model, batch, rows)[0]

    def shard(self, rows: slice) -> slice:
        """This rank's contiguous part of minibatch `rows` (all of it when world == 1)."""
        n = rows.stop - rows.start
        return slice(rows.start + n * self.rank // self.world, rows.start + n * (self.rank + 1) // self.world)

    def normalizer(self, batch: Rollouts, rows: slice) -> float | None:
        """The loss denominator of minibatch `rows`, divided among the ranks: each rank's loss is its rows'
        sum over (whole minibatch's normaliser / world), so the ranks' averaged gradient is the whole one's."""
        n_rows, agg = rows.stop - rows.start, self.cfg.loss_agg
        if agg == "constant":
            return n_rows * self.cfg.max_tokens / self.world
        if self.world == 1:
            return None  # policy_loss's own: this minibatch's active tokens or sequences
        whole = float(batch.completion_mask[rows].sum().clamp(min=1)) if agg == "token" else n_rows
        return whole / self.world

    def __call__(self, batch: Rollouts) -> dict[str, float]:
        """`updates_per_batch` passes over `minibatches` minibatches of whole groups; one optimizer step each."""
        cfg, G = self.cfg, self.cfg.group_size
        B = batch.input_ids.shape[0]
        on_policy = cfg.updates_per_batch == 1 and cfg.minibatches == 1
        old_logp = ref_logp = None
        with torch.no_grad():
            if not on_policy:  # the policy that sampled, frozen before the first update
                old_logp = self.logprobs(self.model, batch, slice(0, B))[0]
            if self.ref is not None or self.ref_is_base:
                ref_logp = self.reference_logprobs(batch, slice(0, B))
        groups_per_mb = max(1, batch.num_groups // cfg.minibatches)
        stats: dict[str, list[float]] = {k: [] for k in ("loss", "clip_fraction", "kl", "ratio_mean", "grad_norm")}
        entropy = None
        for _ in range(cfg.updates_per_batch):
            for start in range(0, batch.num_groups, groups_per_mb):
                rows = slice(start * G, min(batch.num_groups, start + groups_per_mb) * G)
                mine = self.shard(rows)
                if mine.stop > mine.start:  # a data-parallel rank may hold none of a small minibatch
                    logp, ent = self.logprobs(self.model, batch, mine, entropy=entropy is None)
                    mask = batch.completion_mask[mine]
                    if ent is not None:
                        entropy = float((ent * mask).sum() / mask.sum().clamp(min=1))
                    out = policy_loss(
                        logp, logp.detach() if on_policy else old_logp[mine], batch.advantages[mine], mask,
                        epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, beta=cfg.beta,
                        ref_logp=None if ref_logp is None else ref_logp[mine], agg=cfg.loss_agg,
                        normalizer=self.normalizer(batch, rows),
                        importance_sampling_level=cfg.importance_sampling_level,
                    )
                    self.trainer.backward(out.loss)
                    for k in ("clip_fraction", "kl", "ratio_mean"):
                        stats[k].append(getattr(out, k))
                    stats["loss"].append(float(out.loss.detach()))
                step = self.trainer.optimizer_step()
                stats["grad_norm"].append(step["grad_norm"])
                for k in ("moe_load_max_over_mean", "moe_load_worst"):  # MoE: expert balance on this update's tokens
                    if k in step:
                        stats.setdefault(k, []).append(step[k])
        result = {k: sum(v) / len(v) for k, v in stats.items() if v}
        result["entropy"] = entropy if entropy is not None else 0.0
        return result


__all__ = ["Rollouts", "PolicyUpdate", "load_policy"]
