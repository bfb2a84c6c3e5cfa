"""What `qiusuo deploy` does: start or join Ray, run a model as a Serve application, status, stop.

Lifecycle (see head.py): the first `deploy` spawns the detached head daemon unless `--address`
names a cluster to join; every command then connects to the head as a short-lived Ray driver,
acts, and disconnects, leaving the applications to Serve's detached controller. The state file
`$QIUSUO_HOME/deploy/head.json` says where the head is (GCS address, HTTP port, daemon pid).
`stop NAME` deletes one application; `stop` alone deletes every qiusuo application and, when
the head is ours, stops the daemon (which shuts Ray down). Both are harmless when nothing runs.

The API key never travels in the application's config: Ray pickles a deployment's init
arguments into its GCS (the Serve controller's checkpoint, the replica actors' creation specs)
and the dashboard, `serve` CLI and state API show deployment configs; a runtime_env's env_vars
are shown by the state API and the dashboard too. So `deploy(config, api_key=KEY)` writes the key
to `$QIUSUO_HOME/deploy/keys/APP.key` (0600, in a 0700 directory) and the config carries only
that path; each replica reads it when it starts (the replicas run on this machine as this user;
on a multi-node cluster the file must exist at the same path on every node). `stop` removes it.
This module and its siblings import ray only inside functions (as does qiusuo.train.distributed).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from qiusuo.local_ray import LOOPBACK, NAMESPACE, ensure_token, ray_env
from qiusuo.registry.index import pid_alive

from .config import DASHBOARD_APP, DASHBOARD_ROUTE, DeployConfig


class DeployError(ValueError):
    """A user-facing deploy error (the CLI prints it and exits 2)."""


class ModelLoadError(DeployError):
    """The replicas could not load the model (their constructor failed): the application has been
    deleted and the CLI exits 1, as `qiusuo serve` does when its model cannot load."""


_EXCEPTION_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$")


def _load_error(text: str) -> str | None:
    """The last `SomeError: message` line of a replica's traceback as Serve reports it, if any."""
    for line in reversed(text.splitlines()):
        m = _EXCEPTION_LINE.match(line)
        if m and not m.group(1).startswith(("Ray", "RuntimeError")):
            return f"{m.group(1)}: {m.group(2)}"
    return None


def state_path(home: str | os.PathLike | None = None) -> Path:
    from qiusuo.registry import default_home

    return (Path(home) if home is not None else default_home()) / "deploy" / "head.json"


