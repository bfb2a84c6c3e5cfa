"""Starting or joining Ray for a training run, and the resources its actors ask for.

A local run starts a private Ray head for the run's lifetime through qiusuo.local_ray's
`ray_init` (the one `qiusuo deploy`'s head uses): bound to 127.0.0.1, no dashboard, a small
object store, and Ray's token authentication with a throw-away token file. The environment it
sets is put back afterwards. `--address` joins a running cluster with the caller's own
environment (RAY_AUTH_TOKEN etc.), as `ray.init(address=...)` does. A Ray that is already
initialised in this process (a test's, a notebook's) is used as it is and left running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from qiusuo.local_ray import NAMESPACE

OBJECT_STORE_MB = 150  # rollout batches and a tiny model's weights are a few MB; real models: raise it


@contextlib.contextmanager
def ray_session(address: str = "", num_cpus: int | None = None,
                object_store_mb: int = OBJECT_STORE_MB) -> Iterator[object]:
    """Yield the `ray` module, connected: to `address`, to this process's Ray, or to a new local head."""
    existing = sys.modules.get("ray")
    if existing is not None and existing.is_initialized():
        yield existing
        return
    if address:
        import ray

        ray.init(address=address, namespace=NAMESPACE)
        try:
            yield ray
        finally:
            ray.shutdown()
        return
    from qiusuo.local_ray import ray_env, ray_init

    token_dir = Path(tempfile.mkdtemp(prefix="qiusuo-ray-"))
    token_path = token_dir / "auth_token"
    saved = {k: os.environ.get(k) for k in ray_env(token_path)}
    kwargs = {"object_store_memory": object_store_mb << 20}
    if num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    try:
        ray_init(token_path, **kwargs)
        import ray

        try:
            yield ray
        finally:
            ray.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(token_dir, ignore_errors=True)


def actor_resources(ray, device: str, num_actors: int) -> dict[str, float]:
    """One CPU slot per actor (it runs torch with --threads); on CUDA one GPU each, or an equal share of
    the cluster's GPUs when there are fewer GPUs than actors (one GPU: learner and engines share it)."""
    if not device.startswith("cuda"):
        return {"num_cpus": 1, "num_gpus": 0}
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus == 0:
        raise ValueError(f"--device {device}: the Ray cluster has no GPUs; use --device cpu or add GPU nodes")
    return {"num_cpus": 1, "num_gpus": 1 if gpus >= num_actors else gpus / num_actors}


def split_evenly(n: int, parts: int) -> list[range]:
    """Contiguous ranges covering 0..n-1, sizes differing by at most one (the first ones larger)."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


__all__ = ["ray_session", "actor_resources", "split_evenly", "OBJECT_STORE_MB"]
