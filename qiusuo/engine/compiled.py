"""`CompiledDecode`: the decode forward under `torch.compile` (inductor), for `EngineConfig.compile`.

Why: on a CPU a small model's decode step is bound by per-op dispatch, not arithmetic (tiny-moe
runs ~150 ATen ops per step, 1.3 ms at batch 1 eagerly, bench/edge.py). Inductor fuses the
elementwise work into a few generated C++ loops and calls them and the matmuls from a C++
wrapper, which cuts the per-step overhead by ~3x. vLLM compiles its model for the same reason.

- Only decode is compiled: its inputs are (B, 1) tokens and the visible length S, both dynamic,
  so two graphs (B == 1, which inductor specialises, and B >= 2) serve every step. Prefill shapes
  vary with prompt lengths and stay eager.
- Weights are frozen into the graph (inductor `freezing`: constant-folded and prepacked). A
  compiled engine serves the weights it was compiled with, so `LLM` refuses `compile=True` on a
  live module (whose weights a trainer changes in place).
- Weight-only int8 (`quantization="int8"`) compiles too: freezing folds only ops whose inputs are
  all weights, and `_weight_int8pack_mm` also takes the activations, so the graph holds the int8
  matrices themselves, not float copies (tests/test_compile.py records what freezing keeps). The
  one exception: a matrix whose K is not a multiple of 16 runs quantize.py's dequantizing fallback,
  which freezing folds into a float weight (correct, but 4x its int8 bytes; no real shape has one).
  int4 the same way: `_weight_int4pack_mm_for_cpu` takes the activations, so the graph holds the
  packed uint8 matrices (tests/test_compile.py). int8-dynamic's fbgemm weights are opaque objects:
  config.py refuses it. At the SmolLM2-135M shape, B=1, 1 thread, one process (load 3.3), compiled
  vs eager decode: int4 10.8 vs 14.6 ms per token (1.35x), int8 12.9 vs 19.6 (1.51x), fp32 41.2 vs
  48.8 (1.18x), greedy tokens equal; the eager step's per-layer ops (norms, RoPE, cache writes and
  gathers, casts) are ~6 ms of a quantized step (bench/decode_breakdown.py). Compiling took 139 s
  (int4), 57 s (int8, partly cached) and 102 s (fp32) of CPU time on first use.
- No recompiles in steady state: the batch and visible-length dimensions are marked dynamic
  without duck shaping, and the warm-up avoids sizes of 1 (tests/test_compile.py counts graphs).
- Guards: once a graph exists, calls run with `skip_guard_eval_unsafe` (only the guards that tell
  the cached graphs apart are checked), saving ~0.1-0.2 ms per step. A call that needs a new
  graph makes dynamo raise before anything runs; it is retried with full guards, which compiles.
- The model's code chooses trace-friendly paths when `torch.compiler.is_compiling()`: the MoE's
  `forward_gathered`, MLA's `forward_folded`, the MLP's one gate+up matmul, latent attention as
  fused reductions, and the paged cache's gather without a scratch buffer (tests/test_compile.py
  runs each eagerly against the usual path).
"""

from __future__ import annotations

import torch
import torch._dynamo.config
import torch.fx.experimental._config
import torch._inductor.config
from torch import nn

# No mkldnn weight prepacking: prepacked weights are mkldnn tensors, which inductor's FX graph cache
# cannot pickle, so every start recompiled from scratch (fxgraph_cache_bypass), and each graph
# held a packed copy of every weight (issue 15: 5.4 GB resident at the SmolLM2-135M shape). Without
# it the frozen weights are plain tensors, the graphs are cached on disk (TORCHINDUCTOR_CACHE_DIR)
# and a second start of the same model reuses them (fxgraph_cache_hit).
INDUCTOR_OPTIONS = {"cpp_wrapper": True, "freezing": True, "cpp.weight_prepack": False}
# Modes, as torch.compile names them. "max-autotune" also times inductor's generated GEMM kernels
# against ATen's for each matmul shape and keeps the faster: ~15% more batch-16 decode throughput
# on tiny-moe (bench/edge.py), for ~20-60 s more compiling.
MODES = {
    "default": INDUCTOR_OPTIONS,
    "max-autotune": {**INDUCTOR_OPTIONS, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                     "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False},
}


class CompiledDecode:
    def __init__(self, model: nn.Module, mode: str = "default"):
        if mode not in MODES:
            raise ValueError(f"compile mode {mode!r}: use one of {sorted(MODES)}")
        quant = getattr(model, "quantization_config", None)
        # a quantized checkpoint: config.py saw no quantization=
        if quant is not None and quant.get("mode") not in ("int8", "int4"):
            raise ValueError(f"compile with a {quant.get('mode')} model is not supported; weight-only int8 and "
                             "int4 compile (load without compile)")
        self.model = model
        self.options = MODES[mode]
        self._compiled = torch.compile(self._forward, dynamic=True)
        # Dynamo keeps the graphs of every engine in one process on `_forward`'s code object (two per
        # engine, one per dtype/thread count/model): past its default limit of 8 it would silently
        # run later engines eagerly.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._has_graph = False

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        return decode_logits(self.model, input_ids, positions, cache)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        if self._has_graph:
            try:
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    return self._compiled(input_ids, positions, cache)
            except RuntimeError as e:  # a shape no cached graph serves: compile it below
                if "Recompilation" not in str(e):
                    raise
        for pool in (t for layer in cache.pools for t in layer):
            torch._dynamo.mark_static(pool)  # fixed for the engine's life: no size symbols to pass per call
        mark_decode_dims_dynamic(input_ids, positions, cache)
        # The options apply while a graph compiles (inside this call); `torch.compile(options=...)`
        # does not reach freezing, which is decided before inductor's own options are patched in.
        # Python floats (norm eps, softmax scale) become constants, not per-call 0-d tensor inputs.
        # No duck shaping: by default dynamo gives sizes that happen to be equal one symbol, so a
        # warm-up where rows == visible length (16 rows, one 16-token block) compiled a graph that
        # guarded on B == S and recompiled on the next block (issue 15: 333 s to start, then
        # recompiles inside the first requests at the SmolLM2-135M shape).
        with torch._inductor.config.patch(self.options), torch._dynamo.config.patch(specialize_float=True), \
                torch.fx.experimental._config.patch(use_duck_shape=False):
            out = self._compiled(input_ids, positions, cache)
        self._has_graph = True
        return out


def mark_decode_dims_dynamic(input_ids: torch.Tensor, positions: torch.Tensor, cache) -> None:
    """The dimensions that change from step to step: rows B (inputs, mask, slots), visible length S
    (mask) and B * nb (block ids). Marked explicitly so that no size seen while compiling becomes a
    constant (a size of 1 still does: the caller compiles on nb >= 2, see LLMEngine._warm_up)."""
    for t, dim in ((input_ids, 0), (positions, 0), (cache._slots, 0), (cache._block_ids, 0), (cache._mask, 0)):
        if t.shape[dim] > 1:  # the one-row graph keeps B == 1 (marking a size-1 dim dynamic is an error)
            torch._dynamo.mark_dynamic(t, dim)
    torch._dynamo.mark_dynamic(cache._mask, 3)


def decode_logits(model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """One decode forward: input_ids/positions (B, 1) -> logits (B, V). The eager path calls it as is."""
    h = model.hidden_states(input_ids, positions, cache=cache)  # (B, 1, D)
    return model.logits(h[:, 0])  # (B, V)
