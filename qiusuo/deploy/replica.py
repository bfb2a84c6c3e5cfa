"""`ModelServer`: one Ray Serve replica running the OpenAI server of qiusuo.serve, unchanged.

The replica loads the checkpoint in its constructor (on a thread, so Serve's event loop keeps
answering), builds THE app of `qiusuo.serve.create_app` over the loaded engine and hands it to
Serve as its ASGI ingress (`__serve_build_asgi_app__`, Serve's late-bound ingress). Serve runs
the app's lifespan, which starts the engine thread. Loading before the app exists means a
replica turns RUNNING only when it can answer: a request never meets the server's 503
"loading" phase, and a checkpoint that fails to load fails the deployment with its error.

Health: `check_health` (called by Serve every `health_check_period_s`) fails when the engine
thread has died or stopped; Serve then replaces the replica, as it does when the process dies.
Monitoring: every `report_interval_s` the replica sends its counters (read from its own
Prometheus registry) to the dashboard app, which sums the replicas (see stats.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

from ray import serve

from .config import DASHBOARD_APP, DeployConfig
from .stats import read_counters

log = logging.getLogger("qiusuo.deploy")


def load_engine(config: DeployConfig):
    import torch

    from qiusuo.engine import LLM

    torch.set_num_threads(config.threads)  # several replicas share the cores: one thread each by default
    return LLM(config.model_path, num_threads=config.threads, **config.engine_options).llm_engine


def read_api_key(path: str) -> str:
    """The key `deploy` stored (manager.store_api_key); the config holds only this path."""
    try:
        key = Path(path).read_text().strip()
    except OSError as e:
        raise RuntimeError(f"cannot read the API key file {path}: {e}; on a multi-node cluster the file must "
                           "exist at this path on every node") from None
    if not key:
        raise RuntimeError(f"the API key file {path} is empty")
    return key


@serve.deployment
@serve.ingress()
class ModelServer:
    async def __init__(self, config: dict[str, Any]):
        from qiusuo.serve import create_app

        from qiusuo.registry import lease_materialized

        self.config = DeployConfig(**config)
        # held for the replica's life (released by the kernel when it dies): `qiusuo models rm`
        # of the model or of an adapter under it is refused, naming this deployment
        holder = f"deployment {self.config.app_name} (Ray Serve replica)"
        adapters = (self.config.engine_options.get("lora_modules") or {}).values()
        self._leases = [lease for path in (self.config.model_path, *adapters)
                        if (lease := lease_materialized(path, holder)) is not None]
        api_key = read_api_key(self.config.api_key_file) if self.config.api_key_file else None
        engine = await asyncio.to_thread(load_engine, self.config)
        self.server_app = create_app(engine, served_model_name=self.config.served_model_name, api_key=api_key,
                                     **self.config.server_options)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.started = time.time()
        self._reporter = asyncio.get_running_loop().create_task(self._report_loop())

    def __serve_build_asgi_app__(self):
        return self.server_app  # (not `self.app`: Serve's wrapper owns that name)

    # ------------------------------------------------------------------ health
    async def check_health(self) -> None:
        """Raise (so Serve restarts this replica) when the engine cannot serve any more."""
        state = self.server_app.state.qiusuo
        engine = state.engine
        if engine is None:  # the lifespan attaches it before the replica is marked RUNNING
            raise RuntimeError(f"no engine: {state.load_error!r}")
        if engine.dead is not None:
            raise RuntimeError(f"the engine thread failed: {engine.dead!r}")
        if not engine.is_alive():  # its stepping thread (or process) is gone: nothing is generated
            raise RuntimeError("the engine is not running")
        if self._reporter.done() and not self._reporter.cancelled():
            self._reporter = asyncio.get_running_loop().create_task(self._report_loop())

    # ------------------------------------------------------------------ monitoring
    def report(self) -> dict[str, Any]:
        state = self.server_app.state.qiusuo
        counters, gauges = read_counters(state.metrics.registry, self.config.served_model_name)
        engine = state.engine
        healthy = engine is not None and engine.dead is None
        return {
            "app": self.config.app_name, "model": self.config.served_model_name,
            "route_prefix": self.config.route_prefix, "replica_id": self.replica_id, "pid": os.getpid(),
            "started": self.started, "time": time.time(), "healthy": healthy,
            "counters": counters, "gauges": gauges,
            "autoscaling": {"min_replicas": self.config.min_replicas, "max_replicas": self.config.max_replicas,
                            "target_ongoing_requests": self.config.target_ongoing_requests},
        }

    async def _report_loop(self) -> None:
        handle = None
        while True:
            try:
                if handle is None:
                    handle = serve.get_deployment_handle("Monitor", app_name=DASHBOARD_APP)
                await asyncio.wait_for(handle.report.remote(self.report()), timeout=10)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the dashboard app may be (re)deploying: retry next round
                log.debug("reporting to %s failed: %r", DASHBOARD_APP, e)
                handle = None
            await asyncio.sleep(self.config.report_interval_s)

    async def __del__(self):
        reporter = getattr(self, "_reporter", None)  # absent when the constructor failed
        if reporter is not None:
            reporter.cancel()
