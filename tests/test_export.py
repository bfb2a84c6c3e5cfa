"""GGUF export: llama.cpp (via llama-cpp-python) runs the file and agrees with qiusuo.

- Logits: on random weights, llama.cpp's logits equal ours (f32: to 1e-5; f16: to 2e-3 against
  our model with f16-rounded weights), for qwen2, llama and deepseek2 (incl. rope_interleave=False).
- Greedy tokens: equal, with no mismatch tolerated, for f32 and f16 and both presets. Random
  weights give near-tie logits, where f16 rounding legitimately flips the argmax, so these models
  are first fitted for a few seconds to a short cyclic text (the next character depends on the
  context, so attention and RoPE matter): their top-1 margins are then far above f16 noise.
- q8_0: the agreement rate is measured and printed (run with -s to see it).
- llama.cpp's KV cache is f32 here so that only the weight type differs from our fp32 run.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from helpers import llama_cpp_model

from qiusuo.model import ModelConfig, Transformer, build_model

gguf = pytest.importorskip("gguf")
from qiusuo.export import check_gguf_support, export_gguf  # noqa: E402

CYCLE = "the cat and the dog. "
N_NEW = 32
GGML_F32 = 0  # ggml_type of the KV cache


@functools.lru_cache(maxsize=None)
def fitted_model(preset: str) -> tuple[Transformer, object]:
    """A preset model fitted to CYCLE (~3 s on one core): confident, context-dependent predictions."""
    torch.manual_seed(0)
    model, tok = build_model(preset, seed=0)
    cycle = tok.encode(CYCLE)
    ids = cycle * 4
    # (7, 33): bos, then the cycle from every third phase, as the test prompts start
    batch = torch.tensor([[tok.bos_token_id] + ids[s:s + 32] for s in range(0, len(cycle), 3)])
    opt = torch.optim.Adam(model.parameters(), lr=4e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: more threads only oversubscribe
    try:
        model.train()
        for _ in range(300):
            out = model.compute_loss(batch)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            model.update_router_bias()
            if out.lm_loss.item() < 0.05:
                break
    finally:
        torch.set_num_threads(threads)
    # loss 0.15 still means top-1 probability ~0.86 on average: margins far above f16 rounding
    assert out.lm_loss.item() < 0.15, f"fitting did not converge (loss {out.lm_loss.item():.3f})"
    return model.eval(), tok


def prompts(tok) -> list[list[int]]:
    text = CYCLE * 3
    return [[tok.bos_token_id] + tok.encode(text[k:k + 7]) for k in range(0, 21, 3)]


def qiusuo_greedy(model, tok, prompt_ids, n=N_NEW) -> list[list[int]]:
    from qiusuo.engine import LLM, SamplingParams

    outs = LLM(model, tok, kv_cache_bytes=16 << 20).generate(prompt_ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


def llama(path, logits_all=False):
    return llama_cpp_model(path, n_ctx=256, n_threads=1, n_batch=256, logits_all=logits_all,
                           type_k=GGML_F32, type_v=GGML_F32, verbose=False, seed=0)


def llama_greedy(llm, prompt_ids, n=N_NEW) -> list[list[int]]:
    out = []
    for ids in prompt_ids:
        gen = []
        for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):  # llama.cpp's own greedy sampler
            gen.append(int(t))
            if len(gen) == n:
                break
        out.append(gen)
    return out


def f16_rounded(model):
    """Our model with every matrix rounded to f16 as the f16 file stores it (routers stay f32)."""
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim >= 2 and not name.endswith("gate.weight"):
                p.copy_(p.half().float())
    return m


# ---------------------------------------------------------------------- file contents (gguf only)
def test_deepseek2_file_has_llama_cpp_names_and_keys(tmp_path):
    model, tok = build_model("tiny-moe", seed=0)
    path = export_gguf(model, tok, tmp_path / "m.gguf", dtype="f32")
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.tokens")}
    assert fields["general.architecture"] == "deepseek2"
    cfg = model.config
    assert fields["deepseek2.attention.head_count_kv"] == 1
    assert fields["deepseek2.attention.q_lora_rank"] == 0  # uncompressed queries -> attn_q
    assert fields["deepseek2.attention.key_length"] == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert fields["deepseek2.attention.key_length_mla"] == cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    assert fields["deepseek2.rope.dimension_count"] == cfg.qk_rope_head_dim
    assert fields["deepseek2.leading_dense_block_count"] == cfg.first_k_dense_replace
    assert fields["deepseek2.expert_group_count"] == cfg.n_group
    assert fields["deepseek2.expert_gating_func"] == int(gguf.ExpertGatingFuncType.SIGMOID)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert fields["tokenizer.chat_template"] == tok.chat_template
    types = fields["tokenizer.ggml.token_type"]
    assert types[tok.eos_token_id] == gguf.TokenType.CONTROL
    assert types[tok.think_start_id] == gguf.TokenType.USER_DEFINED
    assert types[tok.encode("a")[0]] == gguf.TokenType.NORMAL
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}  # ggml order (reversed)
    H, C, N, V = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.v_head_dim
    assert shapes["blk.1.attn_k_b.weight"] == (N, C, H)
    assert shapes["blk.1.attn_v_b.weight"] == (C, V, H)
    E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    assert shapes["blk.1.ffn_gate_exps.weight"] == (D, I, E)
    assert shapes["blk.1.ffn_down_exps.weight"] == (I, D, E)
    assert "blk.1.exp_probs_b.bias" in shapes and "blk.0.ffn_gate.weight" in shapes
    assert fields["deepseek2.block_count"] == cfg.num_hidden_layers + len(model.mtp)  # MTP kept (below)


def _converter_view(hf: dict[str, torch.Tensor], block: int, cfg) -> dict[str, np.ndarray]:
    """One HF block's tensors as llama.cpp's deepseek2 converter writes them: names from gguf-py's own
    HF -> GGUF map (DEEPSEEK2's, and for the MTP-only tensors the map GLM-4.5's converter uses), experts
    stacked, kv_b_proj split with k_b transposed. (RoPE rows need no permutation: rope_interleave=True.)"""
    n = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    maps = [gguf.get_tensor_name_map(arch, n) for arch in (gguf.MODEL_ARCH.DEEPSEEK2, gguf.MODEL_ARCH.GLM4_MOE)]
    prefix = f"model.layers.{block}."
    experts: dict[str, list] = {}
    out = {}
    for name, t in sorted(hf.items()):
        if not name.startswith(prefix):
            continue
        if ".mlp.experts." in name:  # model.layers.B.mlp.experts.E.gate_proj.weight
            head, e, proj, _ = name.rsplit(".", 3)
            experts.setdefault(f"{head}.{proj}.weight", []).append((int(e), t))
            continue
        if name.endswith("kv_b_proj.weight"):
            H, N, V = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
            k_b, v_b = t.view(H, N + V, -1).split([N, V], dim=1)
            out[f"blk.{block}.attn_k_b.weight"] = k_b.transpose(1, 2).numpy()
            out[f"blk.{block}.attn_v_b.weight"] = v_b.numpy()
            continue
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        gguf_name = next(filter(None, (m.get_name(name, try_suffixes=(".weight", ".bias")) for m in maps)))
        out[gguf_name] = t.numpy()
    for name, ts in experts.items():
        out[maps[0].get_name(name, try_suffixes=(".weight",))] = torch.stack([t for _, t in sorted(ts)]).numpy()
    return out


def test_deepseek2_file_keeps_the_mtp_layer_as_llama_cpp_nextn_block(tmp_path, make_checkpoint):
    """Every tensor of the checkpoint's MTP layer is in the file, named, shaped and valued as the converter
    writes them; `--no-mtp` leaves the main model alone."""
    from safetensors.torch import load_file

    from qiusuo.cli import main
    from qiusuo.model import load_model

    ckpt = make_checkpoint("tiny-moe", seed=0)
    hf = load_file(ckpt / "model.safetensors")  # the checkpoint as written: the oracle
    cfg = load_model(ckpt)[0].config
    L = cfg.num_hidden_layers
    assert cfg.num_nextn_predict_layers == 1 and cfg.rope_interleave
    assert main(["export", "gguf", "--model", str(ckpt), "--out", str(tmp_path / "m.gguf"), "--dtype", "f32"]) == 0
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    assert r.fields["deepseek2.block_count"].contents() == L + 1
    assert r.fields["deepseek2.nextn_predict_layers"].contents() == 1
    written = {t.name: t for t in r.tensors if t.name.startswith(f"blk.{L}.")}
    expected = _converter_view(hf, L, cfg)
    assert set(written) == set(expected)
    nextn = {_name_of(kind, L) for kind in (gguf.MODEL_TENSOR.NEXTN_EH_PROJ, gguf.MODEL_TENSOR.NEXTN_ENORM,
                                             gguf.MODEL_TENSOR.NEXTN_HNORM, gguf.MODEL_TENSOR.NEXTN_EMBED_TOKENS,
                                             gguf.MODEL_TENSOR.NEXTN_SHARED_HEAD_HEAD,
                                             gguf.MODEL_TENSOR.NEXTN_SHARED_HEAD_NORM)}
    assert nextn <= set(written) and f"blk.{L}.ffn_gate_exps.weight" in written
    for name, t in written.items():
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        assert np.array_equal(np.asarray(t.data).reshape(expected[name].shape), expected[name]), name
        assert tuple(int(x) for x in t.shape) == expected[name].shape[::-1], name  # ggml order
    # the main blocks are unchanged by the MTP block: same tensors as without it
    assert main(["export", "gguf", "--model", str(ckpt), "--out", str(tmp_path / "n.gguf"), "--dtype", "f32",
                 "--no-mtp"]) == 0
    r2 = gguf.GGUFReader(tmp_path / "n.gguf")
    assert r2.fields["deepseek2.block_count"].contents() == L
    assert "deepseek2.nextn_predict_layers" not in r2.fields
    main_only = {t.name: np.asarray(t.data) for t in r2.tensors}
    assert set(main_only) == {t.name for t in r.tensors} - set(written)
    assert all(np.array_equal(main_only[t.name], np.asarray(t.data)) for t in r.tensors if t.name in main_only)


def _name_of(kind, bid):
    return gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight"


@pytest.mark.parametrize("field,overrides", [
    ("attention_bias", dict(model_type="deepseek_v3", attention_bias=True)),
    ("n_shared_experts", dict(model_type="deepseek_v3", n_routed_experts=4, n_shared_experts=0)),
    ("mlp_bias", dict(model_type="qwen2", mlp_bias=True)),
    ("head_dim", dict(model_type="qwen2", head_dim=64)),
])
def test_unrepresentable_configs_are_refused_naming_the_field(tmp_path, field, overrides):
    from qiusuo.tokenizer import Tokenizer

    tok = Tokenizer.builtin()
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=2, moe_intermediate_size=32, **overrides)
    with pytest.raises(ValueError, match=field):
        check_gguf_support(cfg)
    with pytest.raises(ValueError, match=field):
        export_gguf(Transformer(cfg), tok, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir()), "a refused export must not leave a file behind"


def test_cli_export_from_checkpoint_dir(tmp_path, make_checkpoint):
    import argparse

    from qiusuo.cli import export as export_cli

    parser = argparse.ArgumentParser()
    export_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", "gguf", "--model", str(make_checkpoint()), "--out",
                              str(tmp_path / "m.gguf"), "--dtype", "q8_0"])
    assert args.func(args) == 0
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    assert r.fields["general.architecture"].contents() == "qwen2"
    assert r.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)


# ---------------------------------------------------------------------- llama.cpp round trips
LOGIT_CASES = {
    "qwen2": dict(preset="tiny-dense"),
    "llama": dict(preset="tiny-dense", model_type="llama", attention_bias=True),
    "deepseek2": dict(preset="tiny-moe"),
    "deepseek2-rope-half-split": dict(preset="tiny-moe", rope_interleave=False),
}


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("case", list(LOGIT_CASES))
def test_llama_cpp_logits_equal_ours(tmp_path, case, dtype):
    overrides = dict(LOGIT_CASES[case])
    model, tok = build_model(overrides.pop("preset"), seed=0, initializer_range=0.1, **overrides)
    model.eval()
    with torch.no_grad():  # a non-trivial bias so the bias tensors are exercised too
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.copy_(torch.linspace(-0.05, 0.05, m.num_experts))
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0, 0.1)
    path = export_gguf(model, tok, tmp_path / "m.gguf", dtype=dtype)
    ids = [tok.bos_token_id] + tok.encode("the cat <think>sat</think> on 12+34=46, the mat!")
    llm = llama(path, logits_all=True)
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)])
    ref = model if dtype == "f32" else f16_rounded(model)
    with torch.no_grad():
        ours = ref(torch.tensor([ids]))[0].numpy()
    scale = np.abs(ours).max()
    tol = 1e-5 if dtype == "f32" else 2e-3
    assert np.abs(theirs - ours).max() <= tol * scale, f"max |diff| {np.abs(theirs - ours).max():.2e}, scale {scale:.2f}"


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_llama_cpp_greedy_tokens_equal_ours(tmp_path, preset, dtype):
    model, tok = fitted_model(preset)
    ps = prompts(tok)
    ours = qiusuo_greedy(model, tok, ps)
    path = export_gguf(model, tok, tmp_path / "m.gguf", dtype=dtype)
    theirs = llama_greedy(llama(path), ps)
    for p, a, b in zip(ps, ours, theirs):
        assert a == b, f"prompt {tok.decode(p)!r}: qiusuo {tok.decode(a)!r} != llama.cpp {tok.decode(b)!r}"


def test_llama_cpp_reads_the_mtp_block_as_nextn_and_runs_the_main_model_unchanged(tmp_path):
    """The MTP block loads as llama.cpp's nextn layer (counted apart from the main layers) and changes
    nothing it computes: logits equal to the file without it, to ours, and the same greedy tokens."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model, tok = fitted_model("tiny-moe")
    ps = prompts(tok)
    ours = qiusuo_greedy(model, tok, ps)
    ids = ps[0] + ours[0][:8]
    logits = {}
    for mtp in (True, False):
        llm = llama(export_gguf(model, tok, tmp_path / f"m{mtp}.gguf", dtype="f32", mtp=mtp), logits_all=True)
        assert llama_cpp.llama_model_n_layer(llm.model) == model.config.num_hidden_layers
        assert llama_cpp.llama_model_n_layer_nextn(llm.model) == (len(model.mtp) if mtp else 0)
        llm.eval(ids)
        logits[mtp] = np.asarray(llm.scores[: len(ids)]).copy()
        if mtp:
            assert llama_greedy(llm, ps) == ours
    assert np.array_equal(logits[True], logits[False])
    with torch.no_grad():
        mine = model(torch.tensor([ids]))[0].numpy()
    assert np.abs(logits[True] - mine).max() <= 1e-5 * np.abs(mine).max()


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_q8_0_agreement_rate_is_measured(tmp_path, preset):
    model, tok = fitted_model(preset)
    ps = prompts(tok)
    ours = qiusuo_greedy(model, tok, ps)
    theirs = llama_greedy(llama(export_gguf(model, tok, tmp_path / "m.gguf", dtype="q8_0")), ps)
    same = sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y))
    rate = same / sum(len(x) for x in ours)
    print(f"\n{preset} q8_0 greedy token agreement with qiusuo fp32: {rate:.3f}")
    assert rate > 0.5  # the figure is reported; this only catches a broken q8_0 file


def test_llama_cpp_tokenizes_like_ours(tmp_path):
    model, tok = build_model("tiny-dense", seed=0)
    llm = llama(export_gguf(model, tok, tmp_path / "m.gguf", dtype="f16"))
    for text in ["hello world", "  two  spaces\nnew line\t", "<think>7*8=56</think><answer>56</answer>",
                 "<|user|>hi<eos>", "naïve café 你好 🙂", "it's 12,345.6!"]:
        ours = tok.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours, text
        assert llm.detokenize(ours).decode() == tok.decode(ours, skip_special_tokens=True), text
    assert llm.tokenize(b"hi", add_bos=True)[0] == tok.bos_token_id


def test_q4_0_file_keeps_the_output_matrix_at_q8_0_and_loads_in_llama_cpp(tmp_path):
    """As llama-quantize does for a tied output whose rows are not a multiple of 256 (q6_K -> q8_0)."""
    model, tok = build_model("tiny-dense", seed=0)
    path = export_gguf(model, tok, tmp_path / "m.gguf", dtype="q4_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    out = llama_greedy(llama(path), prompts(tok)[:1])
    assert len(out[0]) > 0
