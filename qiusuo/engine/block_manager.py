"""`BlockManager`: fixed-size KV blocks, block tables, reference counts and prefix sharing.

The KV pool is cut into `num_blocks` blocks of `block_size` token slots. A sequence's block table
lists its blocks in order; token i lives in slot `block_table[i // block_size] * block_size +
i % block_size`.

Prefix sharing: a *full* block is registered under the key (content id of the previous block, or
for the first block -1 - the sequence's LoRA adapter id, so adapters never share KV; its token ids);
an incoming sequence walks its prompt block by block and reuses every block whose
key is registered (reference count + 1) until the first miss. The key names the whole prefix
exactly (content ids are never reused), so there are no hash collisions to verify. Blocks whose
reference count drops to 0 go back to the free list but keep their content and key until they
are handed out again (least recently freed first), so a repeated prompt or a recomputed
(preempted) sequence finds them again.

When blocks are registered: prompt blocks at allocation, because every sequence admitted in a step
is prefilled in the same forward, where the model writes all new states before it reads any (a
sibling reading a block its first sample writes in the same forward sees the written states);
generated blocks once they are full and computed (`register_computed`). The prompt's last token
is never served from the cache: its logits are needed to sample the first output token.

Speculative decoding: a decoding sequence holds blocks for its k draft tokens too (`lookahead`);
after verification the blocks past its accepted tokens are given back (`trim`).
"""

from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "key", "cid")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.key: tuple | None = None  # (previous block's cid, token ids) when registered
        self.cid = -1  # content id, unique per registration


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first
        self.cached: dict[tuple, int] = {}  # key -> block id
        self._next_cid = 0

    # ------------------------------------------------------------------ accounting
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_used_blocks(self) -> int:
        return len(self.blocks) - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ internals
    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.key is not None and self.cached.get(block.key) == block_id:
            del self.cached[block.key]  # its content is about to be overwritten
        block.key, block.cid, block.ref_count = None, -1, 1
        return block_id

    def _register(self, block_id: int, key: tuple) -> int:
        existing = self.cached.get(key)
        if existing is not None and existing != block_id:
            return self.blocks[existing].cid  # same content already cached: keep that block
        block = self.blocks[block_id]
        block.key, block.cid = key, self._next_cid
        self._next_cid += 1
        self.cached[key] = block_id
        return block.cid

    def _key(self, seq: Sequence, i: int) -> tuple:
        prev = seq.block_cids[i - 1] if i else -1 - seq.lora_id  # another adapter, other KV: its own roots
        return prev, tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])

    def reset_prefix_cache(self) -> None:
        """Forget what every block holds (the weights changed, so cached KV is stale); blocks in use
        stay allocated to their sequences, they just can no longer be found by a new prompt."""
        for block in self.blocks:
            block.key = None
        self.cached.clear()

    # ------------------------------------------------------------------ prefill
    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_needed(seq.num_tokens) <= len(self.free)

    def allocate(self, seq: Sequence) -> None:
        """Give `seq` blocks for all its tokens, reusing cached prefix blocks; sets num_computed_tokens."""
        assert not seq.block_table, f"sequence {seq.seq_id} already holds blocks"
        seq.block_cids = []
        shareable = (seq.num_tokens - 1) // self.block_size if self.enable_prefix_caching else 0
        num_hit = 0
        for i in range(self.blocks_needed(seq.num_tokens)):
            if i < shareable:
                key = self._key(seq, i)
                block_id = self.cached.get(key) if num_hit == i else None
                if block_id is not None:
                    block = self.blocks[block_id]
                    if block.ref_count == 0:
                        del self.free[block_id]
                    block.ref_count += 1
                    num_hit += 1
                    seq.block_cids.append(block.cid)
                else:
                    block_id = self._take_free()
                    seq.block_cids.append(self._register(block_id, key))
            else:
                block_id = self._take_free()
            seq.block_table.append(block_id)
        seq.num_cached_tokens = seq.num_computed_tokens = num_hit * self.block_size
        # The MTP layer's state of position j pairs token j with the hidden state of j - 1, so position
        # 0 has none; cached blocks hold it for every position they cover (spec_decode.py).
        seq.num_mtp_computed = max(1, seq.num_computed_tokens)

    def deallocate(self, seq: Sequence) -> None:
        # Tail blocks are freed first so that they are reused before the shared prefix blocks.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.block_cids = []
        seq.num_computed_tokens = 0

    # ------------------------------------------------------------------ decode
    def can_append(self, seq: Sequence, lookahead: int = 0) -> bool:
        """Room for the token at position num_tokens - 1 (sampled, not yet in the cache), and for
        `lookahead` draft tokens after it?"""
        return self.blocks_needed(seq.num_tokens + lookahead) - len(seq.block_table) <= len(self.free)

    def may_append(self, seq: Sequence, lookahead: int = 0) -> None:
        while seq.num_tokens + lookahead > len(seq.block_table) * self.block_size:
            seq.block_table.append(self._take_free())

    def trim(self, seq: Sequence) -> None:
        """Give back the blocks past the sequence's tokens (those of rejected draft tokens). They were
        never registered (only computed blocks are), so they go straight back to the free list."""
        keep = self.blocks_needed(seq.num_tokens)
        while len(seq.block_table) > keep:
            block_id = seq.block_table.pop()
            block = self.blocks[block_id]
            assert block.ref_count == 1 and block.key is None, f"block {block_id} is shared or registered"
            block.ref_count = 0
            self.free[block_id] = None

    def register_computed(self, seq: Sequence, num_computed: int | None = None) -> None:
        """Register the blocks of `seq` that became full and computed (generated text is shareable too).
        num_computed: tokens whose whole cached state is written (default: num_computed_tokens)."""
        if not self.enable_prefix_caching:
            return
        num_computed = seq.num_computed_tokens if num_computed is None else num_computed
        for i in range(len(seq.block_cids), num_computed // self.block_size):
            seq.block_cids.append(self._register(seq.block_table[i], self._key(seq, i)))
