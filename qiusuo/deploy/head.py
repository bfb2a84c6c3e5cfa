"""The detached local Ray head: `python -m qiusuo.deploy.head`, started and stopped by `qiusuo deploy`.

`qiusuo deploy` must return while the deployment keeps running. A Ray head started by
`ray.init()` dies with the process that started it, so the CLI spawns this small daemon in a
new session (no terminal, no process group shared with the shell) and waits for it to write
its state file. The daemon owns the head: it runs `ray.init` bound to loopback, starts Serve's
HTTP proxy on 127.0.0.1:PORT, deploys the dashboard app, writes
`$QIUSUO_HOME/deploy/head.json` (pid, GCS address, port) and sleeps. On SIGTERM (from
`qiusuo deploy stop`) it shuts Serve down, then `ray.shutdown()` ends the raylet, GCS and
workers it started, and it removes the state file. Stopping therefore signals one pid we
started, never "all Ray processes on the machine" as `ray stop` would.

The head is started by qiusuo.local_ray's `ray_init`: bound to loopback (Serve's proxy too) and
with Ray's token authentication, the token file of this deployment being
$QIUSUO_HOME/deploy/auth_token, so a test's cluster never reads or writes ~/.ray/auth_token.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from qiusuo.local_ray import LOOPBACK, ray_init

from .config import DASHBOARD_APP, DASHBOARD_ROUTE


def deploy_dashboard(http_port: int) -> None:
    from ray import serve

    from .monitor import Monitor

    serve.run(Monitor.bind(http_port), name=DASHBOARD_APP, route_prefix=DASHBOARD_ROUTE, blocking=False)


def write_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)  # readers never see half a file


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qiusuo.deploy.head", description=__doc__.split("\n")[0])
    p.add_argument("--state-file", required=True, type=Path)
    p.add_argument("--port", type=int, required=True, help="Serve's HTTP port on 127.0.0.1")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs Ray may hand out (default: all)")
    p.add_argument("--object-store-mb", type=int, default=150)
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    kwargs = {"object_store_memory": args.object_store_mb << 20}
    if args.num_cpus is not None:
        kwargs["num_cpus"] = args.num_cpus
    token_path = args.state_file.with_name("auth_token")
    ray_init(token_path, **kwargs)
    import ray
    from ray import serve

    # After ray.init: Ray installs a C++ handler that dies on SIGTERM without shutting Serve down.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())

    try:
        serve.start(http_options={"host": LOOPBACK, "port": args.port})
        deploy_dashboard(args.port)
        write_state(args.state_file, {
            "pid": os.getpid(), "address": ray.get_runtime_context().gcs_address, "port": args.port,
            "owned": True, "token_path": str(token_path), "started": time.time(), "ray_version": ray.__version__,
        })  # fmt: skip
        print(f"ready: Ray head {ray.get_runtime_context().gcs_address}, Serve on http://{LOOPBACK}:{args.port}",
              flush=True)
        while not stop.wait(1.0):
            pass
        print("stopping", flush=True)
        serve.shutdown()
    finally:
        ray.shutdown()
        args.state_file.unlink(missing_ok=True)
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
