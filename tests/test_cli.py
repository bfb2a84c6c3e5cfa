"""The `qiusuo` command: help, version, and the model commands end to end."""

from __future__ import annotations

import pytest

from qiusuo import __version__
from qiusuo.cli import main
from qiusuo.model import load_model


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "init" in out and "info" in out


def test_every_command_has_working_help(capsys):
    """Regression: `qiusuo pretrain --help` crashed on a '%' in a generated help string."""
    from qiusuo.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    for name, parser in sub.choices.items():
        text = parser.format_help()
        assert name in text


def test_init_then_info(tmp_path, capsys):
    assert main(["init", "--preset", "tiny-dense", "--out", str(tmp_path / "m")]) == 0
    model, tokenizer = load_model(tmp_path / "m")
    assert model.config.vocab_size == tokenizer.vocab_size
    assert main(["info", "--model", str(tmp_path / "m")]) == 0
    assert "kv_cache_bytes_per_token" in capsys.readouterr().out


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["info", "--model", str(tmp_path / "nope")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_user_mistakes_print_one_line_never_a_traceback(tmp_path, monkeypatch, capsys):
    """Each mistake below raised a traceback (an OSError that is not FileNotFoundError, a
    SandboxError) or crashed deep in torch (a config.json asking for 100000 layers)."""
    import json

    from qiusuo.tasks.sandbox import SandboxError

    good = tmp_path / "good"
    assert main(["init", "--preset", "tiny-dense", "--out", str(good)]) == 0
    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "config.json").write_text(json.dumps({"model_type": "qwen2", "num_hidden_layers": 100000}))
    home_is_a_file = tmp_path / "home"
    home_is_a_file.write_text("")
    capsys.readouterr()
    assert main(["info", "--model", str(huge)]) == 2
    monkeypatch.setenv("QIUSUO_HOME", str(home_is_a_file))
    assert main(["models", "import", str(good), "--name", "m"]) == 2

    def sandbox_unusable(args):
        raise SandboxError("the sandbox could not fork its worker: RLIMIT_NPROC=32 ...\nsecond line")

    monkeypatch.setattr("qiusuo.cli.model.info", sandbox_unusable)
    assert main(["info", "--model", str(good)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and not any("Traceback" in line for line in err), err
    assert "num_hidden_layers=100000 must be in [1, 1024]" in err[0]
    assert "not a directory; point QIUSUO_HOME at a directory" in err[1]
    assert err[2].startswith("qiusuo info: error: the sandbox could not fork") and "second line" in err[2]
