"""Low-bit weights (qiusuo/model/quantize.py): each kernel equals its dequantized matmul, and logits stay
close to fp32.

Error bounds (stated, measured with margin on tiny-dense, initializer_range 0.05): relative max
logit error |q - fp32|max / |fp32|max below 5% for int8 (measured 1.6%), 15% for int8-dynamic
(8-bit activations too; measured 8.3% with 7-bit activations, 5.1% with 8-bit ones on a VNNI CPU), 35% for int4 in groups of 32 (measured 21%). MoE routing is discontinuous (a flipped expert choice
moves a token's output by far more than int8 rounding), so for the MoE model the router bias pins
the expert choice; the experts themselves are checked against `Experts` under identical routing.
"""

from __future__ import annotations

import pytest
import torch

from qiusuo.model import build_model
from qiusuo.model.moe import Experts
from qiusuo.model.quantize import (
    Int4Weight,
    Int8Weight,
    QuantizedExperts,
    QuantizedLinear,
    cpu_has_native_bf16,
    int8_kernel,
    quantize_int4_groupwise,
    quantize_model,
    quantize_per_channel,
)

BOUNDS = {"int8": 0.05, "int8-dynamic": 0.15, "int4": 0.35}


def rel_max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_per_channel_round_trip_is_within_half_a_step():
    w = torch.randn(64, 96) * torch.linspace(0.01, 3.0, 64)[:, None]  # very different row scales
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("kernel", ["int8pack", "fbgemm", "dequant"])
def test_int8_kernels_match_the_dequantized_matmul(kernel):
    if kernel == "fbgemm" and int8_kernel("int8-dynamic") != "fbgemm":
        pytest.skip("fbgemm is x86-only")
    for K in (128, 100):  # 100: not a multiple of 16, which int8pack cannot take (falls back to dequant)
        w, x = torch.randn(48, K), torch.randn(3, 5, K)
        m = Int8Weight(*quantize_per_channel(w), kernel=kernel)
        y = m(x)
        ref = x @ m.dequantize().T
        assert y.shape == (3, 5, 48) and y.dtype == x.dtype
        # bf16 activations (int8pack) or 7-bit activations (fbgemm): a few percent of the largest output
        assert rel_max_err(y, ref) < (0.05 if kernel == "fbgemm" else 0.02)
        if kernel == "dequant":
            torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)


def test_int8_dynamic_uses_full_8_bit_activations_where_the_cpu_has_vnni():
    """fbgemm's activations: 8 bits where AVX512-VNNI accumulates in 32 bits (detected), 7 bits
    (reduce_range) where AVX2's 16-bit pair sums could saturate. On tiny-dense (initializer_range
    0.05) the full range took the max logit error of int8-dynamic from 7.9% to 5.1% of the largest."""
    from qiusuo.model.quantize import cpu_has_vnni

    if int8_kernel("int8-dynamic") != "fbgemm":
        pytest.skip("fbgemm is x86-only")
    flags = [line for line in open("/proc/cpuinfo").read().splitlines() if line.startswith("flags")]
    assert cpu_has_vnni() == any("avx512_vnni" in line.split() for line in flags)
    w, x = torch.randn(64, 128), torch.randn(5, 128)
    m = Int8Weight(*quantize_per_channel(w), kernel="fbgemm")
    want = torch.ops.quantized.linear_dynamic(x, m._packed, not cpu_has_vnni())
    assert torch.equal(m(x), want)


