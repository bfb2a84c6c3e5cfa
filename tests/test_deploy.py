"""qiusuo.deploy without a Ray cluster: config rules, the stats book, the CLI's refusals, import hygiene.

The end-to-end runs on Ray Serve (scaling, openai client, dashboard in Chromium, replica kill)
are in test_deploy_ray.py.
"""

from __future__ import annotations

import ast
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qiusuo.deploy.config import DeployConfig, app_name_for
from qiusuo.deploy.stats import COUNTERS, StatsBook

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*argv: str, home: Path) -> subprocess.CompletedProcess:
    """`qiusuo deploy ...` in a subprocess (registering the command if COMMAND_MODULES lacks it)."""
    shim = ("import sys, qiusuo.cli as c; 'deploy' in c.COMMAND_MODULES or c.COMMAND_MODULES.append('deploy'); "
            "sys.exit(c.main(sys.argv[1:]))")
    env = {"QIUSUO_HOME": str(home), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    return subprocess.run([sys.executable, "-c", shim, *argv], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)


# ---------------------------------------------------------------------------- config
def test_config_defaults_and_names():
    c = DeployConfig(model="tiny-moe:grpo", model_path="/x")
    assert (c.app_name, c.route_prefix, c.served_model_name) == ("tiny-moe-grpo", "/tiny-moe-grpo", "tiny-moe:grpo")
    assert app_name_for("runs/exp1/final/") == "final" and app_name_for("tiny:latest") == "tiny"
    a = c.autoscaling_config()
    assert a["min_replicas"] == 1 and a["max_replicas"] == 2 and a["initial_replicas"] == 1
    opts = c.deployment_options()
    assert opts["ray_actor_options"] == {"num_cpus": 0.5} and opts["max_ongoing_requests"] >= a["target_ongoing_requests"]


@pytest.mark.parametrize("kwargs, rule", [
    ({"min_replicas": 3, "max_replicas": 2}, "max_replicas"),
    ({"max_replicas": 0, "min_replicas": 0}, "max_replicas"),
    ({"target_ongoing_requests": 0}, "target_ongoing_requests"),
    ({"target_ongoing_requests": 8, "max_ongoing_requests": 4}, "max_ongoing_requests"),
    ({"route_prefix": "/"}, "route_prefix"),
    ({"route_prefix": "v1"}, "route_prefix"),
    ({"route_prefix": "/dashboard/x"}, "dashboard"),
    ({"app_name": "qiusuo-dashboard"}, "app name"),
    ({"upscale_delay_s": -1}, "upscale_delay_s"),
    ({"num_cpus": 0}, "num_cpus"),
    ({"engine_options": {"quantization": "int3"}}, "quantization"),
])  # fmt: skip
def test_config_rejects_with_the_rule(kwargs, rule):
    with pytest.raises(ValueError, match=rule):
        DeployConfig(model="m", model_path="/x", **kwargs)


def test_replica_engine_takes_the_quantization(tmp_path):
    """In a child process: importing qiusuo.deploy.replica imports Ray, which reads its auth settings
    once per process, and the Ray tests later in this process start token-authenticated heads."""
    import os
    import subprocess
    import sys

    from qiusuo.model import build_model, save_model

    model, tok = build_model("tiny-dense", seed=0)
    path = save_model(model, tok, tmp_path / "m")
    code = ("import sys\n"
            "from qiusuo.deploy.config import DeployConfig\n"
            "from qiusuo.deploy.replica import load_engine\n"
            "from qiusuo.model.quantize import QuantizedLinear\n"
            "engine = load_engine(DeployConfig(model='m', model_path=sys.argv[1], engine_options={'quantization': 'int4'}))\n"
            "assert any(isinstance(m, QuantizedLinear) and m.mode == 'int4' for m in engine.model.modules())\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


# ---------------------------------------------------------------------------- stats
def _report(app="a", rid="r1", t=0.0, **counters):
    return {"app": app, "replica_id": rid, "pid": 1, "started": 0.0, "healthy": True, "model": "m",
            "route_prefix": "/a", "autoscaling": {"min_replicas": 1, "max_replicas": 2},
            "counters": {k: counters.get(k, 0.0) for k in COUNTERS}, "gauges": {"running": 1.0, "waiting": 2.0}}


def test_stats_book_sums_replicas_by_increase():
    book = StatsBook(window_s=10, sample_every_s=1)
    book.report(_report(rid="r1", requests=10, generation_tokens=100, ttft_sum=1.0, ttft_count=10), now=0)
    book.report(_report(rid="r2", requests=5, generation_tokens=50), now=0.5)
    book.report(_report(rid="r1", requests=20, generation_tokens=300, ttft_sum=1.5, ttft_count=20), now=5)
    s = book.snapshot(now=5)["a"]
    assert s["totals"]["requests"] == 25 and s["totals"]["generation_tokens"] == 350
    assert s["request_rate"] == pytest.approx(10 / 5) and s["tokens_per_s"] == pytest.approx(200 / 5)
    assert s["ttft_s"] == pytest.approx(0.5 / 10)  # the window's mean, not the lifetime mean
    assert s["running"] == 2 and s["waiting"] == 4 and s["num_reporting"] == 2


def test_stats_book_survives_a_replica_restart_and_marks_silent_ones_stale():
    book = StatsBook(window_s=10, sample_every_s=1, stale_after_s=5, forget_after_s=20)
    book.report(_report(rid="r1", requests=50), now=0)
    book.report(_report(rid="r1", requests=3), now=1)  # same id, counter reset (a process restart)
    book.report(_report(rid="r2", requests=4), now=2)  # a replacement replica starts from zero
    s = book.snapshot(now=8)["a"]
    assert s["totals"]["requests"] == 57, "totals never drop when a replica's counters vanish"
    assert all(p["request_rate"] >= 0 for p in s["series"])
    states = {r["replica_id"]: r["state"] for r in s["replicas"]}
    assert states == {"r1": "stale", "r2": "stale"} and s["num_reporting"] == 0
    assert book.snapshot(now=30)["a"]["replicas"] == []  # forgotten after forget_after_s


def test_stats_series_is_a_sliding_window():
    book = StatsBook(window_s=2, sample_every_s=1)
    for t in range(6):
        book.report(_report(requests=10 * t), now=float(t))
    series = book.snapshot(now=5)["a"]["series"]
    assert [p["request_rate"] for p in series] == pytest.approx([10.0] * 5)
    assert [p["t"] for p in series] == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------------------- CLI refusals (no Ray started)
@pytest.fixture(scope="module")
def home(tmp_path_factory, make_checkpoint):
    from qiusuo.registry import Registry

    home = tmp_path_factory.mktemp("qiusuo-home")
    Registry(home).import_dir(make_checkpoint(max_position_embeddings=128, num_hidden_layers=1), "tiny")
    return home


def test_unknown_name_lists_the_known_ones(home):
    r = run_cli("deploy", "nope", home=home)
    assert r.returncode == 2 and "no model 'nope:latest'" in r.stderr and "known: tiny:latest" in r.stderr
    assert not (home / "deploy" / "head.json").exists()


def test_port_in_use_is_refused_before_ray_starts(home):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cli("deploy", "tiny", "--port", str(port), home=home)
    assert r.returncode == 2, r.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in r.stderr and "--port" in r.stderr
    assert not (home / "deploy" / "head.json").exists() and not (home / "deploy" / "head.log").exists()


def test_stop_and_status_with_nothing_deployed_are_harmless(home):
    for argv in (("deploy", "stop"), ("deploy", "stop"), ("deploy", "stop", "tiny"), ("deploy", "status")):
        r = run_cli(*argv, home=home)
        assert r.returncode == 0 and "nothing is deployed" in r.stdout, (argv, r.stderr)
    r = run_cli("deploy", "status", "extra", home=home)
    assert r.returncode == 2 and "unexpected arguments" in r.stderr



def test_the_api_key_goes_to_a_private_file_never_into_the_config(tmp_path):
    """The deployment's config is what Ray pickles into its GCS and shows: it may hold the key's
    path, never the key (the end-to-end check on a live cluster is in test_deploy_ray.py)."""
    from qiusuo.deploy.manager import key_path, store_api_key

    with pytest.raises(ValueError, match="server_options may not hold api_key"):
        DeployConfig(model="tiny", model_path="/x", server_options={"api_key": "sk-1"})
    path = store_api_key("tiny", "sk-secret", tmp_path)
    assert path == key_path("tiny", tmp_path) == tmp_path / "deploy" / "keys" / "tiny.key"
    assert path.read_text() == "sk-secret\n" and path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    store_api_key("tiny", "sk-other", tmp_path)  # replaced, still private
    assert path.read_text() == "sk-other\n" and path.stat().st_mode & 0o777 == 0o600
    config = DeployConfig(model="tiny", model_path="/x", api_key_file=str(path))
    assert "sk-other" not in repr(config.to_dict())


# ---------------------------------------------------------------------------- Ray stays optional
RAY_PACKAGES = ("qiusuo/deploy/", "qiusuo/train/distributed/", "qiusuo/local_ray.py")  # deploy, GRPO --ray


def test_only_the_ray_packages_import_ray():
    offenders = []
    for path in (ROOT / "qiusuo").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(RAY_PACKAGES):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{rel}:{node.lineno}" for n in names if n == "ray" or n.startswith("ray.")]
    assert offenders == []
    code = ("import sys, qiusuo.cli as c, qiusuo.serve.app, qiusuo.deploy, qiusuo.deploy.manager, qiusuo.deploy.stats; "
            "'deploy' in c.COMMAND_MODULES or c.COMMAND_MODULES.append('deploy'); c.build_parser(); "
            "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_dashboard_is_self_contained():
    static = ROOT / "qiusuo" / "deploy" / "static"
    html, js = (static / "dashboard.html").read_text(), (static / "dashboard.js").read_text()
    assert "__ROOT__/static/dashboard.js" in html and "${ROOT}/api/status" in js  # served by the deployment
    for text in (html, js):  # no CDN, no external fonts or scripts
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
