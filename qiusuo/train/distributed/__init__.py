"""Scale-out GRPO on Ray: `qiusuo grpo ... --ray [--address ADDR] --rollout-workers N --learner-workers M`.

    driver.py    RayGRPO: the single process's loop, rollout logic and checkpoints; sampling,
                 updates and evaluation sent to actors
    rollout.py   RolloutWorker (engine on a model copy) and RolloutPool (prompt split, weight
                 versions, restart + re-issue)
    learner.py   Learner ranks (PolicyUpdate on a slice, gradients all-reduced) and LearnerGroup
    cluster.py   start a local Ray on 127.0.0.1 or join --address; actor resources

Ray is imported only inside functions of these modules, and only `RayGRPO.run` calls them, so
importing this package (or running without --ray) never imports ray.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"RayGRPO": "driver", "RayTrainer": "driver", "RolloutPool": "rollout", "RolloutWorker": "rollout",
            "LearnerGroup": "learner", "Learner": "learner", "ray_session": "cluster"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
