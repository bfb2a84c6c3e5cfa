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
