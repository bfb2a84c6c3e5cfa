"""bench/edge.py's plumbing around llama.cpp's tools: a built tree is reused, not rebuilt; a tool's
output and peak RSS come back; a failing or hanging tool is an error that names it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import edge  # noqa: E402


def test_built_tools_are_reused(tmp_path, monkeypatch):
    bin_dir = tmp_path / "build" / "bin"
    bin_dir.mkdir(parents=True)
    for tool in edge.TOOLS:
        (bin_dir / tool).write_text("")
    monkeypatch.setattr(edge.subprocess, "run", lambda *a, **k: pytest.fail(f"rebuilt: {a}"))
    assert edge.build_llama_cpp(tmp_path / "build", None) == bin_dir  # cmake build dir; its bin/ holds the tools


def test_run_tool_returns_stdout_and_the_tools_peak_rss():
    code = "x = bytearray(64 << 20); print('[{\"ok\": 1}]')"  # touches 64 MiB
    out, rss = edge.run_tool([sys.executable, "-c", code], timeout=120)
    assert out.strip() == '[{"ok": 1}]'
    assert rss >= 64  # MiB, the child's own peak (wait4), not this process's


def test_run_tool_errors_name_the_tool():
    with pytest.raises(RuntimeError, match="failed"):
        edge.run_tool([sys.executable, "-c", "import sys; sys.exit(3)"], timeout=60)
    with pytest.raises(TimeoutError, match="over 1 s"):
        edge.run_tool([sys.executable, "-c", "import time; time.sleep(30)"], timeout=1)
