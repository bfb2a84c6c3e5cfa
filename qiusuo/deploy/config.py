"""`DeployConfig`: one model's Ray Serve application (replicas, autoscaling, health, server knobs).

Light on purpose (no ray, no torch): the CLI builds its flags and defaults from it
(qiusuo/cli/flags.py), with the server's and the engine's from ServerConfig and EngineConfig. The
defaults follow Ray Serve's `AutoscalingConfig` (ray/serve/config.py), shortened for small CPU models: a replica of a tiny
model starts in seconds, so waiting Ray's 30 s before adding one and 600 s before removing one
would only show as queueing on a 2-core box.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from qiusuo.fields import check_choices, option

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
    model: str = option(help="registry NAME[:TAG] or checkpoint directory, as given")
    model_path: str = option(help="the resolved checkpoint directory the replicas load")
    app_name: str = option("", "Serve application name (default: from NAME)", flag="--name")
    served_model_name: str = option("", "the `model` clients send (default: NAME)")
    route_prefix: str = option("", "URL prefix of this model (default: /<app name>)")
    # autoscaling (Ray Serve `autoscaling_config`)
    min_replicas: int = option(1, "fewest replicas (0: none while idle)")
    max_replicas: int = option(2, "most replicas")
    target_ongoing_requests: float = option(2.0, "desired running + queued requests per replica")
    max_ongoing_requests: int = option(8, "per-replica cap enforced by Serve's proxy (about the engine's batch "
                                          "on 2 cores)")
    upscale_delay_s: float = option(10.0, "seconds over target before adding a replica", flag="--upscale-delay")
    downscale_delay_s: float = option(60.0, "seconds under target before removing one", flag="--downscale-delay")
    look_back_period_s: float = option(10.0, "seconds of load the autoscaler averages", flag="--look-back-period")
    metrics_interval_s: float = option(2.0, "seconds between the replicas' load reports to the autoscaler",
                                       flag="--metrics-interval")
    # health: Ray calls the replica's check_health every period; a failure or a dead actor restarts it
    health_check_period_s: float = option(5.0, "seconds between health checks of a replica",
                                          flag="--health-check-period")
    health_check_timeout_s: float = option(30.0, "seconds a health check may take before the replica counts "
                                                 "as failed", flag="--health-check-timeout")
    # resources per replica (a 2-core machine fits four 0.5-CPU replicas)
    num_cpus: float = option(0.5, "Ray CPUs reserved per replica")
    threads: int = option(1, "torch threads per replica's engine (replicas share the cores)")
    # the OpenAI server (qiusuo.serve.ServerConfig) and engine (qiusuo.engine.EngineConfig) knobs,
    # checked here so that a bad one fails before Ray starts
    server_options: dict[str, Any] = option({}, "ServerConfig fields")
    engine_options: dict[str, Any] = option({}, "EngineConfig fields (dtype, quantization, max_model_len, ...)")
    report_interval_s: float = option(1.0, "seconds between each replica's metric reports to the dashboard",
                                      flag="--report-interval")
    # the Bearer key's FILE (0600): the replicas read the key from it. The key itself never enters
    # this config, which Ray keeps in its GCS and shows in `serve status`-like dumps (see manager.py);
    # `deploy()` sets it (no flag: the user's key comes with --api-key / --api-key-file / QIUSUO_API_KEY)
    api_key_file: str = ""

    def __post_init__(self):
        check_choices(self)
        if not self.model or not self.model_path:
            raise ValueError("model and model_path must be non-empty (a registry name and its checkpoint directory)")
        self.app_name = self.app_name or app_name_for(self.model)
        if "api_key" in self.server_options:
            raise ValueError("server_options may not hold api_key: the config is visible to anyone who can read "
                             "Ray's state; `deploy()` stores the key in a 0600 file and sets api_key_file")
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
        self.check_options()

    def check_options(self) -> None:
        """Build the replicas' ServerConfig and EngineConfig once here (both light), so that a bad option
        is refused by the command, not by every replica after Ray started."""
        from qiusuo.engine.config import EngineConfig
        from qiusuo.serve.config import ServerConfig

        for key in ("num_threads", "device"):
            if key in self.engine_options:
                raise ValueError(f"engine_options[{key!r}]: a replica's engine runs on its `threads` CPU threads "
                                 "(num_cpus reserves the CPUs); set threads instead")
        if "served_model_name" in self.server_options:
            raise ValueError("server_options['served_model_name']: set DeployConfig.served_model_name instead")
        try:
            ServerConfig(served_model_name=self.served_model_name, **self.server_options)
            EngineConfig(**self.engine_options)
        except TypeError as e:  # an unknown key
            raise ValueError(f"server_options / engine_options: {e}; use ServerConfig / EngineConfig field names")

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
