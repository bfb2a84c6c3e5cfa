"""GRPO on Ray (slow): rollout actors + a data-parallel learner reproduce the single process; a killed
rollout worker is restarted and its prompts re-issued; a killed driver resumes from its checkpoint.

Tolerance: the Ray run is the same computation as the single process (same weights, same per-prompt
seeds, counter-based sampling noise, the same update on the same batch), so the tests ask for equal
reward statistics (abs 1e-6) and equal weights (atol 1e-6); with 2 learners the gradients are
averaged across ranks, which changes float summation order only (weights atol 1e-4).

One local Ray (127.0.0.1, 4 logical CPUs, 150 MB object store, no dashboard) serves the module and
is shut down at its end; the CLI test joins it with --address, as a driver joins a real cluster.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import helpers
from helpers import DigitsTask

ROOT = Path(__file__).resolve().parents[1]
HAVE_RAY = importlib.util.find_spec("ray") is not None
requires_ray = pytest.mark.skipif(not HAVE_RAY, reason="the Ray extra is not installed: pip install 'qiusuo[ray]'")
P, STEPS = 4, 4
REWARD_KEYS = ("reward_mean", "reward_std", "accuracy", "format_rate", "zero_variance_frac", "truncation_rate",
               "completion_len", "empty_think_rate", "groups_used", "tokens")

torch.set_num_threads(1)


class EvalDigitsTask(DigitsTask):
    template = "compact"  # what qiusuo.eval reads to encode prompts (the toy task of tests/helpers.py has none)


def cfg(base, out, **kw):
    from qiusuo.train.config import GRPOConfig

    args = dict(model=base, out=str(out), prompts_per_step=P, group_size=8, max_tokens=6, steps=STEPS, lr=3e-3,
                threads=1, progress=False)
    return GRPOConfig(**{**args, **kw})


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "final" / "model.safetensors")


def assert_same_rewards(a: list[dict], b: list[dict], abs_tol: float = 1e-6) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in REWARD_KEYS:
            assert ra[k] == pytest.approx(rb[k], abs=abs_tol), (ra["step"], k, ra[k], rb[k])


def assert_close_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, worst


# ------------------------------------------------------------------ no Ray
def test_without_ray_flag_ray_is_never_imported(tmp_path):
    script = f"""
import sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
import torch
from qiusuo.model import build_model, save_model
from qiusuo.train.config import GRPOConfig
from qiusuo.train.grpo import GRPO
import qiusuo.cli.train, qiusuo.train.distributed
from helpers import DigitsTask
m, tok = build_model("tiny-dense", num_hidden_layers=2)
base = str(save_model(m, tok, {str(tmp_path / 'base')!r}))
GRPO(GRPOConfig(model=base, out={str(tmp_path / 'run')!r}, prompts_per_step=2, group_size=2, max_tokens=4,
                steps=1, threads=1, progress=False), task=DigitsTask()).run()
print("ray imported:", "ray" in sys.modules)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "ray imported: False" in r.stdout


def test_ray_flags_are_validated(tmp_path, make_checkpoint):
    base = str(make_checkpoint(num_hidden_layers=1))
    with pytest.raises(ValueError, match="--address .* needs --ray"):
        cfg(base, tmp_path / "r", address="127.0.0.1:6379")
    with pytest.raises(ValueError, match="--rollout-workers 5 > --prompts-per-step 4"):
        cfg(base, tmp_path / "r", ray=True, rollout_workers=5)
    with pytest.raises(ValueError, match="--learner-workers must be >= 1"):
        cfg(base, tmp_path / "r", ray=True, learner_workers=0)


# ------------------------------------------------------------------ on a local Ray
@pytest.fixture(scope="module")
def ray_cluster():
    from qiusuo.train.distributed import ray_session

    with ray_session(num_cpus=4) as ray:
        import ray.cloudpickle

        for module in (helpers, sys.modules[__name__]):  # the workers cannot import the test modules
            ray.cloudpickle.register_pickle_by_value(module)
        yield ray


@pytest.fixture(scope="module")
def base(make_checkpoint):
    return str(make_checkpoint(num_hidden_layers=2))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, base, ray_cluster):
    """The single-process run and the Ray run (2 rollout workers, 1 learner) of the same config and seed."""
    from qiusuo.train.distributed import RayGRPO
    from qiusuo.train.grpo import GRPO

    root = tmp_path_factory.mktemp("runs")
    GRPO(cfg(base, root / "single"), task=DigitsTask()).run()
    RayGRPO(cfg(base, root / "ray", ray=True, rollout_workers=2), task=DigitsTask()).run()
    return root / "single", root / "ray"



@pytest.mark.slow
@requires_ray
def test_two_rollout_workers_reproduce_the_single_process(runs, ray_cluster):
    single, ray_run = runs
    one, two = rows(single), rows(ray_run)
    assert_same_rewards(one, two)
    assert one[-1]["reward_mean"] > one[0]["reward_mean"]  # it learns (the toy task's optimum is all digits)
    assert_close_weights(final_weights(single), final_weights(ray_run), atol=1e-6)
    for r in two:  # the single process's fields, plus the Ray run's own
        assert set(one[0]) <= set(r)
        assert r["rollout_workers"] == 2 and r["rollout_prompts"] == P
        assert r["rollout_version_lag"] == 0 and r["rollout_retries"] == 0 and r["rollout_stale"] == 0
    assert (ray_run / "checkpoints" / f"step-{STEPS:06d}").is_dir()
    meta = json.loads((ray_run / "final" / "qiusuo.json").read_text())
    assert meta["stage"] == "grpo" and meta["recipe"]["ray"] is True
    assert ray_cluster.get_runtime_context().gcs_address.startswith("127.0.0.1:")


