"""`DeployConfig`: one model's Ray Serve application (replicas, autoscaling, health, server knobs).

Light on purpose (no ray, no torch): the CLI builds its flags and defaults from it. The
defaults follow Ray Serve's `AutoscalingConfig` (ray/serve/config.py), shortened for small CPU models: a replica of a tiny
model starts in seconds, so waiting Ray's 30 s before adding one and 600 s before removing one
would only show as queueing on a 2-core box.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

DASHBOARD_APP = "qiusuo-dashboard"  # the Serve application that serves /dashboard and collects reports
DASHBOARD_ROUTE = "/dashboard"
_APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def app_name_for(model: str) -> str:
    """A Serve application name (and default route) for a registry name or a path:
    `tiny-moe:grpo` -> `tiny-moe-grpo`, `runs/x/final` -> `final`."""
    base = model.rstrip("/").rsplit("/", 1)[-1]
    base = base[:-len(":latest")] if base.endswith(":latest") else base
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-._")
    return name or "model"


@dataclass
class DeployConfig:
    model: str  # registry NAME[:TAG] or checkpoint directory, as given
    model_path: str  # the resolved checkpoint directory the replicas load
    app_name: str = ""  # Serve application; default from `model`
    served_model_name: str = ""  # what clients pass as `model`; default: `model`
    route_prefix: str = ""  # default: /<app_name>
    # autoscaling (Ray Serve `autoscaling_config`)
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 2.0  # desired running + queued requests per replica
    max_ongoing_requests: int = 8  # per-replica cap the proxy enforces (≈ engine batch on 2 cores)
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0
    look_back_period_s: float = 10.0
    metrics_interval_s: float = 2.0
    # health: Ray calls the replica's check_health every period; a failure or a dead actor restarts it
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0
    # resources per replica (a 2-core machine fits four 0.5-CPU replicas)
    num_cpus: float = 0.5
    threads: int = 1  # torch threads per replica's engine
    # the OpenAI server (qiusuo.serve.ServerConfig) and engine (qiusuo.engine.EngineConfig) knobs
    server_options: dict[str, Any] = field(default_factory=dict)
    engine_options: dict[str, Any] = field(default_factory=dict)
    dtype: str = "auto"
    quantization: str | None = None  # low-bit weights per replica: "int8", "int8-dynamic" or "int4" (qiusuo.model.quantize)
    report_interval_s: float = 1.0  # how often each replica reports its metrics to the dashboard

    def __post_init__(self):
        if not self.model or not self.model_path:
            raise ValueError("model and model_path must be non-empty (a registry name and its checkpoint directory)")
        if self.quantization not in (None, "int8", "int8-dynamic", "int4"):
            raise ValueError(f"quantization={self.quantization!r}: use None, 'int8', 'int8-dynamic' or 'int4'")
        self.app_name = self.app_name or app_name_for(self.model)
        if not _APP_NAME.fullmatch(self.app_name) or self.app_name == DASHBOARD_APP:
            raise ValueError(f"app name {self.app_name!r}: use letters, digits and . _ - (starting with a letter "
                             f"or digit), and not {DASHBOARD_APP!r}; set it with --name")
        self.served_model_name = self.served_model_name or self.model
        self.route_prefix = self.route_prefix or f"/{self.app_name}"
        if not self.route_prefix.startswith("/") or self.route_prefix == "/" or self.route_prefix.endswith("/"):
            raise ValueError(f"route_prefix={self.route_prefix!r}: must start with '/', not end with '/', and not "
                             f"be '/' alone (each model gets its own prefix, e.g. /{self.app_name})")
        if self.route_prefix.split("/")[1] == DASHBOARD_ROUTE.strip("/"):
            raise ValueError(f"route_prefix={self.route_prefix!r}: {DASHBOARD_ROUTE} belongs to the dashboard")
        if self.min_replicas < 0:
            raise ValueError(f"min_replicas={self.min_replicas}: must be >= 0")
        if self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"max_replicas={self.max_replicas}: must be >= 1 and >= min_replicas={self.min_replicas}")
        if self.target_ongoing_requests <= 0:
            raise ValueError(f"target_ongoing_requests={self.target_ongoing_requests}: must be > 0")
        if self.max_ongoing_requests < self.target_ongoing_requests:
            raise ValueError(f"max_ongoing_requests={self.max_ongoing_requests} is below target_ongoing_requests="
                             f"{self.target_ongoing_requests}: the autoscaler could never see its target; raise it "
                             "(Ray advises ~20-50% above the target)")
        for name in ("upscale_delay_s", "downscale_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        for name in ("look_back_period_s", "metrics_interval_s", "health_check_period_s", "health_check_timeout_s",
                     "report_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0")
        if self.num_cpus <= 0:
            raise ValueError(f"num_cpus={self.num_cpus}: must be > 0 (fractions such as 0.5 are fine)")
        if self.threads < 1:
            raise ValueError(f"threads={self.threads}: must be >= 1")

    def autoscaling_config(self) -> dict[str, Any]:
        return {
            "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
            "initial_replicas": max(1, self.min_replicas),
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
            "look_back_period_s": self.look_back_period_s, "metrics_interval_s": self.metrics_interval_s,
        }  # fmt: skip

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of `Deployment.options(...)`."""
        return {
            "name": "ModelServer",
            "autoscaling_config": self.autoscaling_config(),
            "max_ongoing_requests": self.max_ongoing_requests,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "ray_actor_options": {"num_cpus": self.num_cpus},
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
