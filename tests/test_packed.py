"""bf16 linears on prepacked oneDNN weights (qiusuo/model/packed.py): the same greedy tokens as the
unpacked bf16 model up to ties, applied by `LLM` only where it is detected to pay (bf16, CPU with
AMX-BF16, eager, no LoRA serving), and refused where the packed layout cannot serve (LoRA)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_greedy_equal_up_to_ties

import qiusuo.model.packed as packed
from qiusuo.engine import LLM, SamplingParams
from qiusuo.model import load_model
from qiusuo.model.packed import PackedLinear, is_packed, pack_bf16_linears

needs_bf16_onednn = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="oneDNN has no bf16 matmul on this CPU")

PROMPTS = [[1, 5, 9, 30, 44, 7], [3, 3, 8], [100, 7, 12, 60, 2, 9, 11, 40, 41]]


def _greedy(llm, k=0):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=k or None)
    return llm.generate(PROMPTS, params)


@needs_bf16_onednn
@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": False, "model_type": "llama",
                                            "attention_bias": True}])
def test_packed_model_decodes_the_unpacked_models_tokens(overrides, make_checkpoint):
    """qwen2 (q/k/v biases, tied head) and llama with biases everywhere and an untied head (packed too)."""
    path = make_checkpoint("tiny-dense", **overrides)
    ref_model, tok = load_model(path, dtype="bfloat16")
    model, _ = load_model(path, dtype="bfloat16")
    n = pack_bf16_linears(model)
    layers = model.config.num_hidden_layers
    assert n == 4 * layers + (0 if model.config.tie_word_embeddings else 1)
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == n
    assert not any(type(m) is torch.nn.Linear for m in model.model.layers.modules())  # the float weights are gone
    ids = torch.tensor([PROMPTS[2]])
    with torch.inference_mode():
        want, got = ref_model(ids).float(), model(ids).float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()  # bf16 rounding, accumulated in another order
    reference = _greedy(LLM(ref_model, tok, enable_prefix_caching=False), k=5)
    outs = _greedy(LLM(model, tok, enable_prefix_caching=False))
    assert_greedy_equal_up_to_ties([list(o.outputs[0].token_ids) for o in outs], reference)


@needs_bf16_onednn
def test_llm_packs_bf16_only_where_amx_is_detected(make_checkpoint, monkeypatch):
    path = make_checkpoint("tiny-dense")
    monkeypatch.setattr(packed, "cpu_has_amx_bf16", lambda: True)
    assert is_packed(LLM(path, dtype="bfloat16").llm_engine.model)
    assert not is_packed(LLM(path).llm_engine.model)  # float32: nothing to pack
    assert not is_packed(LLM(path, quantization="int8").llm_engine.model)
    monkeypatch.setattr(packed, "cpu_has_amx_bf16", lambda: False)  # e.g. AVX2, or AVX512 without AMX
    assert not is_packed(LLM(path, dtype="bfloat16").llm_engine.model)


@needs_bf16_onednn
def test_lora_on_a_packed_engine_is_refused(make_checkpoint, monkeypatch):
    from qiusuo.engine import LoRARequest

    monkeypatch.setattr(packed, "cpu_has_amx_bf16", lambda: True)
    llm = LLM(make_checkpoint("tiny-dense"), dtype="bfloat16")
    with pytest.raises(ValueError, match="prepacked"):
        llm.llm_engine.add_lora(LoRARequest("a", 1, "/nonexistent"))


def test_amx_detection_reads_the_cpu_flags():
    from pathlib import Path

    flags = " ".join(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    packed.cpu_has_amx_bf16.cache_clear()
    assert packed.cpu_has_amx_bf16() == ("amx_bf16" in flags.split() and torch.backends.mkldnn.is_available()
                                         and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_packing_a_float32_model_is_refused(make_checkpoint):
    model, _ = load_model(make_checkpoint("tiny-dense"))
    with pytest.raises(ValueError, match="bf16"):
        pack_bf16_linears(model)