def test_int4_groupwise_round_trip_and_kernel():
    w = torch.randn(64, 256) * torch.linspace(0.01, 3.0, 64)[:, None]
    for g in (32, 64, 128):
        q, scale, zero = quantize_int4_groupwise(w, g)
        assert q.min() >= 0 and q.max() <= 15 and scale.shape == (64, 256 // g)
        m = Int4Weight(q, scale, zero, g)
        deq = m.dequantize()
        step = scale.repeat_interleave(g, dim=1)
        assert ((deq - w).abs() <= step / 2 + 1e-5).all()  # within half a step of the original
        assert m.kernel == "int4pack"
        x = torch.randn(7, 256)
        assert rel_max_err(m(x), x @ deq.T) < 0.02  # bf16 activations in the kernel
    with pytest.raises(ValueError, match="group size"):
        quantize_int4_groupwise(torch.randn(16, 48), 32)


def test_bf16_detection_reads_the_cpu_flags():
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    assert cpu_has_native_bf16() == any(f in flags.split() for f in ("avx512_bf16", "amx_bf16", "bf16"))


@pytest.mark.parametrize("mode", ["int8", "int8-dynamic", "int4"])
def test_dense_logits_close_to_fp32(mode):
    model, _ = build_model("tiny-dense", seed=0, initializer_range=0.05)
    model.eval()
    x = torch.randint(10, 266, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        quantize_model(model, mode)
        out = model(x)
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert not any(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
    assert rel_max_err(out, ref) < BOUNDS[mode]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_moe_logits_close_to_fp32_with_pinned_routing(mode):
    model, _ = build_model("tiny-moe", seed=0, initializer_range=0.05)
    model.eval()
    with torch.no_grad():
        for m in model.moe_layers():  # a bias far above score differences fixes the expert choice
            m.gate.e_score_correction_bias.copy_(torch.arange(m.num_experts, dtype=torch.float32) * 10.0)
    x = torch.randint(10, 266, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        quantize_model(model, mode)
        out = model(x)
    assert all(isinstance(m.experts, QuantizedExperts) for m in model.moe_layers())
    assert rel_max_err(out, ref) < BOUNDS[mode]


def test_quantized_experts_match_experts_under_the_same_routing():
    torch.manual_seed(0)
    experts = Experts(8, 64, 32)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    x = torch.randn(40, 64)
    idx = torch.rand(40, 8).topk(2, dim=-1).indices  # distinct experts per token, as the router gives
    w = torch.rand(40, 2)
    with torch.no_grad():
        ref = experts(x, idx, w)
        q = QuantizedExperts(experts)
        assert rel_max_err(q(x, idx, w), ref) < 0.03
        assert torch.allclose(q(x, idx, w), q.forward_reference(x, idx, w), atol=1e-3)


def test_quantized_model_generates_with_the_engine():
    from qiusuo.engine import LLM, SamplingParams

    model, tok = build_model("tiny-moe", seed=0)
    quantize_model(model.eval())
    out = LLM(model, tok, kv_cache_bytes=8 << 20).generate(["12+34="], SamplingParams(temperature=0, max_tokens=8))
    assert len(out[0].outputs[0].token_ids) == 8


def test_llm_loads_int8_and_refuses_to_quantize_a_live_module(make_checkpoint):
    from qiusuo.engine import LLM, SamplingParams
    from qiusuo.model import load_model

    path = make_checkpoint()
    model, tok = load_model(path)
    llm = LLM(str(path), quantization="int8")
    assert any(isinstance(m, QuantizedLinear) for m in llm.llm_engine.model.modules())
    out = llm.generate(["347+285="], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 5
    with pytest.raises(ValueError, match="live module"):
        LLM(model=model, tokenizer=tok, quantization="int8")
    with pytest.raises(ValueError, match="quantization"):
        LLM(str(path), quantization="int3")
    llm4 = LLM(str(path), quantization="int4")
    assert any(isinstance(m, QuantizedLinear) and m.mode == "int4" for m in llm4.llm_engine.model.modules())
    out = llm4.generate(["347+285="], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 5


def test_eval_command_with_int8(make_checkpoint):
    from qiusuo.cli import main

    assert main(["eval", "--model", str(make_checkpoint("tiny-moe")), "--task", "arithmetic", "--n", "3",
                 "--max-tokens", "6", "--quantize", "int4", "--threads", "1"]) == 0


def test_export_quantize_is_the_model_transform():
    from qiusuo.export import quantize as old

    assert old.quantize_model is quantize_model


@pytest.mark.parametrize("tied", [True, False])
def test_embedding_and_head_are_int8_and_qkv_gate_up_fused(tied):
    """The output head is a fifth of SmolLM2-135M's weights; left in fp32 it took a third of an int8
    decode step (issue 15), so it is quantized too, sharing the embedding's table when tied."""
    from qiusuo.model import ModelConfig, Transformer
    from qiusuo.model.quantize import QuantizedEmbedding

    cfg = ModelConfig(model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=tied, initializer_range=0.05)
    model = Transformer(cfg).eval()
    model.reset_parameters(seed=0)
    x = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_emb = model.model.embed_tokens(x)
        ref = model(x)
        quantize_model(model, "int4")
        emb, out = model.model.embed_tokens(x), model(x)
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding) and isinstance(model.output_head, Int8Weight)
    assert model.lm_head is None  # the fp32 head is gone, not kept beside the int8 one
    assert (model.output_head is model.model.embed_tokens.table) == tied
    assert model.dtype == torch.float32 and emb.dtype == torch.float32
    assert rel_max_err(emb, ref_emb) < 0.01  # int8 per row: half a step of 1/127 of the row's max
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj is None and attn.qkv_proj.out_features == (4 + 2 + 2) * 16
        assert mlp.gate_proj is None and mlp.gate_up_proj.out_features == 2 * 96
        assert all(not isinstance(m, torch.nn.Linear) for m in layer.modules())
    assert rel_max_err(out, ref) < BOUNDS["int4"]


def test_fused_projection_keeps_each_bias():
    lin = [torch.nn.Linear(32, n, bias=b) for n, b in ((16, True), (8, False), (8, True))]
    x = torch.randn(3, 32)
    with torch.no_grad():
        fused = QuantizedLinear(lin, "int8")
        ref = torch.cat([m(x) for m in lin], dim=-1)
        assert fused.out_features == 32 and rel_max_err(fused(x), ref) < 0.02


# ---------------------------------------------------------------------- quantized checkpoints
def _greedy_tokens(llm, n: int = 12) -> list[list[int]]:
    from qiusuo.engine import SamplingParams

    prompts = ["347+285=", "Q: 12*7? think.", "hello"]
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("preset, mode, overrides", [
    ("tiny-dense", "int8", {}),
    ("tiny-dense", "int4", {}),
    ("tiny-dense", "int8", {"tie_word_embeddings": False}),
    ("tiny-dense", "int8-dynamic", {}),
    ("tiny-moe", "int8", {}),
    ("tiny-moe", "int4", {}),
])  # fmt: skip
def test_quantized_checkpoint_loads_back_without_requantizing(preset, mode, overrides, make_checkpoint, tmp_path,
                                                             monkeypatch):
    """save_model on a quantized model writes its low-bit tensors; load_model assigns them back
    (nothing is quantized on real tensors) and the engine's tokens are the in-memory model's."""
    import json

    from safetensors import safe_open

    import qiusuo.model.quantize as qz
    from qiusuo.engine import LLM
    from qiusuo.model import save_model

    src = make_checkpoint(preset, **overrides)
    llm = LLM(str(src), quantization=mode, kv_cache_bytes=8 << 20)
    want = _greedy_tokens(llm)
    model = llm.llm_engine.model
    out = save_model(model, llm.get_tokenizer(), tmp_path / "q")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "qiusuo", "format_version": 1, "mode": mode,
                                             "group_size": 32 if mode == "int4" else None}
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in names}
    assert ("U8" if mode == "int4" else "I8") in dtypes and "F32" in dtypes
    assert "output_head.qweight" not in names or not config["tie_word_embeddings"]  # the tied table once

    def only_meta(fn):
        def wrapped(w, *args):
            assert w.is_meta, "loading a quantized checkpoint quantized real weights again"
            return fn(w, *args)
        return wrapped

    monkeypatch.setattr(qz, "quantize_per_channel", only_meta(qz.quantize_per_channel))
    monkeypatch.setattr(qz, "quantize_int4_groupwise", only_meta(qz.quantize_int4_groupwise))
    again = LLM(str(out), kv_cache_bytes=8 << 20)
    loaded = again.llm_engine.model
    saved = qz.quantized_state_dict(model)
    assert set(qz.quantized_state_dict(loaded)) == set(saved)
    for k, v in qz.quantized_state_dict(loaded).items():
        assert v.dtype == saved[k].dtype and torch.equal(v, saved[k]), k
    assert _greedy_tokens(again) == want
    assert _greedy_tokens(LLM(str(out), quantization=mode, kv_cache_bytes=8 << 20)) == want  # same mode: as is
    other = "int4" if mode != "int4" else "int8"
    with pytest.raises(ValueError, match="already quantized"):
        LLM(str(out), quantization=other)


def _quantized_checkpoint(make_checkpoint, tmp_path, mode="int8"):
    from qiusuo.model import load_model, save_model

    model, tok = load_model(make_checkpoint())
    return save_model(quantize_model(model, mode), tok, tmp_path / f"q-{mode}")


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.update({"model.layers.0.mlp.gate_up_proj.weight_q.qweight":
                         s["model.layers.0.mlp.gate_up_proj.weight_q.qweight"].float()}),
     r"model\.layers\.0\.mlp\.gate_up_proj\.weight_q\.qweight is torch\.float32"),
    (lambda s: s.update({"model.layers.1.self_attn.o_proj.weight_q.scale":
                         s["model.layers.1.self_attn.o_proj.weight_q.scale"][:-1].clone()}),
     r"model\.layers\.1\.self_attn\.o_proj\.weight_q\.scale is torch\.float32 \(127,\)"),
    (lambda s: s.update({"model.embed_tokens.table.qweight": s["model.embed_tokens.table.qweight"].t().contiguous()}),
     r"model\.embed_tokens\.table\.qweight is torch\.int8 \(128, 266\)"),
    (lambda s: s.pop("model.norm.weight"), r"missing tensors: model\.norm\.weight"),
    (lambda s: s.update({"model.layers.0.extra": torch.zeros(2)}), r"unexpected tensors: model\.layers\.0\.extra"),
])  # fmt: skip
def test_hostile_quantized_checkpoint_names_the_tensor(edit, match, make_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    from qiusuo.model import load_model

    path = _quantized_checkpoint(make_checkpoint, tmp_path)
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors")
    with pytest.raises(ValueError, match=match):
        load_model(path)


@pytest.mark.parametrize("qc, match", [
    ({"quant_method": "gptq", "bits": 4}, "quant_method='gptq'"),
    ({"quant_method": "qiusuo", "format_version": 2, "mode": "int8"}, "format_version=2"),
    ({"quant_method": "qiusuo", "format_version": 1, "mode": "int3"}, "mode='int3'"),
    ({"quant_method": "qiusuo", "format_version": 1, "mode": "int4", "group_size": 48}, "group_size=48"),
    ("int8", "quant_method='int8'"),
])  # fmt: skip
def test_bad_quantization_config_is_refused(qc, match, make_checkpoint, tmp_path):
    import json

    from qiusuo.model import load_model

    path = _quantized_checkpoint(make_checkpoint, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        load_model(path)
    with pytest.raises(ValueError, match="float32"):
        config["quantization_config"] = {"quant_method": "qiusuo", "format_version": 1, "mode": "int8"}
        (path / "config.json").write_text(json.dumps(config))
        load_model(path, dtype="bfloat16")


_PEAK_RSS_CHILD = """
import json, sys
import torch
from qiusuo.model import load_model
def status(key):
    line = next(x for x in open("/proc/self/status") if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024
load_model(sys.argv[2])  # a small one first: lazy imports and first-use allocations are not the load's
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
before = status("VmRSS")
model, _ = load_model(sys.argv[1])
peak = status("VmHWM")
kernel = sum(t.numel() * t.element_size() for m in model.modules()
             for t in (getattr(m, "_packed", None), getattr(m, "_scales_zeros", None)) if isinstance(t, torch.Tensor))
print(json.dumps({"growth": peak - before, "kernel_copies": kernel}))
"""


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_load_peak_rss_is_the_weights_once(mode, tmp_path):
    """Issue 15's memory rule for quantized checkpoints: loading holds the low-bit tensors once
    (views of the file's memory map) - peak RSS growth during load_model within 1.2x the file's
    tensors. int4 also builds the kernel's packed copy of each matrix (its own layout, the same
    bytes again), counted on top. Measured in a fresh process, after a small load has done the lazy
    imports, from the peak reset just before loading (Linux's clear_refs) to VmHWM after it."""
    import json
    import os
    import subprocess
    import sys

    from qiusuo.model import save_model

    model, tok = build_model("tiny-dense", hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                             num_attention_heads=8, num_key_value_heads=2)
    path = save_model(quantize_model(model.eval(), mode), tok, tmp_path / mode)
    small, tok = build_model("tiny-dense")
    warm = save_model(quantize_model(small.eval(), mode), tok, tmp_path / "small")
    del model, small
    weights = (path / "model.safetensors").stat().st_size
    # glibc raises its mmap threshold after the first large free, so later transients (int4's
    # unpacking, 1024 rows at a time) come from the heap and leave holes it keeps: +~10 MB here,
    # allocator policy rather than copies of the weights. The threshold is pinned at glibc's default
    # so the test measures what the loader holds (the report gives the unpinned figure too).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS_CHILD, str(path), str(warm)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert mode == "int4" or got["kernel_copies"] == 0
    # + 8 MiB of allocator slack (int4's unpacking transients left 3.8 MB over 1.0x in one CI run): a float
    # copy of these matrices would be ~90 MB, so the bound still tells "once" from "twice"
    assert got["growth"] <= 1.2 * weights + got["kernel_copies"] + (8 << 20), (got, weights)


def test_int4_packing_in_row_chunks_is_the_whole_matrix_packed():
    """Int4Weight packs its kernel weight 1024 rows at a time (peak RSS while loading); the bytes
    must be those of packing the whole matrix, and the matmul the dequantized one."""
    from qiusuo.model import quantize as qz

    w = torch.randn(2 * qz._INT4PACK_ROW_CHUNK + 64, 256, generator=torch.Generator().manual_seed(0))
    m = Int4Weight(*quantize_int4_groupwise(w, 32), 32)
    assert m.kernel == "int4pack"
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(m.unpacked(), 1)
    assert torch.equal(m._packed, whole)
    x = torch.randn(3, 256)
    assert rel_max_err(m(x), x @ m.dequantize().T) < 0.02  # bf16 activations in the kernel


@pytest.mark.parametrize("mode,dtype", [("int8", "float32"), ("int4", "float32"), ("int8-dynamic", "bfloat16"),
                                        ("int4", "bfloat16")])
def test_quantizing_load_is_the_loaded_model_quantized(mode, dtype, make_checkpoint, tmp_path, monkeypatch):
    """load_model(path, quantization=mode) quantizes matrix by matrix as it loads (float or bf16 files);
    every stored tensor and the logits equal quantize_model on the fully loaded float model. Row
    chunks of 7 at K=128 (monkeypatched) check that chunked quantization is the whole matrix's."""
    import qiusuo.model.quantize as qz
    from qiusuo.model import load_model, save_model
    from qiusuo.model.quantize import quantized_state_dict

    src = make_checkpoint("tiny-dense")
    if dtype == "bfloat16":
        model, tok = load_model(src)
        src = save_model(model.to_dtype(torch.bfloat16), tok, tmp_path / "bf16")
    want, _ = load_model(src)
    quantize_model(want, mode)
    monkeypatch.setattr(qz, "_QUANTIZE_CHUNK_BYTES", 4 * 128 * 7)  # 7 rows of K=128
    got, _ = load_model(src, quantization=mode)
    a, b = quantized_state_dict(want), quantized_state_dict(got)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])] == []
    assert all(t.dtype in (torch.float32, torch.int8, torch.uint8) for t in b.values())
    ids = torch.tensor([[1, 5, 9, 30, 44, 7]])
    assert torch.equal(want(ids), got(ids))


