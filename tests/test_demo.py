"""`qiusuo demo --quick`: the whole pipeline (pretrain -> eval -> GRPO -> eval -> report) with a tiny budget."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_quick_demo_runs_end_to_end_and_writes_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("QIUSUO_HOME", str(tmp_path / "home"))
    from qiusuo.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--threads", "1", "--no-progress"]) == 0
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    served = report["after_chat_api"]  # the RL model, asked through a real server's chat route
    assert served["route"] == "chat" and served["n"] == report["after"]["problems"], served
    for side in ("before", "after"):
        for key in ("accuracy", "pass1", "format_rate", "length", "empty_think_rate"):
            assert 0 <= report[side][key] <= (1 if key != "length" else 1e9), (side, key)
    assert report["seed"] == 0 and report["wall_seconds"] > 0 and report["cpu_seconds"] > 0
    transfer = report["transfer"]  # the harder held-out set, before and after RL with the same budget
    assert transfer["difficulty"] == 4 and transfer["problems"] == 24, transfer
    assert set(transfer["gain_points"]) == {"accuracy", "pass1"}
    assert transfer["before"]["problems"] == transfer["after"]["problems"] == 24
    assert len(report["curves"]) == 3 and "reward_mean" in report["curves"][0]
    assert (tmp_path / "demo" / "grpo_curves.png").stat().st_size > 1000
    assert (tmp_path / "demo" / "grpo" / "final" / "config.json").is_file()
    choice = report["thread_choice"]  # --threads 1: fixed, and every step ran at 1 thread
    assert report["threads"] == 1 and choice["mode"] == "fixed"
    assert choice["pretrain"]["steps_at"] == {"1": 12} and choice["grpo"]["steps_at"] == {"1": 3}
    assert report["routing"] is None  # a dense preset: no experts to measure


@pytest.mark.slow
def test_quick_moe_demo_reports_routing_and_passes_gspo_to_grpo(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QIUSUO_HOME", str(tmp_path / "home"))
    from qiusuo.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--preset", "tiny-moe", "--out", str(out), "--threads", "1", "--no-progress",
                 "--importance-sampling-level", "sequence", "--minibatches", "2"]) == 0
    grpo = json.loads((out / "grpo" / "config.json").read_text())["config"]
    assert grpo["importance_sampling_level"] == "sequence" and grpo["minibatches"] == 2
    routing = json.loads((out / "report.json").read_text())["routing"]
    assert routing["moe_layers"] == [1, 2, 3] and routing["tokens"]["before"] > 0, routing
    for key in ("balance_before", "balance_after"):
        assert all(1.0 <= x <= routing["balance_max"] for x in routing[key]), routing
    for key in ("changed_on_before", "changed_on_after"):
        assert all(0.0 <= x <= 1.0 for x in routing[key]), routing
    assert "tokens whose top-k expert set changed" in capsys.readouterr().out


def test_demo_rejects_bad_gspo_settings_before_pretraining():
    from qiusuo.train.demo import DemoConfig

    with pytest.raises(ValueError, match="importance_sampling_level|importance-sampling-level"):
        DemoConfig(importance_sampling_level="tokens")
    with pytest.raises(ValueError, match="--minibatches 3"):
        DemoConfig(minibatches=3)  # 16 prompts do not split into 3 minibatches of whole groups


def test_demo_threads_default_to_measured_and_reject_negatives():
    from qiusuo.train.demo import DemoConfig, describe_threads

    assert DemoConfig().threads == 0  # measured by each stage, not resolved from the load average
    with pytest.raises(ValueError, match="--threads"):
        DemoConfig(threads=-1)
    assert describe_threads({"threads": 1}) == "1 (fixed by --threads)"
    line = describe_threads({"threads": 2, "candidates": [1, 2], "measured_first": True,
                             "first_measurement": {"1": 1.6e-4, "2": 0.9e-4}, "rechecks": 1, "switches": 0})
    assert line == "2 (measured: 1 -> 0.160 ms/token, 2 -> 0.090 ms/token; 1 re-check(s), 0 switch(es))"


def test_the_transfer_set_is_one_step_harder_and_never_a_trained_level():
    import qiusuo.tasks as tasks
    from qiusuo.train.demo import DemoConfig, transfer_problems

    task = tasks.get("arithmetic")
    harder = transfer_problems(task, DemoConfig(transfer_problems=30))
    assert len(harder) == 30 and {p.metadata["difficulty"] for p in harder} == {4}
    assert all(len(str(p.metadata["a"])) == len(str(p.metadata["b"])) == 4 for p in harder)
    assert harder == transfer_problems(task, DemoConfig(transfer_problems=30))  # fixed: the same before and after
    assert transfer_problems(task, DemoConfig(transfer_difficulty=0)) == []
    with pytest.raises(ValueError, match="would not measure transfer"):
        transfer_problems(task, DemoConfig(difficulty="2,3,4"))
    with pytest.raises(ValueError, match="--transfer-difficulty"):
        DemoConfig(transfer_difficulty=-1)
    with pytest.raises(ValueError, match="--difficulty"):
        DemoConfig(difficulty="3,x")

def test_demo_budgets_default_per_task_and_explicit_flags_win():
    from qiusuo.train.demo import DemoConfig

    arithmetic = DemoConfig()  # the arithmetic recipe's figures, unchanged
    assert (arithmetic.task, arithmetic.pretrain_steps, arithmetic.grpo_steps, arithmetic.max_tokens,
            arithmetic.p_slip) == ("arithmetic", 900, 70, 48, 0.3)
    countdown = DemoConfig(task="countdown")
    assert (countdown.pretrain_steps, countdown.grpo_steps, countdown.max_tokens, countdown.p_slip) == \
        (800, 300, 128, 0.0)
    assert countdown.pretrain_batch == arithmetic.pretrain_batch  # not per task: the shared default
    explicit = DemoConfig(task="countdown", pretrain_steps=500, grpo_steps=70, max_tokens=48, p_slip=0.3)
    assert (explicit.pretrain_steps, explicit.grpo_steps, explicit.max_tokens, explicit.p_slip) == (500, 70, 48, 0.3)
    with pytest.raises(ValueError, match="--task"):
        DemoConfig(task="chess")
    with pytest.raises(ValueError, match="--max-tokens"):
        DemoConfig(task="countdown", max_tokens=0)


def test_demo_rewrite_scratchpad_flag_builds_its_task_and_longer_budgets():
    from qiusuo.cli import build_parser
    from qiusuo.cli.flags import config_from_args
    from qiusuo.train.demo import DemoConfig, demo_task

    args = build_parser().parse_args(["demo", "--scratchpad", "rewrite", "--difficulty", "1,2,3"])
    cfg = config_from_args(DemoConfig, args)
    assert (cfg.scratchpad, cfg.max_tokens, cfg.transfer_max_tokens, cfg.pretrain_steps) == ("rewrite", 80, 112, 900)
    assert demo_task(cfg).scratchpad == "rewrite" and demo_task(DemoConfig()).scratchpad == "columns"
    assert (DemoConfig().max_tokens, DemoConfig().transfer_max_tokens) == (48, 64)  # the default demo: unchanged
    assert DemoConfig(scratchpad="rewrite", max_tokens=96).max_tokens == 96  # an explicit flag wins
    with pytest.raises(ValueError, match="--scratchpad rewrite is an arithmetic format"):
        DemoConfig(task="countdown", scratchpad="rewrite")


def test_demo_countdown_flags_from_the_command_line():
    from qiusuo.cli import build_parser
    from qiusuo.cli.flags import config_from_args
    from qiusuo.train.demo import DemoConfig

    args = build_parser().parse_args(["demo", "--task", "countdown", "--grpo-steps", "70"])
    cfg = config_from_args(DemoConfig, args)
    assert (cfg.task, cfg.grpo_steps, cfg.pretrain_steps) == ("countdown", 70, 800)


@pytest.mark.slow
def test_quick_countdown_demo_reports_retries_and_verifies(tmp_path, monkeypatch):
    monkeypatch.setenv("QIUSUO_HOME", str(tmp_path / "home"))
    from qiusuo.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--task", "countdown", "--quick", "--out", str(out), "--threads", "1", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "countdown" and report["config"]["max_tokens"] == 128
    for side in ("before", "after"):
        for key in ("retry_rate", "greedy_retry_rate", "retries", "verify_rate", "greedy_verify_rate"):
            assert 0 <= report[side][key] <= (1 if key != "retries" else 1e9), (side, key)
    assert report["registered"] == "qiusuo-demo-countdown:seed0"
    assert len(report["curves"]) == 3 and "completion_len" in report["curves"][0]


def test_smoke_caps_the_per_task_budgets_and_never_raise_them(monkeypatch):
    from qiusuo.cli import build_parser
    from qiusuo.cli.common import apply_smoke
    from qiusuo.cli.flags import config_from_args
    from qiusuo.train.demo import DemoConfig

    monkeypatch.setenv("QIUSUO_SMOKE", "1")
    # an unset --max-tokens stays per task: arithmetic's 48 is under the cap (64), so lowering it would raise it
    for task, max_tokens in (("countdown", 128), ("arithmetic", 48)):
        args = build_parser().parse_args(["demo", "--task", task])
        apply_smoke(args)
        cfg = config_from_args(DemoConfig, args)
        assert (cfg.pretrain_steps, cfg.grpo_steps, cfg.max_tokens) == (12, 3, max_tokens), task
