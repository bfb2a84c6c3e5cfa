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
    code = "import time; x = bytearray(64 << 20); time.sleep(0.5); print('[{\"ok\": 1}]')"  # touches 64 MiB
    held = bytearray(400 << 20)  # this process holds 400 MiB when it starts the tool, as edge.py holds a model
    out, rss = edge.run_tool([sys.executable, "-c", code], timeout=120)
    assert out.strip() == '[{"ok": 1}]'
    assert 64 <= rss < 300, rss  # MiB, the child's own peak; wait4's ru_maxrss reported >= 400 (the parent's)
    del held


def test_a_child_reports_its_own_peak_rss_not_its_parents():
    import results

    held = bytearray(400 << 20)  # a bench process holding a model spawns a worker
    code = "import sys; sys.path.insert(0, sys.argv[1]); import results; print(results.peak_rss_mb())"
    out = edge.subprocess.run([sys.executable, "-c", code, str(Path(edge.__file__).parent)], capture_output=True,
                              text=True, check=True).stdout
    assert float(out) < 300, out  # ru_maxrss said >= 400
    assert results.peak_rss_mb() >= 400
    del held


def test_run_tool_errors_name_the_tool():
    with pytest.raises(RuntimeError, match="failed"):
        edge.run_tool([sys.executable, "-c", "import sys; sys.exit(3)"], timeout=60)
    with pytest.raises(TimeoutError, match="over 1 s"):
        edge.run_tool([sys.executable, "-c", "import time; time.sleep(30)"], timeout=1)


def test_greedy_reference_is_the_single_streams_tokens():
    res = {"tokens": {"single": [list(range(40))], "batch16": [[1] * 32] * 16}, "single_prompt": [5, 6], "x": 1.0}
    prompt, tokens = edge.greedy_reference(res)
    assert prompt == [5, 6] and tokens == list(range(edge.CHECKED))  # was [[0..39]]: never equal to llama.cpp's
    assert res == {"x": 1.0}


def test_variant_names_give_the_engine_options_and_the_pair():
    from engine import qiusuo_side_options

    assert qiusuo_side_options("qiusuo fp32") == ("float32", None, False)
    assert qiusuo_side_options("qiusuo bf16") == ("bfloat16", None, False)
    assert qiusuo_side_options("qiusuo int8-dynamic") == ("float32", "int8-dynamic", False)
    assert qiusuo_side_options("qiusuo int4+compile") == ("float32", "int4", True)
    assert qiusuo_side_options("qiusuo bf16+compile") == ("bfloat16", None, True)
    for bad in ("qiusuo fp16", "qiusuo int4-bf16", "qiusuo int4+bf16"):
        with pytest.raises(ValueError, match="precision"):
            qiusuo_side_options(bad)
    assert [edge.precision(v) for v in ("fp32", "bf16+compile", "int8-dynamic", "int4+compile")] == \
        ["fp32", "bf16", "int8-dynamic", "int4"]


def test_a_segfault_with_repacking_reruns_without_it_for_the_rest_of_the_run():
    calls, no_repack = [], set()

    def side(repack):
        calls.append(repack)
        if repack:
            raise RuntimeError("llama-bench -m x.gguf failed (-11): ")
        return {"repack": repack}

    assert edge.with_repack_fallback(side, no_repack, "q8_0") == {"repack": False}
    assert edge.with_repack_fallback(side, no_repack, "q8_0") == {"repack": False}
    assert calls == [True, False, False] and no_repack == {"q8_0"}
    with pytest.raises(RuntimeError, match="failed \\(3\\)"):  # other failures are not retried
        edge.with_repack_fallback(lambda repack: (_ for _ in ()).throw(RuntimeError("failed (3)")), set(), "f16")


def test_every_kernel_of_bench_kernels_computes_the_matmul():
    import kernels
    import torch

    w, x = torch.randn(64, 128) * 0.05, torch.randn(3, 128)
    ref = x @ w.T
    for kernel in kernels.KERNELS:
        if kernel.startswith("bf16") and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            continue
        if kernel.startswith("int8-dynamic") and "fbgemm" not in torch.backends.quantized.supported_engines:
            continue
        for head in (False, True):
            y = kernels.build(kernel, w, head)(x).float()
            assert (y - ref).abs().max() < 0.2 * ref.abs().max(), kernel  # int4 groups of 32: ~0.1 of the largest
