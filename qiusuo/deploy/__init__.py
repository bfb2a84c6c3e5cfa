"""One-command deployment on Ray Serve: `qiusuo deploy NAME`, `deploy status`, `deploy stop`.

Each model runs as its own Serve application (route prefix and served-model name) whose
replicas run the unchanged OpenAI server of qiusuo.serve, with Serve's autoscaling, health
checks and replica restarts; a dashboard application serves `/dashboard`. Ray is an optional
extra (`pip install qiusuo[ray]`): this package imports it only inside functions, when a
deployment command runs, so `qiusuo.deploy.config` and `qiusuo.deploy.manager` import without
Ray (so does qiusuo.train.distributed, the other user of Ray; both start it via qiusuo.local_ray).

    config.py    DeployConfig: replicas, autoscaling, health, server and engine knobs
    manager.py   deploy / status / stop, driven by the CLI (the detached lifecycle)
    head.py      the detached local Ray head daemon (`python -m qiusuo.deploy.head`)
    replica.py   ModelServer: the Serve deployment running qiusuo.serve's app
    monitor.py   Monitor: the dashboard app, fed by the replicas' metric reports
    stats.py     StatsBook: per-replica counters -> per-application totals and rates
    static/      dashboard.html + dashboard.js (no build step, no CDN)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DeployConfig": "config", "app_name_for": "config", "DeployError": "manager", "deploy": "manager",
    "fetch_status": "manager", "stop": "manager", "read_state": "manager", "port_in_use": "manager",
    "StatsBook": "stats",
}  # fmt: skip

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