def test_quantizing_load_refuses_bad_options(make_checkpoint):
    from qiusuo.model import load_model

    src = make_checkpoint("tiny-dense")
    with pytest.raises(ValueError, match="int3"):
        load_model(src, quantization="int3")
    with pytest.raises(ValueError, match="float32"):
        load_model(src, dtype="bfloat16", quantization="int8")


_QUANTIZING_PEAK_RSS_CHILD = """
import json, sys
import torch
from qiusuo.model import load_model
from qiusuo.model.quantize import quantized_state_dict
def status(key):
    line = next(x for x in open("/proc/self/status") if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024
path, warm, mode = sys.argv[1:]
load_model(warm, quantization=mode)  # lazy imports and first-use allocations are not the load's
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
before = status("VmRSS")
model, _ = load_model(path, quantization=mode)
peak = status("VmHWM")
weights = sum(t.numel() * t.element_size() for t in quantized_state_dict(model).values())
kernel = sum(t.numel() * t.element_size() for m in model.modules()
             for t in (getattr(m, "_packed", None), getattr(m, "_scales_zeros", None)) if isinstance(t, torch.Tensor))
print(json.dumps({"growth": peak - before, "weights": weights, "kernel_copies": kernel}))
"""


_BIG = {"tiny-dense": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
                          num_key_value_heads=2),
        # routed experts dominate; they were stacked in float (all of them) before being quantized
        "tiny-moe": dict(hidden_size=512, moe_intermediate_size=512, n_routed_experts=16, n_group=2,
                         num_hidden_layers=4)}


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_DONTNEED"), reason="needs madvise (Linux)")
@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantizing_load_peak_rss_is_the_quantized_weights(mode, preset, make_checkpoint, tmp_path):
    """Issue 15's memory rule when a float checkpoint is quantized as it loads: peak RSS growth within
    1.2x the quantized weights (+ int4's kernel copy), where the float file is 4x the int8 weights
    (loading it whole first, as LLM(path, quantization=) did, grew by ~5.8x at the SmolLM2-135M shape).
    Fresh process; the peak is reset just before loading (Linux's clear_refs). glibc's mmap threshold
    is pinned, as in the test above: unpinned, int4's kernel-packing transients leave heap holes
    (measured 1.20x here, 1.08x at the SmolLM2-135M shape, where int8 is 1.11x either way)."""
    import json
    import os
    import subprocess
    import sys

    src = make_checkpoint(preset, **_BIG[preset])
    warm = make_checkpoint(preset)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, "-c", _QUANTIZING_PEAK_RSS_CHILD, str(src), str(warm), mode],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (src / "model.safetensors").stat().st_size > 3 * got["weights"]  # the float file dwarfs the result
    assert got["growth"] <= 1.2 * (got["weights"] + got["kernel_copies"]) + (8 << 20), got  # slack: as above