def read_state(home: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The running head's state, or None (a state file left by a dead daemon is removed)."""
    path = state_path(home)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        path.unlink(missing_ok=True)
        return None
    if state.get("owned") and not pid_alive(int(state["pid"])):
        path.unlink(missing_ok=True)
        return None
    return state


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT leftover is not "in use"
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def start_head(port: int, *, home=None, num_cpus: float | None = None, object_store_mb: int = 150,
               timeout: float = 180.0) -> dict[str, Any]:
    """Spawn the head daemon (new session, log in $QIUSUO_HOME/deploy/head.log) and wait for it."""
    if not 1 <= port <= 65535:
        raise DeployError(f"--port {port}: must be 1-65535")
    if port_in_use(port):
        raise DeployError(f"port {port} on {LOOPBACK} is already in use (another server?); pick a free one "
                          "with --port, or stop what is listening there")
    path = state_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    log_path = path.with_name("head.log")
    cmd = [sys.executable, "-m", "qiusuo.deploy.head", "--state-file", str(path), "--port", str(port),
           "--object-store-mb", str(object_store_mb)]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    env = {**os.environ, **ray_env(ensure_token(path.with_name("auth_token")))}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_state(home)
        if state is not None and state.get("pid") == proc.pid:
            return state
        if proc.poll() is not None:
            raise DeployError(f"the Ray head exited with code {proc.returncode} while starting; its log "
                              f"({log_path}) ends with:\n{_tail(log_path)}")
        time.sleep(0.5)
    proc.terminate()
    raise DeployError(f"the Ray head did not start within {timeout:.0f} s; see {log_path}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def connect(state: dict[str, Any]) -> None:
    """Join the head as a driver. Our head is on loopback with its own token: the driver needs Ray's
    single-node switch too (or it looks for a raylet on the machine's routable address) and the token.
    A cluster joined with --address uses the caller's environment (RAY_AUTH_TOKEN, ...)."""
    if state.get("token_path"):
        os.environ.update(ray_env(state["token_path"]))
    import ray

    if not ray.is_initialized():
        ray.init(address=state["address"], namespace=NAMESPACE, log_to_driver=False, configure_logging=False)


DEFAULT_PORT = 8000


def ensure_head(port: int | None, *, address: str | None = None, home=None, **head_options) -> dict[str, Any]:
    """The running head's state, or a new head (`port` None: the running one's, else DEFAULT_PORT)."""
    state = read_state(home)
    if state is not None:
        port = state["port"] if port is None else port
        if address is not None and state["address"] != address:
            raise DeployError(f"a deployment is already running on Ray at {state['address']}; stop it first "
                              f"(`qiusuo deploy stop`) to use {address}")
        if port != state["port"]:
            raise DeployError(f"the running deployment serves on port {state['port']}, not {port}; omit --port "
                              "or stop it first (`qiusuo deploy stop`)")
        return state
    port = DEFAULT_PORT if port is None else port
    if address is None:
        return start_head(port, home=home, **head_options)
    if port_in_use(port):  # checked before Serve's proxy tries (and fails quietly) to bind it
        raise DeployError(f"port {port} on {LOOPBACK} is already in use; pick a free one with --port")
    state = {"pid": None, "address": address, "port": port, "owned": False, "started": time.time()}
    connect(state)
    from ray import serve

    from .head import deploy_dashboard

    serve.start(http_options={"host": LOOPBACK, "port": port})
    deploy_dashboard(port)
    from .head import write_state

    write_state(state_path(home), state)
    return state


def key_path(app_name: str, home=None) -> Path:
    return state_path(home).with_name("keys") / f"{app_name}.key"


def store_api_key(app_name: str, key: str, home=None) -> Path:
    """Write `key` to a file only this user can read (created 0600, replaced atomically)."""
    path = key_path(app_name, home)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    os.replace(tmp, path)
    return path


def deploy(config: DeployConfig, *, port: int | None = None, address: str | None = None, home=None,
           api_key: str | None = None, **head_options) -> dict[str, Any]:
    """Run `config` as the Serve application `config.app_name`; returns where it answers. `api_key`:
    the Bearer key the application requires, passed to its replicas in a 0600 file (module docstring)."""
    if api_key is not None:
        if not api_key:
            raise DeployError("the API key is empty; give a key or none")
        config.api_key_file = str(store_api_key(config.app_name, api_key, home))
    state = ensure_head(port, address=address, home=home, **head_options)
    connect(state)
    from ray import serve

    from .replica import ModelServer

    if DASHBOARD_APP not in serve.status().applications:  # removed by hand: put it back
        from .head import deploy_dashboard

        deploy_dashboard(state["port"])
    app = ModelServer.options(**config.deployment_options(), max_constructor_retry_count=3).bind(config.to_dict())
    try:
        serve.run(app, name=config.app_name, route_prefix=config.route_prefix, blocking=False)
    except RuntimeError as e:  # Serve says only "failed to update the deployments"; the cause is below
        app_status = serve.status().applications.get(config.app_name)
        details = [d.message for d in app_status.deployments.values() if d.message] if app_status else []
        serve.delete(config.app_name)  # a failed application would only hold its route
        cause = _load_error("\n".join(details) or str(e))
        if cause is not None:
            raise ModelLoadError(f"the model {config.model} could not be loaded by its replicas: {cause} (deployment "
                                 f"{config.app_name} removed; the full traceback is in Ray's serve logs, "
                                 "/tmp/ray/session_latest/logs/serve/)") from None
        raise DeployError(f"deploying {config.model} failed: {e}\n" + "\n".join(details)) from None
    base = f"http://{LOOPBACK}:{state['port']}"
    return {"app": config.app_name, "url": f"{base}{config.route_prefix}/v1", "model": config.served_model_name,
            "dashboard": f"{base}{DASHBOARD_ROUTE}", "address": state["address"]}


def fetch_status(home=None, timeout: float = 10.0) -> dict[str, Any] | None:
    """The dashboard's JSON status, or None when nothing is deployed."""
    state = read_state(home)
    if state is None:
        return None
    url = f"http://{LOOPBACK}:{state['port']}{DASHBOARD_ROUTE}/api/status"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return {**json.loads(r.read()), "address": state["address"], "pid": state.get("pid")}
    except (urllib.error.URLError, OSError) as e:
        raise DeployError(f"the deployment's status page {url} did not answer ({e}); is the head still "
                          f"starting? Its log: {state_path(home).with_name('head.log')}") from None


def stop(name: str | None = None, *, home=None, timeout: float = 60.0) -> str:
    """Delete application `name`, or everything (and our head). Harmless when nothing runs."""
    state = read_state(home)
    if state is None:
        return "nothing is deployed"
    connect(state)
    from ray import serve

    apps = [a for a in serve.status().applications if a != DASHBOARD_APP]
    if name is not None:
        if name not in apps:
            return f"{name} is not deployed (deployed: {', '.join(apps) or 'none'})"
        serve.delete(name)
        key_path(name, home).unlink(missing_ok=True)
        return f"stopped {name}"
    for a in apps:
        serve.delete(a)
        key_path(a, home).unlink(missing_ok=True)
    if not state.get("owned"):
        serve.delete(DASHBOARD_APP)
        state_path(home).unlink(missing_ok=True)
        return f"stopped {len(apps)} application(s); the cluster at {state['address']} keeps running"
    import ray

    ray.shutdown()  # disconnect before the head goes away
    pid = int(state["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid_alive(pid):
        raise DeployError(f"the Ray head (pid {pid}) did not stop within {timeout:.0f} s; see its log "
                          f"{state_path(home).with_name('head.log')}")
    return f"stopped {len(apps)} application(s) and the Ray head"
