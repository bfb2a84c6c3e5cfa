"""The cache protocol between the model and whoever owns KV memory, and a contiguous cache.

The model calls, once per forward, `cache.attn_mask(positions)` and then, in each attention
layer, `cache.update(layer_idx, *states)` with the states of the new tokens, (B, T, ...) each;
the cache stores them and returns every state visible to the new tokens, (B, S, ...) each, valid
until the next `update` call (a cache may reuse their memory: the layer reads them at once). What
a layer caches is its own business (GQA: keys and values; MLA: latent and RoPE key).

`attn_mask` returns a bool mask (B, 1, T, S), True where attention is allowed, or None for
plain causal attention over exactly the new tokens (T == S, or T == 1 with nothing masked).

The engine's paged cache (`qiusuo.engine`) implements the same two methods over block tables.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Cache(Protocol):
    def attn_mask(self, positions: torch.Tensor) -> torch.Tensor | None: ...

    def update(self, layer_idx: int, *states: torch.Tensor) -> tuple[torch.Tensor, ...]: ...


class DynamicCache:
    """Contiguous cache for a batch whose rows all have the same length (tests, simple loops)."""

    def __init__(self):
        self.layers: dict[int, tuple[torch.Tensor, ...]] = {}

    def attn_mask(self, positions: torch.Tensor) -> torch.Tensor | None:
        B, T = positions.shape
        past = int(positions[0, 0])  # rows are aligned: the first new position is the past length
        if past == 0 or T == 1:
            return None
        causal = torch.ones(T, past + T, dtype=torch.bool, device=positions.device).tril(past)
        return causal.expand(B, 1, T, past + T)

    def update(self, layer_idx: int, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        past = self.layers.get(layer_idx)
        if past is not None:
            states = tuple(torch.cat((p, s), dim=1) for p, s in zip(past, states))
        self.layers[layer_idx] = states
        return states
