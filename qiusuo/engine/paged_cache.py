"""`PagedKVCache`: the model's cache protocol (`qiusuo.model.cache`) over preallocated block pools.

Per attention layer and per cached state (GQA: keys and values (Hk, hd); MLA: latent (C,) and RoPE
key (R,)) one pool of shape (num_blocks + 1, block_size, *state_dims). The extra last block is the
*null block*: zeros, never written, where padded block-table entries point, so every gathered value
is finite and masked positions cannot turn into NaN (0 * NaN) inside attention.

For each forward the model runner calls `prepare` with the batch's block tables, the positions of
the new tokens and their slots; the model then calls `attn_mask` once and `update` per layer.
`update` writes the new tokens' states into their slots (padding skipped) and gathers each row's
blocks, so key j of row b is the state at position j of that sequence. The gathered states live
in scratch buffers shared by every layer, valid until the next `update` (the cache protocol).

With MTP speculative decoding (`mtp=True`) the pools also hold the first MTP layer's states (at
its layer index, num_hidden_layers) and a `hidden` pool: the main model's final hidden state of
each token, which the MTP layer reads to continue from any cached prefix (spec_decode.py).

Dimension letters: B rows, T new tokens per row (right-padded), S = nb * block_size visible
positions, nb blocks per row (the longest block table in the batch), N real new tokens.
"""

from __future__ import annotations

import torch
from torch import nn


def cache_dims(model: nn.Module, mtp: bool = False) -> list[tuple[tuple[int, ...], ...]]:
    """Per layer, the per-token shapes of the states its attention caches (then the first MTP layer's)."""
    layers = list(model.model.layers) + ([model.mtp[0]] if mtp else [])
    return [layer.self_attn.cache_dims() for layer in layers]


class PagedKVCache:
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, mtp: bool = False):
        self.block_size = block_size
        self.null_block = num_blocks
        self.pools: list[tuple[torch.Tensor, ...]] = []
        for dims in cache_dims(model, mtp):
            self.pools.append(tuple(torch.zeros((num_blocks + 1, block_size, *d), dtype=dtype, device=device)
                                    for d in dims))
        D = model.config.hidden_size
        self.hidden = torch.zeros((num_blocks + 1) * block_size, D, dtype=dtype, device=device) if mtp else None
        self._mask: torch.Tensor | None = None
        # One gather buffer per state index, shared by every layer: a layer's gathered states are
        # read by its attention before the next layer gathers. Reusing the memory keeps it hot in
        # cache and spares the page faults of fresh, ever larger allocations as contexts grow.
        self._scratch: list[torch.Tensor | None] = [None] * max(len(d) for d in cache_dims(model, mtp))

    def prepare(self, block_tables: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                valid: torch.Tensor | None, first_visible: int = 0) -> None:
        """block_tables (B, nb), positions (B, T) (padding: 0), slots (N,) of the real new tokens,
        valid (N,) their indices in the flattened (B*T) batch, or None when nothing is padded.
        first_visible: keys before it are hidden (the MTP layer has no state at position 0)."""
        B, nb = block_tables.shape
        S = nb * self.block_size
        self._block_ids = block_tables.reshape(-1)  # (B*nb,)
        self._shape = (B, S)
        self._slots = slots
        self._valid = valid
        # Key j is position j of the row: visible to the query at position p iff j <= p. A padded
        # query sits at position 0 and sees key 0 only (finite, discarded later).
        key_pos = torch.arange(S, device=positions.device)
        self._mask = (key_pos <= positions[:, :, None])[:, None]  # (B, 1, T, S)
        if first_visible:
            self._mask = self._mask & (key_pos >= first_visible)

    def write_hidden(self, slots: torch.Tensor, h: torch.Tensor) -> None:
        """Store the main model's final hidden states h (N, D) of the tokens at `slots` (N,)."""
        self.hidden.index_copy_(0, slots, h.to(self.hidden.dtype))

    def read_hidden(self, slots: torch.Tensor) -> torch.Tensor:
        """slots (...,) -> hidden states (..., D)."""
        return self.hidden.index_select(0, slots.reshape(-1)).view(*slots.shape, -1)

    def attn_mask(self, positions: torch.Tensor) -> torch.Tensor:
        assert self._mask is not None and self._mask.shape[2] == positions.shape[1], "call prepare() first"
        return self._mask

    def update(self, layer_idx: int, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B, S = self._shape
        out = []
        for i, (pool, new) in enumerate(zip(self.pools[layer_idx], states)):
            dims = pool.shape[2:]
            new = new.reshape(-1, *dims)  # (B*T, ...)
            if self._valid is not None:
                new = new.index_select(0, self._valid)  # (N, ...)
            pool.view(-1, *dims).index_copy_(0, self._slots, new.to(pool.dtype))
            out.append(self._gather(i, pool).view(B, S, *dims))  # (B, S, ...)
        return tuple(out)

    def _gather(self, i: int, pool: torch.Tensor) -> torch.Tensor:
        """The batch's blocks of `pool` (B*nb, block_size, ...) in scratch buffer i."""
        if torch.compiler.is_compiling():
            # A compiled graph would copy the whole scratch buffer it writes into (functionalised
            # `out=`); a fresh result is what inductor plans memory for best (~4x faster here).
            return pool.index_select(0, self._block_ids)
        n = self._block_ids.numel() * pool[0].numel()
        buf = self._scratch[i]
        if buf is None or buf.numel() < n:
            # Grow by at least a quarter: contexts grow a block at a time.
            size = n if buf is None else max(n, buf.numel() + buf.numel() // 4)
            buf = self._scratch[i] = torch.empty(size, dtype=pool.dtype, device=pool.device)
        out = buf[:n].view(-1, *pool.shape[1:])
        return torch.index_select(pool, 0, self._block_ids, out=out)
