"""Rollout workers (Ray actors running the engine on a model copy) and the driver's pool of them.

A step's prompts are cut into contiguous chunks, one per worker; each prompt keeps the seed the
single process gives it (`RolloutBuilder.problems`), and the engine's noise depends only on
(seed, token index), so a chunk's samples do not depend on which worker draws them or with what
else it is batched. That is what makes re-issuing safe: a chunk lost with a killed worker is sent again
(to the next worker in line, which may be the restarted one) and comes back the same.

Weights travel as a state_dict through Ray's object store with a version (the number of updates
that produced them). Every chunk reports the version it was sampled with; the pool rejects a
stale chunk (a worker restarted by Ray comes back with no weights), re-sends the current
weights and re-issues it, and counts both (`rollout_stale`, `rollout_retries` in the metrics):
nothing stale is ever used silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ..data import load_task
from ..grpo import sample_groups
from .cluster import actor_resources, split_evenly

MAX_ATTEMPTS = 4  # per chunk and step: a worker death, a stale version, then the neighbours


@dataclass
class RolloutChunk:
    outs: list  # RequestOutput per prompt, in the order given
    scores: list  # Score per completion, group-major
    version: int  # weights version the chunk was sampled with
    seconds: float


class RolloutWorker:
    """One model copy + one `LLM`. Built from the config and the tokenizer alone (no checkpoint path:
    the node need not see the driver's disk); weights arrive through `set_weights`."""

    def __init__(self, cfg, model_config, tokenizer, task: Any):
        from qiusuo.engine import LLM
        from qiusuo.model import Transformer

        torch.set_num_threads(cfg.threads)
        self.cfg, self.tokenizer = cfg, tokenizer
        self.model = Transformer(model_config).to(cfg.device).eval().requires_grad_(False)
        self.task = load_task(task, cfg.template)
        # On a live module the LLM drops its prefix cache at every call, so new weights loaded in
        # place are never mixed with keys/values cached under the old ones.
        self.llm = LLM(model=self.model, tokenizer=self.tokenizer)
        self.version = -1  # no weights yet: the driver sends them before the first rollout

    def set_weights(self, weights: dict[str, torch.Tensor], version: int) -> int:
        if version != self.version:  # a re-send to a worker that is up to date is a no-op
            self.model.load_state_dict(weights)
            self.version = version
        return version

    def sample(self, problems: list, seeds: list[int]) -> RolloutChunk:
        if self.version < 0:  # restarted and not yet re-sent weights: report it, the driver re-sends
            return RolloutChunk([], [], self.version, 0.0)
        outs, _, scores, seconds = sample_groups(self.llm, self.tokenizer, self.task, problems, seeds, self.cfg)
        return RolloutChunk(outs, scores, self.version, seconds)

    def evaluate(self, num_problems: int, seed: int) -> dict[str, float]:
        from ..evaluate import evaluate

        problems = self.task.generate(num_problems, seed=seed, split="test")
        return evaluate(self.llm, self.task, problems, max_tokens=self.cfg.max_tokens, seed=seed)

    def pid(self) -> int:
        return os.getpid()


@dataclass
class PoolStats:
    """What the pool saw while sampling one step: logged with the step's metrics."""

    retries: int = 0  # chunks issued again (worker died or was stale)
    stale: int = 0  # chunks that came back with an old weights version (rejected)
    version_lag: int = 0  # max (current version - version used) over the chunks kept: 0 unless a bug
    prompts: int = 0  # prompts whose samples were kept


class RolloutPool:
    """The driver's side: N actors (restarted by Ray up to `max_restarts` times each)."""

    def __init__(self, ray, cfg, model_config, tokenizer, task, max_restarts: int = 3):
        self.ray = ray
        resources = actor_resources(ray, cfg.device, cfg.rollout_workers + cfg.learner_workers)
        remote = ray.remote(RolloutWorker).options(**resources, max_restarts=max_restarts, max_task_retries=0)
        self.actors = [remote.remote(cfg, model_config, tokenizer, task) for _ in range(cfg.rollout_workers)]
        self.weights, self.version = None, -1
        self.stats = PoolStats()

    def set_weights(self, weights_ref, version: int) -> None:
        """Publish weights (an ObjectRef, fetched by each worker from the object store) as `version`."""
        self.weights, self.version = weights_ref, version
        for actor in self.actors:
            actor.set_weights.remote(weights_ref, version)  # ordered before the actor's next sample call

    def sample(self, problems: list, seeds: list[int]) -> tuple[list, list]:
        """Request outputs (P,) and scores (P*G,) in prompt order, as one process would return them."""
        from ray.exceptions import RayActorError

        chunks = [r for r in split_evenly(len(problems), len(self.actors)) if len(r)]
        pending = {self._issue(i, 0, problems, seeds, chunks[i]): (i, 0) for i in range(len(chunks))}
        done: dict[int, RolloutChunk] = {}
        while pending:
            ready, _ = self.ray.wait(list(pending), num_returns=1)
            i, attempt = pending.pop(ready[0])
            try:
                chunk = self.ray.get(ready[0])
            except RayActorError:  # the worker died with the chunk: Ray restarts it; re-issue
                chunk = None
            if chunk is not None and chunk.version == self.version:
                done[i] = chunk
                continue
            if chunk is not None:
                self.stats.stale += 1
            if attempt + 1 >= MAX_ATTEMPTS:
                raise RuntimeError(f"rollout chunk {i} failed {MAX_ATTEMPTS} times (workers dead or never "
                                   "up to date); see the Ray logs of the rollout workers")
            self.stats.retries += 1
            pending[self._issue(i, attempt + 1, problems, seeds, chunks[i], resend=True)] = (i, attempt + 1)
        kept = [done[i] for i in range(len(chunks))]
        self.stats.version_lag = max(self.stats.version_lag, max(self.version - c.version for c in kept))
        self.stats.prompts += sum(len(c.outs) for c in kept)
        return [o for c in kept for o in c.outs], [s for c in kept for s in c.scores]

    def _issue(self, i: int, attempt: int, problems, seeds, rows: range, resend: bool = False):
        # Attempt k goes to worker (i + k) % N: a restarting worker does not hold up the step.
        actor = self.actors[(i + attempt) % len(self.actors)]
        if resend:
            actor.set_weights.remote(self.weights, self.version)
        return actor.sample.remote([problems[j] for j in rows], [seeds[j] for j in rows])

    def take_stats(self) -> PoolStats:
        stats, self.stats = self.stats, PoolStats()
        return stats

    def evaluate(self, num_problems: int, seed: int) -> dict[str, float]:
        return self.ray.get(self.actors[0].evaluate.remote(num_problems, seed))

    def pids(self) -> list[int]:
        return self.ray.get([a.pid.remote() for a in self.actors])

    def shutdown(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)


__all__ = ["RolloutWorker", "RolloutPool", "RolloutChunk", "PoolStats"]
