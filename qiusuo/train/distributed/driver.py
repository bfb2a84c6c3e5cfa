"""`RayGRPO`: the GRPO stage with rollouts on Ray actors and a data-parallel learner group.

The driver runs the same `Trainer.fit` loop as the single process (metrics.jsonl, progress,
Ctrl-C, checkpoints, `--resume`), the same `RolloutBuilder` (advantages, zero-variance
filtering, dynamic sampling, the same metrics) and the same `grpo_step`; only the three parts
they are handed run remotely:

    sample    the step's prompts (same per-prompt seeds) -> RolloutPool, N engine actors
    update    the batch -> LearnerGroup, M ranks each running `PolicyUpdate` on its slice; then the
              new weights -> rollout workers (version + 1)
    evaluate  held-out problems on rollout worker 0

The driver keeps a CPU copy of the model and an optimizer of the same shape only to write
checkpoints: `RayTrainer.save` pulls rank 0's weights and optimizer state into them first, so a
checkpoint is the single process's layout and either kind of run can resume it. On `--resume`
the checkpoint is loaded on the driver and pushed to every learner and rollout worker. A
killed driver takes its actors (and a local Ray) with it; `--resume` continues from the last
checkpoint. Per step the metrics add `rollout_workers`, `rollout_retries`, `rollout_stale`,
`rollout_version_lag` and `rollout_prompts` to the single process's fields.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from qiusuo.tasks.prompts import chat_template

from ..data import load_task
from ..final import save_final
from ..grpo import RolloutBuilder, grpo_step, run_metadata
from ..loop import FitResult, Trainer, setup_torch
from ..policy import Rollouts, load_policy
from ..state import load_optimizer, optimizer_tensors
from .cluster import ray_session


class RayTrainer(Trainer):
    """The driver's Trainer: batches stay on the CPU, checkpoints pull the learners' state first."""

    def __init__(self, cfg, model, tokenizer, metadata: dict[str, Any], pull_state: Callable[[], tuple]):
        super().__init__(cfg, model, tokenizer, "grpo", metadata=metadata)
        self.device = torch.device("cpu")  # the driver only pads rollouts; learners move them to their device
        self.amp_dtype = None
        self._pull_state = pull_state

    def save(self):
        weights, tensors, groups = self._pull_state()
        self.model.load_state_dict(weights)
        load_optimizer(self.optimizer, tensors, groups)
        return super().save()


class RayGRPO:
    """`RayGRPO(cfg).run()`; cfg.ray, cfg.address, cfg.rollout_workers, cfg.learner_workers choose the layout."""

    def __init__(self, cfg, task: Any = None, model=None, tokenizer=None,
                 on_step: Callable[[int, dict], None] | None = None):
        self.cfg, self.on_step = cfg, on_step
        setup_torch(cfg)
        self._task_arg = task if task is not None else cfg.task  # what the workers rebuild the task from
        self.task = load_task(self._task_arg, cfg.template)
        # The driver's copy stays on the CPU: the reference lives on the learners, the engines on the workers.
        self.model, self.tokenizer = load_policy(cfg, model, tokenizer, device="cpu")
        self.tokenizer.chat_template = chat_template(self.task, self.tokenizer)  # checkpoints render prompts as trained
        self.trainer = RayTrainer(cfg, self.model, self.tokenizer, run_metadata(cfg, self.task),
                                  pull_state=lambda: self.learners.state())
        self.rollout_builder = RolloutBuilder(cfg, self.task, self.tokenizer, self._sample, self.trainer.device)
        self.rollouts = self.learners = None
        self.version = 0

    # ------------------------------------------------------------------ run
    def run(self) -> FitResult:
        cfg = self.cfg
        with ray_session(cfg.address, num_cpus=cfg.rollout_workers + cfg.learner_workers) as ray:
            try:
                self._start(ray)
                self.trainer.resume_if_asked()
                self._push_state(ray)
                result = self.trainer.fit(self.train_step)
            finally:
                self._stop()
        if result.status == "completed":
            save_final(self.trainer, "grpo", parent=cfg.model)
        return result

    def train_step(self, step: int) -> dict[str, Any]:
        return grpo_step(self.cfg, step, self.rollout, self.update, self.evaluate, self.on_step)

    def _start(self, ray) -> None:
        from .learner import LearnerGroup
        from .rollout import RolloutPool

        init = ray.put({k: v.detach().cpu() for k, v in self.model.state_dict().items()})
        self.learners = LearnerGroup(ray, self.cfg, self.model.config, self.tokenizer, init)
        self.rollouts = RolloutPool(ray, self.cfg, self.model.config, self.tokenizer, self._task_arg)

    def _push_state(self, ray) -> None:
        """Driver's model and optimizer (initial, or just resumed) -> learners; weights -> rollout workers."""
        weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        tensors, groups = optimizer_tensors(self.trainer.optimizer)
        self.learners.load_state(weights, tensors, groups)
        self.version = self.trainer.step
        self.rollouts.set_weights(ray.put(weights), self.version)

    def _stop(self) -> None:
        for part in (self.rollouts, self.learners):
            if part is not None:
                part.shutdown()

    # ------------------------------------------------------------------ the three remote parts
    def _sample(self, problems: list, seeds: list[int]):
        t0 = time.perf_counter()
        outs, scores = self.rollouts.sample(problems, seeds)
        # wall time of the parallel rollout
        return outs, [o for r in outs for o in r.outputs], scores, time.perf_counter() - t0

    def rollout(self, step: int) -> tuple[Rollouts | None, dict]:
        batch, stats = self.rollout_builder(step)
        seen = self.rollouts.take_stats()
        stats.update(rollout_workers=len(self.rollouts.actors), rollout_retries=seen.retries,
                     rollout_stale=seen.stale, rollout_version_lag=seen.version_lag, rollout_prompts=seen.prompts)
        return batch, stats

    def update(self, batch: Rollouts) -> dict[str, float]:
        metrics = self.learners.update(batch, lr=self.trainer.optimizer.param_groups[0]["lr"])
        self.version += 1
        self.rollouts.set_weights(self.learners.weights_ref(), self.version)
        return metrics

    def evaluate(self, num_problems: int | None = None, seed: int = 1234) -> dict[str, float]:
        return self.rollouts.evaluate(num_problems or self.cfg.eval_problems, seed)

    def rollout_pids(self) -> list[int]:
        """Process ids of the rollout workers (for fault-injection tests)."""
        return self.rollouts.pids()


__all__ = ["RayGRPO", "RayTrainer"]