@pytest.mark.slow
@requires_ray
def test_killed_rollout_worker_is_restarted_and_its_prompts_reissued(tmp_path, base, runs):
    from qiusuo.train.distributed import RayGRPO

    grpo = RayGRPO(cfg(base, tmp_path / "kill", ray=True, rollout_workers=2), task=DigitsTask())
    killed = []

    def kill_worker(step, metrics):
        if step == 1:  # after step 2's update: step 3's chunk for this worker hits a dead process
            pid = grpo.rollout_pids()[1]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    grpo.on_step = kill_worker
    assert grpo.run().status == "completed"
    got = rows(tmp_path / "kill")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # no lost, no duplicated step
    assert all(r["rollout_prompts"] == P for r in got)  # every prompt of every step used exactly once
    assert killed and sum(r["rollout_retries"] for r in got) >= 1
    assert all(r["rollout_retries"] == 0 for r in got[:2])
    # Re-issued prompts keep their seeds and weights: the run equals the undisturbed one.
    assert_same_rewards(got, rows(runs[1]))
    assert_close_weights(final_weights(tmp_path / "kill"), final_weights(runs[1]), atol=0.0)


@pytest.mark.slow
@requires_ray
def test_interrupted_ray_run_resumes_exactly(tmp_path, base, runs):
    from qiusuo.train.distributed import RayGRPO

    first = RayGRPO(cfg(base, tmp_path / "split", ray=True, rollout_workers=2), task=DigitsTask())
    first.on_step = lambda step, m: setattr(first.trainer, "_stop_requested", step == 1)  # Ctrl-C in step 2
    assert first.run().status == "interrupted"
    second = RayGRPO(cfg(base, tmp_path / "split", ray=True, rollout_workers=2, resume=True), task=DigitsTask())
    assert second.run().step == STEPS
    assert [r["step"] for r in rows(tmp_path / "split")] == list(range(1, STEPS + 1))
    assert_same_rewards(rows(tmp_path / "split"), rows(runs[1]))
    assert_close_weights(final_weights(tmp_path / "split"), final_weights(runs[1]), atol=0.0)


@pytest.mark.slow
@requires_ray
def test_two_learners_with_gloo_match_one(tmp_path, base, runs):
    """Also --eval-every, which runs on rollout worker 0."""
    from qiusuo.train.distributed import RayGRPO

    RayGRPO(cfg(base, tmp_path / "m2", ray=True, rollout_workers=2, learner_workers=2, eval_every=2, eval_problems=4),
            task=EvalDigitsTask()).run()
    got = rows(tmp_path / "m2")
    assert_same_rewards(got[:1], rows(runs[1])[:1])  # same weights at step 1: same samples
    assert_close_weights(final_weights(tmp_path / "m2"), final_weights(runs[1]), atol=1e-4)
    assert "eval_accuracy" in got[1] and 0 <= got[1]["eval_pass1"] <= 1 and "eval_accuracy" not in got[0]


@pytest.mark.slow
@requires_ray
def test_killed_cli_driver_resumes_on_the_cluster(tmp_path, base, ray_cluster):
    """`qiusuo grpo --ray --address ...` joins the running cluster; SIGKILL the driver after its first
    checkpoint; the same command with --resume continues from its newest checkpoint, every step logged
    once. (--steps may change on resume: the schedule is constant, so the first run asks for a million
    and is killed long before the end.)"""
    from qiusuo.local_ray import ray_env
    from qiusuo.train.state import list_checkpoints

    env = {**os.environ, **ray_env(os.environ["RAY_AUTH_TOKEN_PATH"]), "PYTHONUNBUFFERED": "1"}
    address = ray_cluster.get_runtime_context().gcs_address
    run = tmp_path / "cli"
    cmd = [sys.executable, "-m", "qiusuo", "grpo", "--ray", "--address", address, "--model", base, "--out", str(run),
           "--save-every", "2", "--prompts-per-step", "4", "--group-size", "4", "--max-tokens", "6", "--threads", "1",
           "--no-progress"]
    with open(tmp_path / "first.log", "wb") as log:
        driver = subprocess.Popen(cmd + ["--steps", "1000000"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        # Any complete checkpoint will do: old ones are pruned as new ones land, and a step can take
        # ~20 ms, so step-000002 itself may come and go between two polls (it did, in CI).
        deadline = time.monotonic() + 240
        while not list_checkpoints(run):
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
    finally:
        driver.kill()  # SIGKILL: no Ctrl-C handler, no final checkpoint
        driver.wait(timeout=60)
    assert driver.returncode == -signal.SIGKILL
    last = int(list_checkpoints(run)[-1].name.split("-")[1])
    r = subprocess.run(cmd + ["--steps", str(last + 2), "--resume"], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"at step {last}" in r.stdout
    assert [x["step"] for x in rows(run)] == list(range(1, last + 3))
    assert (run / "final" / "model.safetensors").is_file()
