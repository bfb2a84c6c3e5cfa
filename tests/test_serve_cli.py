"""`qiusuo serve` and `qiusuo deploy` run as a user runs them (`python -m qiusuo`, subprocesses):

- a checkpoint whose config.json is broken: the command prints the load error and exits 1, in
  both engine modes (before: it kept running, answering /health with the error, forever);
- the same for `qiusuo deploy` (slow, needs Ray): the application is torn down, the error shown;
- the API key from `--api-key-file` or $QIUSUO_API_KEY, so it is not in `ps` (before: only
  `--api-key KEY`, on the command line of the server for every user to read).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers import wait_healthy

from qiusuo.cli.serve import api_key, load_engine

ROOT = Path(__file__).resolve().parent.parent
MSG = [{"role": "user", "content": "hi"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def qiusuo(*args: str, home: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if k != "QIUSUO_API_KEY"}
    env = {**base, "QIUSUO_HOME": str(home), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "qiusuo", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=home)


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint) -> Path:
    return make_checkpoint(max_position_embeddings=256, num_hidden_layers=1)


@pytest.fixture
def broken(checkpoint, tmp_path) -> Path:
    """The checkpoint with a config.json that names a model that cannot be built (a string where the
    hidden size goes)."""
    import shutil

    path = Path(shutil.copytree(checkpoint, tmp_path / "broken"))
    config = json.loads((path / "config.json").read_text())
    config["hidden_size"] = "wide"
    (path / "config.json").write_text(json.dumps(config))
    return path


# ---------------------------------------------------------------------- load errors
@pytest.mark.parametrize("mode", ["--engine-process", "--no-engine-process"])
def test_serve_exits_1_when_the_model_cannot_load(broken, tmp_path, mode):
    port = free_port()
    proc = qiusuo("serve", "--model", str(broken), "--port", str(port), "--threads", "1", mode, home=tmp_path)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, (out, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith("qiusuo serve: error: the model") and "could not be loaded" in last, err
    with pytest.raises(Exception) as loading:  # what loading it here says: the child's error, word for word
        load_engine(broken, device="cpu", dtype="auto")
    assert f"{type(loading.value).__name__}: {loading.value}" in last, err
    assert "Traceback" not in err, err


# ---------------------------------------------------------------------- the API key
def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"api_key": None, "api_key_file": None, **kw})


def test_api_key_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("QIUSUO_API_KEY", raising=False)
    assert api_key(_args()) is None
    monkeypatch.setenv("QIUSUO_API_KEY", "from-env")
    assert api_key(_args()) == "from-env"
    f = tmp_path / "key"
    f.write_text("from-file\n")
    assert api_key(_args(api_key_file=str(f))) == "from-file"  # the file wins over the environment
    assert api_key(_args(api_key="flag")) == "flag"
    with pytest.raises(ValueError, match="not both"):
        api_key(_args(api_key="flag", api_key_file=str(f)))
    f.write_text("\n")
    with pytest.raises(ValueError, match="first line is empty"):
        api_key(_args(api_key_file=str(f)))
    with pytest.raises(ValueError, match="cannot read it"):
        api_key(_args(api_key_file=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="no spaces"):
        api_key(_args(api_key="two words"))


def _cmdlines() -> str:
    """Every process's command line that we may read (what `ps aux` shows)."""
    out = []
    for p in Path("/proc").iterdir():
        try:
            out.append((p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return "\n".join(out)


def test_serve_reads_the_key_from_a_file_and_keeps_it_out_of_ps(checkpoint, tmp_path):
    key = "k-" + os.urandom(8).hex()
    (tmp_path / "key").write_text(key + "\n")
    port = free_port()
    proc = qiusuo("serve", "--model", str(checkpoint), "--port", str(port), "--threads", "1", "--served-model-name",
                  "tiny", "--api-key-file", str(tmp_path / "key"), "--log-level", "warning", home=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
        assert key not in _cmdlines()  # neither the API process nor its engine process shows it
        body = {"model": "tiny", "messages": MSG, "max_tokens": 2}
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 401
        r = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                       timeout=60)
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


# ---------------------------------------------------------------------- deploy (Ray)
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="the Ray extra is not installed: "
                    "pip install 'qiusuo[ray]'")
def test_deploy_of_a_broken_checkpoint_fails_and_is_torn_down(broken, tmp_path):
    port = free_port()
    proc = qiusuo("deploy", str(broken), "--port", str(port), "--ray-num-cpus", "2", "--health-check-period", "2",
                  home=tmp_path)
    try:
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 1, (out, err)
        with pytest.raises(Exception) as loading:
            load_engine(broken, device="cpu", dtype="auto")
        assert str(loading.value) in err and "Traceback" not in err.split("error:")[-1], err
        status = qiusuo("deploy", "status", "--json", home=tmp_path)
        s_out, s_err = status.communicate(timeout=120)
        apps = json.loads(s_out)["applications"] if s_out.strip().startswith("{") else []
        assert not [a for a in apps if a["app"] == "broken"], s_out  # torn down: no failed app holds the route
    finally:
        if proc.poll() is None:
            proc.kill()
        stop = qiusuo("deploy", "stop", home=tmp_path)
        stop.communicate(timeout=180)
