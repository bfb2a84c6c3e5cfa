"""Starting Ray on this machine, privately: shared by `qiusuo deploy` and `qiusuo grpo --ray`.

Loopback: Ray replaces 127.0.0.1 in `_node_ip_address` by the machine's routable address
(`services.resolve_ip_for_localhost`) unless multi-node clustering is off, so `ray_env` sets
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray's switch for single-node clusters) before ray is
imported; the node and the addresses it advertises are then 127.0.0.1. Ray 2.60's token
authentication guards the cluster's RPC ports (Ray binds some of them on all interfaces
whatever the node address): the head and every driver that joins it run with
RAY_AUTH_MODE=token and a token file of their own (mode 0600), never ~/.ray/auth_token.

Light on purpose (no ray import at module level): the deploy CLI and the trainer import it on
paths that must work without the Ray extra installed.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

LOOPBACK = "127.0.0.1"
NAMESPACE = "qiusuo"  # Ray namespace of qiusuo's drivers (Serve itself lives in "serve")


def ray_env(token_path: str | os.PathLike) -> dict[str, str]:
    """Environment of the head and of the drivers that join it (set before ray is imported)."""
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_path)}


def ensure_token(path: Path) -> Path:
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    return path


def ray_init(token_path: Path, **kwargs) -> None:
    """`ray.init` for a new local head, always on loopback and without Ray's web dashboard."""
    os.environ.update(ray_env(ensure_token(token_path)))
    import ray

    ray.init(_node_ip_address=LOOPBACK, include_dashboard=False, namespace=NAMESPACE, **kwargs)


__all__ = ["LOOPBACK", "NAMESPACE", "ray_env", "ensure_token", "ray_init"]
