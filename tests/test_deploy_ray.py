"""`qiusuo deploy` end to end on a real local Ray Serve (slow): the CLI returns and the deployment
keeps serving; the official openai client through it; two models side by side; autoscaling
1 -> 2 -> 1 under bounded load; the dashboard in headless Chromium (screenshot saved); a replica
killed under load. Every load loop is bounded in requests and seconds and targets 127.0.0.1.

The module shares one deployment (a detached Ray head under a temporary QIUSUO_HOME, ~15 s to
start); the tests run in file order and the last one stops it. Figures are printed (pytest -s).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from test_deploy import ROOT, run_cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="the Ray extra is not installed: "
                       "pip install 'qiusuo[ray]'"),
]
FAST_SCALING = ["--min-replicas", "1", "--max-replicas", "2", "--target-ongoing-requests", "1",
                "--max-ongoing-requests", "4", "--upscale-delay", "1", "--downscale-delay", "4",
                "--look-back-period", "2", "--metrics-interval", "0.5", "--health-check-period", "2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, home: Path, port: int):
        self.home, self.port, self.base = home, port, f"http://127.0.0.1:{port}"

    def status(self) -> dict:
        return httpx.get(f"{self.base}/dashboard/api/status", timeout=30).json()

    def app(self, name: str) -> dict:
        return next((a for a in self.status()["applications"] if a["app"] == name), {})

    def wait_for(self, what: str, predicate, timeout: float = 120.0, every: float = 0.5) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if predicate():
                return time.monotonic() - start
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; status: "
                             f"{json.dumps(self.status())[:2000]}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, make_checkpoint):
    from qiusuo.registry import Registry

    home = tmp_path_factory.mktemp("qiusuo-home")
    Registry(home).import_dir(make_checkpoint(max_position_embeddings=256, num_hidden_layers=1), "tiny")
    c = Cluster(home, _free_port())
    started = time.monotonic()
    r = run_cli("deploy", "tiny", "--port", str(c.port), "--ray-num-cpus", "2", *FAST_SCALING, home=home)
    c.deploy_output, c.deploy_s = r.stdout, time.monotonic() - started
    try:
        assert r.returncode == 0, f"deploy failed:\n{r.stdout}\n{r.stderr}\n{_head_log(home)}"
        yield c
    finally:
        run_cli("deploy", "stop", home=home)
        _kill_head(home)


def _head_log(home: Path) -> str:
    log = home / "deploy" / "head.log"
    return "\n".join(log.read_text(errors="replace").splitlines()[-40:]) if log.exists() else ""


def _kill_head(home: Path) -> None:
    """Last resort if `deploy stop` failed: the daemon we started, by its pid (it shuts Ray down)."""
    state = home / "deploy" / "head.json"
    if not state.exists():
        return
    pid = json.loads(state.read_text())["pid"]
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 5)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


class Load:
    """`workers` threads posting completions until stopped, `max_seconds` or `max_requests`.
    Records (start, end, outcome) with monotonic times; outcome is the status code or the error."""

    def __init__(self, url: str, model: str, workers: int, max_tokens: int, max_seconds: float,
                 max_requests: int):
        self.url, self.model, self.max_tokens = url, model, max_tokens
        self.deadline, self.max_requests = time.monotonic() + max_seconds, max_requests
        self.records: list[tuple[float, float, object]] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]

    def _work(self) -> None:
        body = {"model": self.model, "prompt": "hello", "max_tokens": self.max_tokens, "ignore_eos": True}
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set() and time.monotonic() < self.deadline and len(self.records) < self.max_requests:
                t0 = time.monotonic()
                try:
                    outcome: object = client.post(self.url, json=body).status_code
                except httpx.HTTPError as e:
                    outcome = type(e).__name__
                with self.lock:
                    self.records.append((t0, time.monotonic(), outcome))

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for *_, o in list(self.records):
            out[str(o)] = out.get(str(o), 0) + 1
        return out


# ---------------------------------------------------------------------------- tests, in order
def test_deploy_returns_and_the_openai_client_works(cluster):
    from openai import NotFoundError, OpenAI

    print(f"\ndeploy returned in {cluster.deploy_s:.1f} s:\n{cluster.deploy_output}")
    assert f"http://127.0.0.1:{cluster.port}/tiny/v1" in cluster.deploy_output
    client = OpenAI(base_url=f"{cluster.base}/tiny/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 8
    chunks = list(client.completions.create(model="tiny", prompt="2+2=", max_tokens=6, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    # Ollama's and Anthropic's APIs under the same route prefix (issue 19)
    import anthropic
    import ollama

    o = ollama.Client(host=f"{cluster.base}/tiny", timeout=60).chat(
        model="tiny:latest", messages=[{"role": "user", "content": "hi"}], stream=False, options={"num_predict": 4})
    assert o.done and o.eval_count == 4
    m = anthropic.Anthropic(base_url=f"{cluster.base}/tiny", api_key="unused", max_retries=0, timeout=60).messages.create(
        model="tiny", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 4
    r = run_cli("deploy", "status", home=cluster.home)
    assert r.returncode == 0 and "tiny" in r.stdout and "RUNNING" in r.stdout and "replica " in r.stdout, r.stderr
    print(r.stdout)
    r = run_cli("deploy", "tiny", "--port", str(_free_port()), home=cluster.home)  # another port: refused
    assert r.returncode == 2 and f"serves on port {cluster.port}" in r.stderr
    # the deploying CLI has exited; the replicas hold the lease on the directory they serve from
    r = run_cli("models", "rm", "tiny", home=cluster.home)
    assert r.returncode == 2 and "in use by pid" in r.stderr and "deployment tiny (Ray Serve replica)" in r.stderr, \
        r.stderr


def test_two_models_side_by_side(cluster):
    from openai import NotFoundError, OpenAI

    r = run_cli("deploy", "tiny", "--name", "other", "--route-prefix", "/other", "--served-model-name", "other",
                "--min-replicas", "1", "--max-replicas", "1", home=cluster.home)  # no --port: the running one's
    assert r.returncode == 0, r.stderr
    other = OpenAI(base_url=f"{cluster.base}/other/v1", api_key="unused", max_retries=0, timeout=60)
    tiny = OpenAI(base_url=f"{cluster.base}/tiny/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in other.models.list().data] == ["other"]
    assert other.completions.create(model="other", prompt="a", max_tokens=3).usage.completion_tokens == 3
    assert tiny.completions.create(model="tiny", prompt="a", max_tokens=3).usage.completion_tokens == 3
    with pytest.raises(NotFoundError):  # each application serves its own name only
        other.completions.create(model="tiny", prompt="a", max_tokens=3)
    assert {a["app"] for a in cluster.status()["applications"]} == {"tiny", "other"}
    assert run_cli("deploy", "stop", "other", home=cluster.home).stdout.strip() == "stopped other"
    again = run_cli("deploy", "stop", "other", home=cluster.home)
    assert again.returncode == 0 and "other is not deployed" in again.stdout
    cluster.wait_for("/other to go away", lambda: httpx.get(f"{cluster.base}/other/v1/models").status_code == 404, 30)



RAY_DUMP = """
import json, os, sys
from pathlib import Path
from qiusuo.deploy.manager import connect, read_state
connect(read_state())
import ray
from ray import serve
from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list
needle_key, needle_path = sys.argv[1].encode(), sys.argv[2].encode()
found = {"key": [], "path": []}
def look(where, data):
    data = data if isinstance(data, bytes) else repr(data).encode()
    for name, needle in (("key", needle_key), ("path", needle_path)):
        if needle in data:
            found[name].append(where)
