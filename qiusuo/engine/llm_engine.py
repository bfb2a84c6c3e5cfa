"""`LLMEngine`: requests in, one scheduled step at a time, per-request outputs (with deltas) out.

The engine owns the scheduler, the block manager and the model runner. It never copies the
model: it runs the live module under `torch.inference_mode()` in eval mode for each step and
puts the module's previous mode back, so the GRPO trainer can generate from its own weights.
The server drives `add_request` / `step` / `abort_request` from one loop: on a thread of the
server's process, or in an engine-core process of its own (serve/, the two transports).
"""

from __future__ import annotations

import contextlib
import itertools
import random
from typing import Any, Iterable

import torch
from torch import nn

from qiusuo.model import kv_cache_bytes_per_token

from .block_manager import BlockManager
from .config import EngineConfig
from .guided import GrammarBackend, GuidedState
from .lora_request import LoRARequest
from .model_runner import ModelRunner
from .outputs import RequestOutput
from .sampler import Sampler
from .sampling_params import SamplingParams
from .reasoning import ThinkState
from .scheduler import Scheduler
from .sequence import Sequence, SequenceGroup, mix_seed
from .spec_decode import SpecDecodingStats


def warm_up_rows(max_num_seqs: int) -> int:
    """Rows of the compiled several-rows graph's warm-up: ~sqrt(2 * max_num_seqs), within [2, max_num_seqs]
    (256 -> 23, 32 -> 8, 16 -> 6); 1 when the engine never runs more than one row."""
    if max_num_seqs < 2:
        return 1
    return max(2, min(max_num_seqs, round((2 * max_num_seqs) ** 0.5)))


