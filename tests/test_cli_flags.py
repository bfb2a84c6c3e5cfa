"""Flags generated from the config dataclasses (qiusuo/cli/flags.py) and the one check of enumerations.

Before: the engine flags were written by hand in four commands and had drifted (`--dtype` was
`auto` in serve/deploy but `float32`, without `auto`, in generate/eval; deploy had no --quantize),
and a bad enumeration was refused by argparse in one place, by `LLM` in another.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from qiusuo.cli import build_parser, main
from qiusuo.cli.flags import add_engine_flags, engine_options
from qiusuo.deploy.config import DeployConfig
from qiusuo.engine.config import EngineConfig
from qiusuo.serve.config import ServerConfig
from qiusuo.train.config import DistillConfig

ROOT = Path(__file__).resolve().parents[1]
ENGINE_COMMANDS = ("generate", "chat", "eval", "serve", "deploy")
# fields a command leaves to something else, and why (the one documented difference)
NOT_ENGINE_FLAGS = {"deploy": {"--device", "--threads"}}  # replicas: Ray's CPUs, DeployConfig's --threads


def subparsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def describe(parser) -> dict[str, tuple]:
    """flag -> (dest, default, type, metavar, help) of every optional argument."""
    return {s: (a.dest, a.default, a.type, a.metavar, a.help) for a in parser._actions for s in a.option_strings}


def test_every_command_builds_its_engine_flags_with_the_one_helper():
    reference = argparse.ArgumentParser()
    add_engine_flags(reference)
    engine = {k: v for k, v in describe(reference).items() if k not in ("-h", "--help")}
    assert {"--dtype", "--quantize", "--threads", "--device", "--compile", "--compile-mode", "--max-model-len",
            "--max-num-seqs", "--kv-cache-bytes"} <= set(engine)
    parsers = subparsers()
    for name in ENGINE_COMMANDS:
        flags = describe(parsers[name])
        expected = set(engine) - NOT_ENGINE_FLAGS.get(name, set())
        assert expected <= set(flags), (name, expected - set(flags))
        for flag in expected:  # same dest, default, type, choices and help in every command
            assert flags[flag] == engine[flag], (name, flag)
        assert flags["--dtype"][1] == "auto" and flags["--quantize"][1] is None
    # deploy's --threads is DeployConfig.threads (per replica, default 1), not the engine's
    assert describe(parsers["deploy"])["--threads"][:2] == ("threads", 1)


def test_help_shows_the_allowed_values(capsys):
    for name in ENGINE_COMMANDS:
        text = subparsers()[name].format_help()
        assert "--dtype {auto,float32,bfloat16}" in text and "--quantize {int8,int8-dynamic,int4}" in text, name


OLD_FLAGS = {  # the hand-written flags before the generator: every one must still parse (README, scripts)
    "generate": "--model --max-tokens --temperature --top-p --top-k --seed --device --dtype --threads --quantize "
                "--compile --compile-mode --n --raw",
    "chat": "--model --max-tokens --temperature --top-p --top-k --seed --device --dtype --threads --quantize "
            "--compile --compile-mode --system",
    "eval": "--model --task --n --samples --temperature --top-p --max-tokens --difficulty --template --split "
            "--quantize --dtype --compile --compile-mode --out --device --threads --seed",
    "serve": "--model --host --port --api-key --api-key-file --served-model-name --max-queue --max-tokens-cap "
             "--max-output-budget --thinking-budget --device --dtype --threads --quantize --compile --compile-mode "
             "--max-model-len --max-num-seqs --kv-cache-bytes --engine-process --no-engine-process --log-level",
    "deploy": "--port --address --name --served-model-name --route-prefix --min-replicas --max-replicas "
              "--target-ongoing-requests --max-ongoing-requests --upscale-delay --downscale-delay "
              "--look-back-period --metrics-interval --health-check-period --num-cpus --threads --dtype "
              "--max-model-len --max-num-seqs --kv-cache-bytes --api-key --api-key-file --max-queue "
              "--max-tokens-cap --max-output-budget --thinking-budget --ray-num-cpus --object-store-mb --json",
    "distill": "--out --seed --device --threads --steps --lr --warmup-steps --schedule --batch-size --max-length "
               "--teacher --student --task --template --num-prompts --samples-per-prompt --temperature "
               "--max-tokens --keep-per-prompt --register --resume --no-resume",
}


@pytest.mark.parametrize("command", sorted(OLD_FLAGS))
def test_no_flag_was_renamed(command):
    flags = describe(subparsers()[command])
    missing = [f for f in OLD_FLAGS[command].split() if f not in flags]
    assert not missing, missing


def test_flags_map_to_the_right_fields():
    args = build_parser().parse_args(["serve", "--model", "m", "--quantize", "int8-dynamic", "--threads", "3",
                                      "--thinking-budget", "7", "--compile-mode", "max-autotune",
                                      "--no-enable-prefix-caching", "--int4-group-size", "64"])
    assert (args.quantization, args.num_threads, args.default_thinking_budget) == ("int8-dynamic", 3, 7)
    assert args.int4_group_size == 64
    with pytest.raises(ValueError, match="compile with quantization='int8-dynamic' is not supported"):
        engine_options(args)
    args.quantization = None
    options = engine_options(args)
    assert options["compile"] == "max-autotune" and options["enable_prefix_caching"] is False
    assert "seed" not in options  # each command's --seed is its sampling seed
    d = build_parser().parse_args(["deploy", "tiny", "--name", "a", "--upscale-delay", "3", "--threads", "2"])
    assert (d.app_name, d.upscale_delay_s, d.threads) == ("a", 3.0, 2)


# ---------------------------------------------------------------------------- one error, from CLI and Python
BAD = [  # (argv, the message's start)
    (["generate", "--model", "m", "x", "--dtype", "float16"], "dtype='float16' is not allowed: use one of 'auto', "
                                                              "'float32', 'bfloat16' (--dtype on the command line)"),
    (["chat", "--model", "m", "--quantize", "int3"], "quantization='int3' is not allowed: use one of 'int8', "
                                                     "'int8-dynamic', 'int4', None (--quantize on the command line)"),
    (["eval", "--model", "m", "--task", "arithmetic", "--compile-mode", "fastest"],
     "compile='fastest' is not allowed: use one of 'default', 'max-autotune', True, False (--compile, --compile-mode"),
    (["serve", "--model", "m", "--int4-group-size", "16"], "int4_group_size=16 is not allowed: use one of 32, 64, 128"),
    (["deploy", "m", "--dtype", "fp16"], "dtype='fp16' is not allowed"),
    (["pretrain", "--schedule", "linear"], "schedule='linear' is not allowed: use one of 'cosine', 'constant'"),
    (["grpo", "--model", "m", "--loss-agg", "mean"], "loss_agg='mean' is not allowed"),
]  # fmt: skip


@pytest.mark.parametrize("argv, message", BAD, ids=[b[0][0] for b in BAD])
def test_a_bad_enumeration_is_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("QIUSUO_HOME", str(tmp_path))  # nothing is resolved: the flag is refused first
    monkeypatch.setattr("qiusuo.cli.common.note_busy_machine", lambda args: None)  # the load's note is no error
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith(f"qiusuo {argv[0]}: error: {message}"), err


def test_the_python_api_gives_the_same_error(tmp_path, capsys, monkeypatch):
    from qiusuo.engine import LLM

    messages = []
    for make in (lambda: EngineConfig(dtype="float16"), lambda: LLM(str(tmp_path / "none"), dtype="float16"),
                 lambda: DeployConfig(model="m", model_path="/x", engine_options={"dtype": "float16"})):
        with pytest.raises(ValueError) as e:
            make()  # LLM: refused before it looks for the checkpoint
        messages.append(str(e.value))
    monkeypatch.setenv("QIUSUO_HOME", str(tmp_path))
    monkeypatch.setattr("qiusuo.cli.common.note_busy_machine", lambda args: None)  # the load's note is no error
    assert main(["generate", "--model", "m", "x", "--dtype", "float16"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("qiusuo: the machine")]
    assert err == [f"qiusuo generate: error: {messages[0]}"]  # the busy-machine note depends on the load
    assert len(set(messages)) == 1


@pytest.mark.parametrize("kwargs, rule", [
    (dict(compile=1), "compile=1 is not allowed"),  # by type: 1 == True, but it is a mistake
    (dict(dtype=None), "dtype=None"),
    (dict(quantization="int8-dynamic", compile=True), "not supported"),  # int8 and int4 (weight-only) compile
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
])  # fmt: skip
def test_engine_config_checks(kwargs, rule):
    with pytest.raises(ValueError, match=rule):
        EngineConfig(**kwargs)
    assert EngineConfig(compile=True).compile is True and EngineConfig(quantization=None).quantization is None


def test_the_engine_enumerations_match_the_model_transforms():
    import typing

    from qiusuo.engine.config import Int4GroupSize, Quantization
    from qiusuo.model.quantize import INT4_GROUP_SIZES, MODES

    assert typing.get_args(Quantization) == MODES and typing.get_args(Int4GroupSize) == INT4_GROUP_SIZES


@pytest.mark.parametrize("options, rule", [
    ({"engine_options": {"num_threads": 2}}, "set threads instead"),
    ({"engine_options": {"kv_cache_gb": 1}}, "EngineConfig field names"),
    ({"server_options": {"max_queue": 0}}, "max_queue"),
    ({"server_options": {"served_model_name": "x"}}, "DeployConfig.served_model_name"),
])  # fmt: skip
def test_deploy_checks_the_replicas_options_before_ray_starts(options, rule):
    with pytest.raises(ValueError, match=rule):
        DeployConfig(model="m", model_path="/x", **options)


def test_server_config_fields_are_the_serve_flags():
    flags = describe(subparsers()["serve"])
    assert flags["--max-queue"][1] == ServerConfig(served_model_name="m").max_queue
    assert flags["--thinking-budget"][0] == "default_thinking_budget"


def test_distill_declares_only_what_it_reads():
    """DistillConfig used to inherit SFTConfig's --model and --data and declare them "unused"."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    assert not fields & {"model", "data"} and {"teacher", "student", "max_length", "batch_size"} <= fields
    args = build_parser().parse_args(["distill", "--teacher", "t", "--student", "s", "--max-length", "100"])
    assert (args.teacher, args.student, args.max_length) == ("t", "s", 100)
    assert not hasattr(args, "model") and not hasattr(args, "data")


def test_building_the_parser_imports_no_torch():
    code = ("import sys; from qiusuo.cli import build_parser; build_parser(); "
            "heavy = [m for m in ('torch', 'fastapi', 'numpy', 'ray') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_busy_machine_note_reads_the_engine_threads_flag(command, monkeypatch, capsys):
    """--threads is the engine's `num_threads` field: the busy-machine note must still see it unset."""
    import os

    from qiusuo.cli.common import busy_machine_message, note_busy_machine

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.2, 3.0, 2.0))
    argv = {"generate": ["generate", "--model", "m", "x"], "eval": ["eval", "--model", "m", "--task", "arithmetic"]}
    assert note_busy_machine(build_parser().parse_args(argv[command])) == busy_machine_message(3.2, 2, 1)
    assert note_busy_machine(build_parser().parse_args(argv[command] + ["--threads", "2"])) is None
