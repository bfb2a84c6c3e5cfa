"""`LLM`: the offline API, like vLLM's: `generate`, `chat`, and `stream` for one request's deltas.

`LLM("ckpt_dir")` loads a checkpoint; `LLM(model=<Transformer>, tokenizer=...)` wraps a live
module without copying it (GRPO rollouts generate from the trainer's weights).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from .config import EngineConfig
from .llm_engine import LLMEngine
from .lora_request import LoRARequest
from .outputs import RequestOutput
from .sampling_params import SamplingParams

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

Prompt = str | list[int]
Messages = Sequence[Mapping[str, Any]]
LoRA = LoRARequest | str | None


def _packs_bf16(model: nn.Module, config: EngineConfig) -> bool:
    """Whether a checkpoint `LLM` loaded runs its bf16 linears on prepacked oneDNN weights: bf16 on a CPU
    with AMX-BF16 (detected), eager (compile packs, or not, its own way) and no LoRA serving (which
    wraps the float linears)."""
    from qiusuo.model.packed import cpu_has_amx_bf16

    return (model.dtype == torch.bfloat16 and model.device.type == "cpu" and not config.quantization
            and not config.compile and not config.lora_modules and cpu_has_amx_bf16())


class LLM:
    def __init__(self, model: str | Path | nn.Module, tokenizer: Any | None = None, *,
                 device: str | torch.device | None = None, dtype: str = "auto",
                 quantization: str | None = None, int4_group_size: int = 32, **engine_kwargs: Any):
        """device, dtype, quantization, int4_group_size and engine_kwargs are `EngineConfig` fields
        (kv_cache_bytes, block_size, num_threads, seed, ...), all checked there before anything loads.

        quantization: None, "int8" (per output channel), "int8-dynamic" (also 8-bit activations) or
        "int4" (group-wise, `int4_group_size` 32/64/128); `qiusuo.model.quantize`. Applied to a
        checkpoint loaded here, never to a live module (that would rewrite its weights).
        """
        live = not isinstance(model, (str, Path))
        config = EngineConfig(device=str(device if device is not None else model.device if live else "cpu"),
                              dtype=dtype, quantization=quantization, int4_group_size=int4_group_size,
                              **engine_kwargs)  # every option is checked here, before anything loads
        if not live:
            from qiusuo.model import load_model

            # quantization= quantizes as it loads, one matrix at a time (the float weights are never
            # resident whole: peak RSS ~ the quantized weights)
            model, loaded_tokenizer = load_model(model, device=config.device,
                                                 dtype="float32" if dtype == "auto" else dtype,
                                                 quantization=quantization, int4_group_size=int4_group_size)
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
            if _packs_bf16(model, config):
                from qiusuo.model.packed import pack_bf16_linears

                pack_bf16_linears(model)  # oneDNN's AMX layout once, not per call (qiusuo/model/packed.py)
        elif engine_kwargs.get("lora_modules"):
            raise ValueError("lora_modules apply to checkpoints LLM loads itself (serving adapters rewires the "
                             "model's linear layers); a live module trains its own adapter (qiusuo.model.lora)")
        elif quantization:
            raise ValueError("quantization applies to checkpoints LLM loads itself; quantize a live module "
                             "with qiusuo.model.quantize.quantize_model first")
        elif config.compile:
            raise ValueError("compile=True freezes the weights into the compiled graph, and a live module's "
                             "weights may change (a trainer's); load a checkpoint (LLM(path, compile=True)) "
                             "or use LLMEngine directly if the weights will not change")
        else:
            # A live module is used as it is: moving or casting it would copy the trainer's weights.
            if device is not None and torch.device(device) != model.device:
                raise ValueError(f"the model is on {model.device}, not {device}; move it first or omit device=")
            if dtype != "auto" and _DTYPES[dtype] != model.dtype:
                raise ValueError(f"the model is {model.dtype}, not {dtype}; cast it first or use dtype='auto'")
        self.llm_engine = LLMEngine(model, tokenizer, config)
        # A live module's weights may change between calls (a GRPO update), and KV cached from the
        # old weights would then be served to new prompts sharing a prefix: each offline call on a
        # live module starts with an empty prefix cache (sharing within the call is unaffected).
        self._live_weights = live
        self._ids = itertools.count()

    def _forget_stale_prefixes(self) -> None:
        if self._live_weights and not self.llm_engine.has_unfinished_requests():
            self.llm_engine.reset_prefix_cache()

    def get_tokenizer(self) -> Any | None:
        return self.llm_engine.tokenizer

    # ------------------------------------------------------------------ offline
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 lora_request: LoRA | Sequence[LoRA] = None) -> list[RequestOutput]:
        """One `RequestOutput` per prompt, in the order given. Strings get the tokenizer's bos.
        `lora_request`: the LoRA adapter (a `LoRARequest` or the name of one the engine serves; None:
        the base) for every prompt, or one per prompt; base and adapter prompts share the batch."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._run(list(prompts), sampling_params, add_special_tokens=True, lora_request=lora_request)

    def chat(self, messages: Messages | Sequence[Messages],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True, chat_template: str | None = None,
             **template_kwargs: Any) -> list[RequestOutput]:
        """Render each conversation with the checkpoint's chat template, then generate."""
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer with a chat template; this LLM has none")
        if messages and isinstance(messages[0], Mapping):
            messages = [messages]
        texts = [tokenizer.apply_chat_template(list(m), add_generation_prompt=add_generation_prompt,
                                               chat_template=chat_template, **template_kwargs) for m in messages]
        return self._run(texts, sampling_params, add_special_tokens=False)  # the template has the bos

    def _run(self, prompts: list[Prompt], sampling_params, add_special_tokens: bool,
             lora_request: LoRA | Sequence[LoRA] = None) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts; give one or one each")
        if lora_request is None or isinstance(lora_request, (str, LoRARequest)):
            loras = [lora_request] * len(prompts)
        else:
            loras = list(lora_request)
            if len(loras) != len(prompts):
                raise ValueError(f"got {len(loras)} lora requests for {len(prompts)} prompts; give one or one each")
        if self._live_weights and any(lr is not None for lr in loras):
            raise ValueError("lora_request applies to checkpoints LLM loads itself, not to a live module")
        engine = self.llm_engine
        self._forget_stale_prefixes()
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        try:
            for rid, prompt, p, lr in zip(ids, prompts, params, loras):
                engine.add_request(rid, prompt, p, add_special_tokens=add_special_tokens, lora_request=lr)
        except ValueError:
            engine.abort_request(ids)  # all or nothing: the engine keeps serving everyone else
            raise
        final: dict[str, RequestOutput] = {}
        pending = set(ids)
        try:
            with engine.inference_context():
                while pending:
                    for out in engine.step(finished_only=True):
                        if out.request_id in pending:
                            final[out.request_id] = out
                            pending.discard(out.request_id)
        finally:
            if pending:  # interrupted: do not leave orphans holding KV blocks
                engine.abort_request(list(pending))
        return [final[rid] for rid in ids]

    # ------------------------------------------------------------------ streaming
    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
               add_special_tokens: bool = True) -> Iterator[RequestOutput]:
        """Yield the request's output after every step it progresses (see `delta_text`)."""
        engine = self.llm_engine
        self._forget_stale_prefixes()
        rid = f"llm-{next(self._ids)}"
        engine.add_request(rid, prompt, sampling_params, add_special_tokens=add_special_tokens)
        finished = False
        try:
            while not finished:
                for out in engine.step():
                    if out.request_id == rid:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                engine.abort_request(rid)