@pytest.mark.parametrize("offset", [0, 8, 56])
@pytest.mark.parametrize("N, M", [(266, 1), (256, 5)])
def test_int8pack_on_an_unaligned_weight(offset, N, M):
    """A memory-mapped int8 matrix is only 8-byte aligned; `_weight_int8pack_mm` crashed (SIGSEGV) on
    such a weight on an AVX512 CPU (N=266 at M=1, every N at M >= 3; so did LLM(<quantized checkpoint>)).
    Int8Weight keeps its own aligned copy then: the result is the aligned weight's, bit for bit, and the
    dequantized matmul's up to the kernel's bf16 activations."""
    K = 128
    g = torch.Generator().manual_seed(0)
    q, scale = quantize_per_channel(torch.randn(N, K, generator=g))
    buf = torch.zeros(N * K + 64, dtype=torch.int8)
    view = buf[offset:offset + N * K].view(N, K)
    view.copy_(q)
    m = Int8Weight(view, scale, kernel="int8pack")
    x = torch.randn(M, K, generator=g)
    assert torch.equal(m(x), Int8Weight(q.clone(), scale, kernel="int8pack")(x))
    want = x @ m.dequantize().T  # bf16 activations: ~2^-9 relative per product, so a scale-relative bound
    torch.testing.assert_close(m(x), want, atol=0.02 * want.abs().max().item(), rtol=0.02)