class LLMEngine:
    def __init__(self, model: nn.Module, tokenizer: Any | None = None, config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        mcfg = model.config
        self.max_model_len = min(config.max_model_len or mcfg.max_position_embeddings, mcfg.max_position_embeddings)
        self.eos_token_ids = frozenset(mcfg.eos_token_ids) | frozenset(
            [tokenizer.eos_token_id] if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None else []
        )
        bs = config.block_size
        spec = config.speculative_config
        self.num_speculative_tokens = k = spec.num_speculative_tokens if spec is not None else 0
        self.spec_decoding_stats = SpecDecodingStats(k) if k else None
        self.kv_cache_bytes_per_token = kv_cache_bytes_per_token(model, model.dtype)
        if k:
            if not len(getattr(model, "mtp", ())):
                raise ValueError(
                    "speculative_config method 'mtp' drafts with the model's MTP layer, and this model has "
                    f"none (model_type={mcfg.model_type!r}, num_nextn_predict_layers="
                    f"{getattr(mcfg, 'num_nextn_predict_layers', 0)}); use a DeepSeek-V3 checkpoint trained with "
                    "MTP (qiusuo pretrain --preset tiny-moe) or drop speculative_config"
                )
            # The MTP layer's own states and the main model's final hidden state, per token.
            size = torch.tensor([], dtype=model.dtype).element_size()
            self.kv_cache_bytes_per_token += size * (mcfg.hidden_size + sum(
                torch.Size(d).numel() for d in model.mtp[0].self_attn.cache_dims()))
        blocks_per_seq = -(-self.max_model_len // bs)
        budget = config.kv_cache_bytes
        if budget is None:
            budget = min(config.max_num_seqs * blocks_per_seq * bs * self.kv_cache_bytes_per_token,
                         EngineConfig.DEFAULT_MAX_KV_BYTES)
        num_blocks = budget // (bs * self.kv_cache_bytes_per_token)
        if num_blocks < blocks_per_seq:
            need = blocks_per_seq * bs * self.kv_cache_bytes_per_token
            raise ValueError(
                f"kv_cache_bytes={budget} holds {num_blocks} blocks of {bs} tokens, fewer than one "
                f"sequence of max_model_len={self.max_model_len} needs; give at least {need} bytes "
                "or lower max_model_len"
            )
        self.num_blocks = num_blocks
        max_batched = config.max_num_batched_tokens or max(4096, self.max_model_len)
        if max_batched < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens={max_batched} must be >= max_model_len={self.max_model_len}")
        self.block_manager = BlockManager(num_blocks, bs, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, max_batched, k)
        decode_token = None
        if tokenizer is not None:
            decode_token = lambda i: tokenizer.decode([i])  # noqa: E731
        with torch.inference_mode():
            self.runner = ModelRunner(model, num_blocks, bs, model.dtype, Sampler(decode_token), config.compile, k)
        self._groups: dict[str, SequenceGroup] = {}
        self._grammar_backend = None  # guided.GrammarBackend, built on the first structured request
        self._seq_ids = itertools.count()
        self._rng = random.Random(config.seed)
        self.loras = None  # lora.ServingAdapters once an adapter is added
        for name, path in (config.lora_modules or {}).items():
            self.add_lora(LoRARequest(name, 0, path))
        if config.compile:
            self._warm_up()

    def _warm_up(self) -> None:
        """Compile the decode graphs (one row, several rows) now rather than in the first requests.

        Sizes seen while compiling become a graph's assumptions, so the warm-up avoids the ones that
        would be baked in: dynamo specialises any dimension of size 1, so each row spans two KV
        blocks (block_size + 1 prompt tokens: nb = 2); the several-rows graph's batch is
        `warm_up_rows(max_num_seqs)`, which inductor takes as the size hint of its dynamic batch
        dimension (max-autotune times the GEMM choices at that size). The hint is the geometric
        middle of the batches the graph serves (2 .. max_num_seqs), not any benchmark's batch.
        """
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, detokenize=False)
        prompt = [0] * min(self.config.block_size + 1, self.max_model_len - 4)
        if len(prompt) < 1:
            return  # a context too short to decode in: nothing to compile ahead
        for rows in sorted({1, warm_up_rows(self.config.max_num_seqs)}):
            ids = [f"warm-up-{rows}-{i}" for i in range(rows)]
            for rid in ids:
                self.add_request(rid, prompt, params)
            while any(rid in self._groups for rid in ids):
                self.step(finished_only=True)
        self.reset_prefix_cache()

    # ------------------------------------------------------------------ requests
    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load an adapter to serve per request (vLLM's name); False when its name is loaded already."""
        from qiusuo.model.lora import ServingAdapters

        if self.loras is not None and lora_request.lora_name in self.loras.ids:
            return False
        if lora_request.lora_path is None:
            raise ValueError(f"LoRA adapter {lora_request.lora_name!r} is not loaded and the request gives no "
                             "lora_path")
        if self.config.compile or self.num_speculative_tokens:
            raise ValueError("LoRA adapters do not combine with compile or speculative decoding yet; merge the adapter "
                             "into a checkpoint (qiusuo export merged) and serve that")
        if self.loras is None:
            from qiusuo.model.packed import is_packed

            if is_packed(self.model):
                raise ValueError("LoRA adapters wrap the model's float linear layers, and this engine's bf16 "
                                 "linears are prepacked for AMX (qiusuo/model/packed.py); start it with the adapter "
                                 "in lora_modules, which loads the layers unpacked")
            self.loras = ServingAdapters(self.model)
            self.runner.loras = self.loras
        self.loras.add(lora_request.lora_name, lora_request.lora_path)
        return True

    def list_loras(self) -> list[str]:
        """The names of the adapters this engine serves."""
        return [] if self.loras is None else list(self.loras.ids)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    add_special_tokens: bool = True, lora_request: LoRARequest | str | None = None) -> None:
        """Queue a request; raises ValueError (and queues nothing) when the request is invalid.
        `lora_request`: the adapter it runs with (a name the engine serves, or a LoRARequest; None: the base)."""
        params = SamplingParams() if params is None else params
        lora_id = self._lora_id(lora_request)
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if request_id in self._groups:
            raise ValueError(f"request_id {request_id!r} is already in use; pick a unique id")
        text, ids = self._tokenize(prompt, add_special_tokens)
        if not ids:
            raise ValueError("the prompt is empty; give at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but the context holds {self.max_model_len}; "
                "shorten it to leave room for at least one output token"
            )
        vocab = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got min {min(ids)}, max {max(ids)}")
        compiled = self.compile_grammar(params) if params.structured_outputs is not None else None
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        seqs = []
        for i in range(params.n):
            decoder = None
            if self.tokenizer is not None and params.detokenize:
                decoder = self.tokenizer.incremental_decoder(skip_special_tokens=params.skip_special_tokens)
            seqs.append(Sequence(next(self._seq_ids), request_id, i, ids, params, mix_seed(seed, i),
                                 self.eos_token_ids, self.max_model_len, decoder))
            seqs[-1].lora_id = lora_id
            if compiled is not None:
                seqs[-1].guided = GuidedState(self._grammar_backend, compiled, ThinkState.for_prompt(self.tokenizer, ids),
                                              seqs[-1].stop_token_ids, params.structured_outputs.allow_think_block)
        self._groups[request_id] = SequenceGroup(request_id, text, ids, params, seqs)
        for s in seqs:
            self.scheduler.add(s)

    def _lora_id(self, lora_request: LoRARequest | str | None) -> int:
        if lora_request is None:
            return 0
        if isinstance(lora_request, LoRARequest):
            self.add_lora(lora_request)  # a new name with a path is loaded now (vLLM loads on first use)
            lora_request = lora_request.lora_name
        if not isinstance(lora_request, str):
            raise ValueError("lora_request must be a LoRARequest, an adapter name or None, got "
                             f"{type(lora_request).__name__}")
        if self.loras is None:
            raise ValueError(f"no LoRA adapter named {lora_request!r}: this engine serves none (lora_modules)")
        return self.loras.id_of(lora_request)

    def compile_grammar(self, params: SamplingParams):
        """The request's grammar, compiled (xgrammar caches by grammar); ValueError when it is invalid."""
        if self.tokenizer is None:
            raise ValueError("structured outputs need a tokenizer (the grammar is over text); this engine has none")
        if self._grammar_backend is None:
            self._grammar_backend = GrammarBackend(self.tokenizer, self.model.config.vocab_size,
                                                   sorted(self.eos_token_ids))
        return self._grammar_backend.compile(params.structured_outputs)

    def _tokenize(self, prompt: str | list[int], add_special_tokens: bool) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass prompts as lists of token ids")
            if not prompt:
                return prompt, []
            return prompt, list(self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Stop a request (or several) now and free its blocks; unknown ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            group = self._groups.pop(rid, None)
            if group is None:
                continue
            for seq in group.seqs:
                if not seq.is_finished:
                    self.scheduler.finish(seq)
                    seq.finish("abort")

    def reset_prefix_cache(self) -> None:
        """Drop the prefix cache (vLLM's name): call it when the model's weights change in place."""
        self.block_manager.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    # ------------------------------------------------------------------ stepping
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Run one scheduled step; returns the outputs of every request that progressed.

        finished_only: return only finished requests (offline generation skips building the
        per-step outputs nobody reads: ~6% of a 256-request run, bench/engine.py).
        """
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        touched: dict[str, SequenceGroup] = {}
        if self.num_speculative_tokens:
            self._step_spec(sched, touched)
        else:
            with self.inference_context():
                result = self.runner.run(sched.prefill, sched.decode)
            for i, seq in enumerate(sched.decode + sched.prefill):
                seq.num_computed_tokens = seq.num_tokens  # every token but the new one is cached now
                seq.append_token(result.token_ids[i], result.logprobs[i], result.top_logprobs[i])
                self.block_manager.register_computed(seq)
                if seq.is_finished:
                    self.scheduler.finish(seq)
                touched[seq.request_id] = None
        outputs = []
        for rid in touched:
            group = self._groups[rid]
            if group.is_finished:
                outputs.append(group.output())
                del self._groups[rid]
            elif not finished_only:
                outputs.append(group.output())
        return outputs

    def _step_spec(self, sched, touched: dict) -> None:
        """A speculative step: each row appends the tokens it gained until one of them stops it (a stop
        token, a stop string or max_tokens inside the accepted drafts: the rest are dropped)."""
        with self.inference_context():
            rows = self.runner.run_spec(sched.prefill, sched.decode)
        stats = self.spec_decoding_stats
        for i, (seq, row) in enumerate(zip(sched.decode + sched.prefill, rows)):
            if i < len(sched.decode):
                stats.observe(row.num_draft, row.num_accepted)
            for t, lp, top in zip(row.token_ids, row.logprobs, row.top_logprobs):
                seq.append_token(t, lp, top)
                if seq.is_finished:
                    break
            # The main KV is written for every token but the newest (accepted drafts included); the
            # slots of rejected drafts are past it and their blocks go back (a finished sequence frees all).
            seq.num_computed_tokens = seq.num_tokens - 1
            if not seq.is_finished:
                self.block_manager.trim(seq)
            # A block is shared only once the MTP layer's states in it are verified too.
            self.block_manager.register_computed(seq, min(seq.num_computed_tokens, seq.num_mtp_computed))
            if seq.is_finished:
                self.scheduler.finish(seq)
            touched[seq.request_id] = None

    @contextlib.contextmanager
    def inference_context(self):
        """Eval mode, inference mode and the engine's threads for the duration; the model's mode and
        the process's threads are restored after. `step` enters it; a caller running many steps
        (LLM.generate) enters it once around them, so a live module is not switched between train
        and eval on every step (~9% of a GRPO rollout's CPU time)."""
        was_training = self.model.training
        threads = torch.get_num_threads()
        try:
            if self.config.num_threads is not None:
                torch.set_num_threads(self.config.num_threads)
            if was_training:
                self.model.eval()
            with torch.inference_mode():
                yield
        finally:
            if was_training:
                self.model.train()
            if self.config.num_threads is not None:
                torch.set_num_threads(threads)

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        bm = self.block_manager
        return {
            "num_blocks": bm.num_blocks,
            "num_used_blocks": bm.num_used_blocks,
            "block_size": bm.block_size,
            "kv_cache_bytes_per_token": self.kv_cache_bytes_per_token,
            "kv_cache_bytes": bm.num_blocks * bm.block_size * self.kv_cache_bytes_per_token,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_preemptions": self.scheduler.num_preemptions,
            "grammar_seconds": self.runner.sampler.grammar_stats.seconds,  # filling + applying token masks
            "grammar_tokens": self.runner.sampler.grammar_stats.tokens,  # guided rows sampled
            **({"spec_decode": self.spec_decoding_stats.as_dict()} if self.spec_decoding_stats else {}),
        }