look("serve.status()", serve.status())
look("actor table", ray._private.state.actors())
look("nodes", ray.nodes())
kv = 0
for ns in (None, "serve", "session", "cluster", "job", "dashboard", "runtime_env", "fun", "actor", "internal"):
    for k in _internal_kv_list(b"", namespace=ns):
        kv += 1
        look(f"gcs kv {ns}:{k[:60]!r}", (_internal_kv_get(k, namespace=ns) or b"") + k)
session = Path(ray._private.worker._global_node.get_session_dir_path())
files = 0
for f in session.rglob("*"):
    if f.is_file() and not f.is_symlink():
        files += 1
        try:
            look(f"file {f.relative_to(session)}", f.read_bytes())
        except OSError:
            pass
print(json.dumps({"found": found, "kv_entries": kv, "session_files": files}))
"""


def test_the_api_key_never_enters_rays_state(cluster, tmp_path):
    """Under Ray Serve the key used to travel in the application's config (the replica's init
    arguments): Ray keeps those pickled in its GCS, where the dashboard, the `serve` CLI and anyone
    connected read them; runtime_env env_vars would be listed by the state API as well. Now the
    config holds only the path of a 0600 file; auth still works through the deployment. The dump
    reads every GCS KV entry of Ray's namespaces, the actor table and every file of the session
    directory (logs included): the key file's PATH is found there (so a key in the config would be),
    the key is not."""
    import secrets

    key = "sk-" + secrets.token_hex(16)
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    r = run_cli("deploy", "tiny", "--name", "keyed", "--route-prefix", "/keyed", "--min-replicas", "1",
                "--max-replicas", "1", "--api-key-file", str(key_file), home=cluster.home)
    assert r.returncode == 0, r.stderr
    try:
        stored = cluster.home / "deploy" / "keys" / "keyed.key"
        assert stored.read_text().strip() == key and stored.stat().st_mode & 0o777 == 0o600
        assert stored.parent.stat().st_mode & 0o777 == 0o700
        base = f"{cluster.base}/keyed/v1"
        assert httpx.get(f"{base}/models", timeout=30).status_code == 401
        assert httpx.get(f"{base}/models", headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
        ok = httpx.post(f"{base}/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                        json={"model": "tiny", "prompt": "a", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
        env = {"QIUSUO_HOME": str(cluster.home), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
        dump = subprocess.run([sys.executable, "-c", RAY_DUMP, key, str(stored)], capture_output=True, text=True,
                              env=env, timeout=300, cwd=ROOT)
        assert dump.returncode == 0, dump.stderr[-3000:]
        report = json.loads(dump.stdout.strip().splitlines()[-1])
        print(f"\nRay state read: {report['kv_entries']} GCS KV entries, {report['session_files']} session files; "
              f"the key file's path found in {report['found']['path']}")
        assert report["found"]["key"] == [], f"the API key is readable in Ray's state: {report['found']['key']}"
        assert report["found"]["path"], "the dump did not reach the application's config: it proves nothing"
    finally:
        assert run_cli("deploy", "stop", "keyed", home=cluster.home).stdout.strip() == "stopped keyed"
    assert not (cluster.home / "deploy" / "keys" / "keyed.key").exists()


def test_autoscaling_up_under_load_and_back_down(cluster):
    running = lambda: cluster.app("tiny").get("replica_states", {})  # noqa: E731
    assert running() == {"RUNNING": 1}
    with Load(f"{cluster.base}/tiny/v1/completions", "tiny", workers=6, max_tokens=200, max_seconds=120,
              max_requests=20_000) as load:
        up_s = cluster.wait_for("2 running replicas", lambda: running().get("RUNNING") == 2, timeout=110)
    n_load = len(load.records)
    down_s = cluster.wait_for("back to 1 replica", lambda: running() == {"RUNNING": 1}, timeout=120)
    print(f"\nscaled 1 -> 2 after {up_s:.1f} s of load ({n_load} requests, {load.counts()}); "
          f"back to 1 replica {down_s:.1f} s after the load stopped")
    assert load.counts().keys() == {"200"}, load.counts()


def test_dashboard_renders_in_chromium(cluster, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    client = httpx.Client(timeout=60)
    for _ in range(5):
        r = client.post(f"{cluster.base}/tiny/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 16})
        assert r.status_code == 200
    cluster.wait_for("the requests in the dashboard's figures",
                     lambda: cluster.app("tiny").get("totals", {}).get("requests", 0) >= 5, timeout=30)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
             "--disable-component-update", "--disable-sync", "--virtual-time-budget=5000"]
    url = f"{cluster.base}/dashboard"
    png = tmp_path / "dashboard.png"

    def chrome(*args: str) -> subprocess.CompletedProcess:
        profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
        return subprocess.run([chromium, *flags, f"--user-data-dir={profile}", *args, url], capture_output=True,
                              text=True, timeout=120)

    dom = chrome("--dump-dom").stdout
    shot = chrome("--window-size=1200,640", f"--screenshot={png}")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, shot.stderr
    artifacts = ROOT / "runs" / "test-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    shutil.copy(png, artifacts / "dashboard.png")
    assert 'data-loaded="1"' in dom, dom[-2000:]
    assert '<span class="name">tiny</span>' in dom and 'class="status RUNNING"' in dom
    requests = re.search(r'data-key="requests"><div class="k">requests</div><div class="v">(\d+)</div>', dom)
    assert requests and int(requests.group(1)) >= 5, dom[-3000:]
    assert '<tr class="replica">' in dom and '<canvas class="chart"' in dom
    print(f"\ndashboard: {requests.group(1)} requests shown; screenshot {png.stat().st_size} bytes at "
          f"{artifacts / 'dashboard.png'}")


def test_replica_kill_only_fails_requests_in_flight(cluster):
    r = run_cli("deploy", "tiny", "--name", "steady", "--route-prefix", "/steady", "--served-model-name", "steady",
                "--port", str(cluster.port), "--min-replicas", "2", "--max-replicas", "2",
                "--health-check-period", "2", home=cluster.home)
    assert r.returncode == 0, r.stderr
    reporting = lambda: [x for x in cluster.app("steady").get("replicas", []) if x["state"] == "reporting"]  # noqa: E731
    cluster.wait_for("2 reporting replicas", lambda: len(reporting()) == 2, timeout=60)
    workers = 4
    with Load(f"{cluster.base}/steady/v1/completions", "steady", workers=workers, max_tokens=100, max_seconds=90,
              max_requests=20_000) as load:
        time.sleep(3)
        pids = {x["pid"] for x in reporting()}
        victim = sorted(pids)[0]
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        back_s = cluster.wait_for("a replacement replica", lambda: (
            cluster.app("steady").get("replica_states") == {"RUNNING": 2}
            and len({x["pid"] for x in reporting()} - pids) == 1), timeout=80)
        time.sleep(3)
    records = list(load.records)
    failed = [(s - t_kill, e - t_kill, o) for s, e, o in records if o != 200]
    ok_before = sum(1 for s, e, o in records if o == 200 and e < t_kill)
    ok_while_down = sum(1 for s, e, o in records if o == 200 and t_kill <= s and e <= t_kill + back_s)
    ok_after = sum(1 for s, e, o in records if o == 200 and s > t_kill + back_s)
    print(f"\nreplica kill: pid {victim} killed; replacement running after {back_s:.1f} s; "
          f"{len(records)} requests: {ok_before} ok before, {ok_while_down} ok while it was down, {ok_after} ok after, "
          f"{len(failed)} failed {failed}")
    assert len(failed) <= workers, "more failures than requests that could be in flight"
    assert all(start < 0 for start, _, _ in failed), "a request sent after the kill failed"
    assert ok_while_down > 0 and ok_after > 0, "the service stopped answering"
    assert run_cli("deploy", "stop", "steady", home=cluster.home).stdout.strip() == "stopped steady"


def test_stop_everything_twice(cluster):
    pid = json.loads((cluster.home / "deploy" / "head.json").read_text())["pid"]
    first = run_cli("deploy", "stop", home=cluster.home)
    assert first.returncode == 0 and "and the Ray head" in first.stdout, first.stderr
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    second = run_cli("deploy", "stop", home=cluster.home)
    assert second.returncode == 0 and "nothing is deployed" in second.stdout
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{cluster.base}/dashboard/api/status", timeout=5)