def test_export_quantized_command_writes_a_checkpoint_the_engine_loads(make_checkpoint, tmp_path, capsys):
    """`qiusuo export quantized`: a float checkpoint in, a quantized checkpoint out whose tokens are
    LLM(src, quantization=...)'s; writing over the source is refused."""
    import json

    from qiusuo.cli import main
    from qiusuo.engine import LLM

    src = make_checkpoint("tiny-dense")
    out = tmp_path / "int4"
    assert main(["export", "quantized", "--model", str(src), "--out", str(out), "--quantize", "int4",
                 "--int4-group-size", "64"]) == 0
    assert "int4, groups of 64" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["mode"] == "int4" and config["quantization_config"]["group_size"] == 64
    want = _greedy_tokens(LLM(str(src), quantization="int4", int4_group_size=64, kv_cache_bytes=8 << 20))
    assert _greedy_tokens(LLM(str(out), kv_cache_bytes=8 << 20)) == want
    assert main(["export", "quantized", "--model", str(src), "--out", str(src), "--quantize", "int8"]) != 0
    assert "source checkpoint" in capsys.readouterr().err


_CAST_PEAK_RSS_CHILD = """
import json, sys
import torch
from qiusuo.model import load_model
def status(key):
    line = next(x for x in open("/proc/self/status") if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024
path, warm = sys.argv[1:]
load_model(warm, dtype="bfloat16")  # lazy imports and first-use allocations are not the load's
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
before = status("VmRSS")
model, _ = load_model(path, dtype="bfloat16")
peak = status("VmHWM")
assert model.dtype == torch.bfloat16
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"growth": peak - before, "weights": weights}))
"""


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_DONTNEED"), reason="needs madvise (Linux)")
@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_loading_a_float32_checkpoint_as_bf16_holds_the_weights_once(preset, make_checkpoint):
    """Issue 15's memory rule for a cast on load: peak RSS growth within 1.2x the bf16 weights (it was
    ~2.3x the fp32 weights: the file's pages and the cast copies were held whole at once)."""
    import json
    import os
    import subprocess
    import sys

    src, warm = make_checkpoint(preset, **_BIG[preset]), make_checkpoint(preset)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, "-c", _CAST_PEAK_RSS_CHILD, str(src), str(warm)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["growth"] <= 1.2 * got["weights"] + (8 << 20), got
