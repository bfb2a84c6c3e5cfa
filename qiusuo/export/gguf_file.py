"""GGUF export: a qiusuo `Transformer` as a file llama.cpp and Ollama run.

Architectures, tensor names and metadata keys are the ones llama.cpp's own converter writes
(`convert_hf_to_gguf.py`, `conversion/{qwen,llama,deepseek}.py`), checked against what its
loader reads (`src/models/{qwen2,llama,deepseek2}.cpp`) in the llama.cpp vendored by
llama-cpp-python 0.3.36:

- `qwen2` -> `qwen2` (NEOX RoPE: the half-split layout we use, weights unchanged);
- `llama` -> `llama` (NORM RoPE rotates adjacent pairs: q/k rows are permuted as the converter's
  `LlamaModel.permute` does);
- `deepseek_v3` -> `deepseek2`: MLA with `kv_b_proj` split into `attn_k_b` (transposed) and
  `attn_v_b` (llama.cpp absorbs them), experts stacked as `ffn_{gate,up,down}_exps`, the
  correction bias as `exp_probs_b.bias`, MTP layers as below. `q_lora_rank` is written as 0 when
  queries are uncompressed: llama.cpp requires the key except for DeepSeek-V2-Lite's layer counts,
  and reads 0 as "use attn_q".

MTP depths (`num_nextn_predict_layers`) are kept by default, as llama.cpp's converter writes them
for GLM-4.5 (`Glm4MoeModel`; its DeepSeek-V3 path still drops them, `skip_mtp`): depth k is block
`num_hidden_layers + k` with a normal block's tensors plus `nextn.{eh_proj,enorm,hnorm,
shared_head_norm}` and copies of the embedding and head (`nextn.embed_tokens`,
`nextn.shared_head_head`), `block_count` counts them and `nextn_predict_layers` says how many.
The llama.cpp vendored by llama-cpp-python 0.3.36 loads such a deepseek2 file (n_layer =
block_count - nextn_predict_layers) and leaves the MTP tensors unused ("model has unused tensor
... -- ignoring"): same logits, a larger file. `mtp=False` (`--no-mtp`) writes the main model only.

Configurations llama.cpp cannot represent are refused by `check_gguf_support` with the config
field named, before any file is written.

Tensor types follow the converter: norms, 1-D tensors and the router stay F32; other weights
take the requested type (q8_0 and q4_0 fall back to F16 for rows not a multiple of 32). In a q4_0
file the output matrix (`output`, or `token_embd` when tied) is q8_0: llama.cpp's `llama-quantize`
gives it q6_K, falling back to q8_0 where rows are not a multiple of 256 (SmolLM2's 576, Qwen2.5's
896), and gguf-py cannot write q6_K.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

import gguf

from .gguf_vocab import add_tokenizer

ARCHS = {"qwen2": "qwen2", "llama": "llama", "deepseek_v3": "deepseek2"}
FILE_TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
    "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, gguf.GGMLQuantizationType.Q4_0),
}
T = gguf.MODEL_TENSOR


def _name(kind: gguf.MODEL_TENSOR, bid: int | None = None, suffix: str = "weight") -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=bid) + "." + suffix


def check_gguf_support(config: Any) -> str:
    """The llama.cpp architecture for `config`, or ValueError naming the field it cannot represent."""
    if config.model_type not in ARCHS:
        raise ValueError(f"model_type={config.model_type!r} has no llama.cpp architecture; use {', '.join(ARCHS)}")
    scaling = config.rope_scaling
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        raise ValueError(f"rope_scaling={scaling!r}: only default RoPE is exported")
    if config.model_type == "qwen2":
        if config.num_attention_heads * config.head_dim != config.hidden_size:
            raise ValueError(f"head_dim={config.head_dim}: llama.cpp's qwen2 needs num_attention_heads * head_dim "
                             f"== hidden_size ({config.hidden_size}); export as model_type 'llama' instead")
        if config.mlp_bias:
            raise ValueError("mlp_bias=True: llama.cpp's qwen2 has no MLP biases; export as model_type 'llama'")
    if config.is_deepseek:
        if config.attention_bias:
            raise ValueError("attention_bias=True: llama.cpp's deepseek2 has no attention biases")
        if config.mlp_bias:
            raise ValueError("mlp_bias=True: llama.cpp's deepseek2 has no MLP biases")
        if config.n_routed_experts and not config.n_shared_experts:
            raise ValueError("n_shared_experts=0: llama.cpp's deepseek2 MoE layers always have shared experts")
    return ARCHS[config.model_type]


# ---------------------------------------------------------------------- tensors
def _permute_pairs(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Half-split RoPE rows -> adjacent pairs, per head (the converter's `LlamaModel.permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dense_attention(attn, i: int, llama: bool) -> Iterator[tuple[str, torch.Tensor]]:
    for kind, proj, heads in ((T.ATTN_Q, attn.q_proj, attn.num_heads), (T.ATTN_K, attn.k_proj, attn.num_kv_heads),
                              (T.ATTN_V, attn.v_proj, None), (T.ATTN_OUT, attn.o_proj, None)):
        for suffix, t in (("weight", proj.weight), ("bias", proj.bias)):
            if t is None:
                continue
            yield _name(kind, i, suffix), _permute_pairs(t, heads) if llama and heads else t


def _mla_attention(attn, cfg, i: int) -> Iterator[tuple[str, torch.Tensor]]:
    H, N, R, V, C = attn.num_heads, attn.nope_dim, attn.rope_dim, attn.v_head_dim, attn.kv_lora_rank
    fix_rope = not attn.interleaved  # llama.cpp rotates adjacent pairs; move half-split rows into pairs

    def q_rows(w):
        if not fix_rope:
            return w
        w = w.reshape(H, N + R, -1).clone()  # (H, N+R, in)
        w[:, N:] = _permute_pairs(w[:, N:].reshape(H * R, -1), H).reshape(H, R, -1)
        return w.reshape(H * (N + R), -1)

    if attn.q_lora_rank is None:
        yield _name(T.ATTN_Q, i), q_rows(attn.q_proj.weight)
    else:
        yield _name(T.ATTN_Q_A, i), attn.q_a_proj.weight
        yield _name(T.ATTN_Q_A_NORM, i), attn.q_a_layernorm.weight
        yield _name(T.ATTN_Q_B, i), q_rows(attn.q_b_proj.weight)
    kv_a = attn.kv_a_proj_with_mqa.weight  # (C + R, D): latent rows, then the shared RoPE key
    if fix_rope:
        kv_a = torch.cat((kv_a[:C], _permute_pairs(kv_a[C:], 1)))
    yield _name(T.ATTN_KV_A_MQA, i), kv_a
    yield _name(T.ATTN_KV_A_NORM, i), attn.kv_a_layernorm.weight
    kv_b = attn.kv_b_proj.weight.view(H, N + V, C)  # (H, N+V, C)
    yield _name(T.ATTN_K_B, i), kv_b[:, :N].transpose(1, 2)  # (H, C, N): ggml {N, C, H}
    yield _name(T.ATTN_V_B, i), kv_b[:, N:]  # (H, V, C): ggml {C, V, H}
    yield _name(T.ATTN_OUT, i), attn.o_proj.weight


def _mlp(mlp, i: int, gate=T.FFN_GATE, up=T.FFN_UP, down=T.FFN_DOWN) -> Iterator[tuple[str, torch.Tensor]]:
    for kind, proj in ((gate, mlp.gate_proj), (up, mlp.up_proj), (down, mlp.down_proj)):
        yield _name(kind, i), proj.weight
        if proj.bias is not None:
            yield _name(kind, i, "bias"), proj.bias


def _moe(moe, i: int) -> Iterator[tuple[str, torch.Tensor]]:
    yield _name(T.FFN_GATE_INP, i), moe.gate.weight
    yield _name(T.FFN_EXP_PROBS_B, i, "bias"), moe.gate.e_score_correction_bias
    gate, up = moe.experts.gate_up_proj.chunk(2, dim=1)  # (E, I, D) each
    yield _name(T.FFN_GATE_EXP, i), gate
    yield _name(T.FFN_UP_EXP, i), up
    yield _name(T.FFN_DOWN_EXP, i), moe.experts.down_proj  # (E, D, I)
    if moe.shared_experts is not None:
        yield from _mlp(moe.shared_experts, i, T.FFN_GATE_SHEXP, T.FFN_UP_SHEXP, T.FFN_DOWN_SHEXP)


def _block(layer, cfg, i: int, moe: bool) -> Iterator[tuple[str, torch.Tensor]]:
    yield _name(T.ATTN_NORM, i), layer.input_layernorm.weight
    if cfg.is_deepseek:
        yield from _mla_attention(layer.self_attn, cfg, i)
    else:
        yield from _dense_attention(layer.self_attn, i, llama=cfg.model_type == "llama")
    yield _name(T.FFN_NORM, i), layer.post_attention_layernorm.weight
    yield from _moe(layer.mlp, i) if moe else _mlp(layer.mlp, i)


def _nextn(model, layer, i: int) -> Iterator[tuple[str, torch.Tensor]]:
    """An MTP depth's own tensors, named as gguf-py maps the HF checkpoint's `model.layers.{i}.*`
    (the embedding and head are the copies DeepSeek's checkpoints store in every MTP layer)."""
    yield _name(T.NEXTN_EH_PROJ, i), layer.eh_proj.weight  # (D, 2D): input [enorm(emb); hnorm(h)]
    yield _name(T.NEXTN_ENORM, i), layer.enorm.weight
    yield _name(T.NEXTN_HNORM, i), layer.hnorm.weight
    yield _name(T.NEXTN_SHARED_HEAD_NORM, i), layer.shared_head.norm.weight
    yield _name(T.NEXTN_EMBED_TOKENS, i), model.model.embed_tokens.weight
    yield _name(T.NEXTN_SHARED_HEAD_HEAD, i), model.output_weight


def gguf_tensors(model, mtp: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor in PyTorch layout) for every tensor llama.cpp reads; with `mtp`, also the MTP
    depths as blocks `num_hidden_layers + k` (a normal block's tensors plus the `nextn.*` ones)."""
    cfg = model.config
    yield _name(T.TOKEN_EMBD), model.model.embed_tokens.weight
    for i, layer in enumerate(model.model.layers):
        yield from _block(layer, cfg, i, cfg.is_moe_layer(i))
    yield _name(T.OUTPUT_NORM), model.model.norm.weight
    if model.lm_head is not None:  # tied: llama.cpp falls back to token_embd
        yield _name(T.OUTPUT), model.lm_head.weight
    for k, layer in enumerate(model.mtp if mtp else ()):
        i = cfg.num_hidden_layers + k
        yield from _block(layer, cfg, i, bool(cfg.n_routed_experts))
        yield from _nextn(model, layer, i)


def _encode(name: str, t: torch.Tensor, qtype: gguf.GGMLQuantizationType, output: bool = False
            ) -> tuple[np.ndarray, Any]:
    data = t.detach().to(torch.float32).cpu().contiguous().numpy()
    if output and qtype == gguf.GGMLQuantizationType.Q4_0:
        qtype = gguf.GGMLQuantizationType.Q8_0  # the output matrix keeps more bits (module docstring)
    keep_f32 = data.ndim <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name
    if keep_f32 or qtype == gguf.GGMLQuantizationType.F32:
        return data, gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    if data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16  # as the converter falls back
    return gguf.quants.quantize(data, qtype), qtype


# ---------------------------------------------------------------------- metadata
def _add_hparams(w: gguf.GGUFWriter, cfg, n_mtp: int = 0) -> None:
    w.add_block_count(cfg.num_hidden_layers + n_mtp)  # MTP blocks counted, as the converter does for GLM-4.5
    if n_mtp:
        w.add_nextn_predict_layers(n_mtp)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    if not cfg.is_deepseek:
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_rope_dimension_count(cfg.head_dim)
        if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        return
    # MLA runs in llama.cpp as MQA over the latent: one kv head of width kv_lora_rank (+ RoPE key).
    w.add_head_count_kv(1)
    w.add_q_lora_rank(cfg.q_lora_rank or 0)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    if not cfg.n_routed_experts:  # MLA with dense FFNs only, as the converter writes it
        w.add_leading_dense_block_count(cfg.num_hidden_layers)
        w.add_expert_feed_forward_length(cfg.intermediate_size)
        w.add_expert_shared_count(0)
        return
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(float(cfg.routed_scaling_factor))
    if cfg.norm_topk_prob:
        w.add_expert_weights_norm(True)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid"
                             else gguf.ExpertGatingFuncType.SOFTMAX)


def export_gguf(model, tokenizer, path: str | os.PathLike, dtype: str = "f16", name: str = "qiusuo",
                mtp: bool = True) -> Path:
    """Write `model` (+ `tokenizer`) as a GGUF file llama.cpp loads. Refuses unsupported configs.
    `mtp`: keep the MTP depths (DeepSeek-V3) as blocks `num_hidden_layers + k`; see the module docstring."""
    if dtype not in FILE_TYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {', '.join(FILE_TYPES)}")
    if tokenizer is None:
        raise ValueError("GGUF export needs the tokenizer (llama.cpp reads it from the file); the checkpoint has none")
    cfg = model.config
    arch = check_gguf_support(cfg)
    file_type, qtype = FILE_TYPES[dtype]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_name(name)
        writer.add_file_type(file_type)
        _add_hparams(writer, cfg, len(model.mtp) if mtp else 0)
        add_tokenizer(writer, tokenizer, cfg.vocab_size)
        with torch.no_grad():
            output = _name(T.OUTPUT) if model.lm_head is not None else _name(T.TOKEN_EMBD)
            for tensor_name, t in gguf_tensors(model, mtp=mtp):
                data, raw = _encode(tensor_name, t, qtype, output=tensor_name == output)
                writer.add_tensor(tensor_name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)  # a crash never leaves a half-written file under the real name
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path
