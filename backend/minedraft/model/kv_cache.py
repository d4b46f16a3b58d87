"""One model's KV memory as a pool of fixed-size blocks (vLLM's PagedAttention layout), shared by
both internal batches; each batch's rows reach it through block tables.

- `BlockPool`: bookkeeping only. Which blocks are free, which are in use (ref-counted: rows that
  share a cached prefix share its blocks) and which hold a cached prefix that no row uses (reused
  least recently used first, vLLM's automatic prefix caching). A block never used yet is handed
  out only when no other is free: on the CPU its memory is mapped in when first written, so the
  pool's resident memory follows the most tokens ever in flight, and cached prefixes live in
  memory already mapped.
- `KVStorage`: the tensors, per layer [slots, kv heads, head dim], a slot per position of each
  block. Block 0 is the null block, never handed out: table entries past a row's blocks point to
  it (what a query may not see) and padding tokens write its first slot.
- `PagedKVCache`: one batch's rows. A row holds the blocks its positions need, allocated as tokens
  are written; a rollback after rejected drafts only lowers the length the next forward starts
  from (blocks past it are handed back then); moving a row, within a batch or to the other one,
  moves its table, not its keys and values.

Attention reads a row's keys through a slot table, [rows, positions] (model/compact.py gathers
them): every position it may see, in order, whichever blocks they sit in.
"""
import math
import mmap
from collections import OrderedDict
from dataclasses import dataclass

import torch

NULL_BLOCK = 0
SCRATCH_SLOT = 0  # in the null block: padding writes here, and no query sees it


class KVCacheFull(RuntimeError):
    """No block is free: the engine admits and preempts by free blocks so that its steps never
    meet this; a caller that writes more than it reserved does."""


@dataclass(frozen=True)
class PoolSpec:
    num_blocks: int  # usable blocks (the null block comes on top)
    block_size: int = 16
    prefix_caching: bool = False

    @classmethod
    def holding(cls, num_rows: int, capacity: int, block_size: int = 16, prefix_caching: bool = False) -> "PoolSpec":
        """A pool in which `num_rows` rows can all reach `capacity` positions at once."""
        return cls(num_rows * math.ceil(capacity / block_size), block_size, prefix_caching)


def block_hashes(tokens: list[int], block_size: int, num_blocks: int, parent: int | None = None) -> list[int]:
    """The prefix key of each full block: its tokens and every token before it (a chain: each key
    hashes its parent's key with the block's tokens)."""
    hashes = []
    for i in range(num_blocks):
        parent = hash((parent, tuple(tokens[i * block_size:(i + 1) * block_size])))
        hashes.append(parent)
    return hashes


class BlockPool:
    def __init__(self, spec: PoolSpec):
        self.spec = spec
        self.num_blocks = spec.num_blocks
        self.block_size = spec.block_size
        self.prefix_caching = spec.prefix_caching
        self._free: list[int] = []  # a stack: recently freed blocks first
        self._next_unused = NULL_BLOCK + 1  # blocks from here on have never been handed out
        self._refs = [0] * (spec.num_blocks + 1)
        self._cached_unused: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._block_of_hash: dict[int, int] = {}
        self._hash_of_block: dict[int, int] = {}
        self.prefix_queries = 0  # tokens looked up in the prefix cache, and found (vLLM's counters)
        self.prefix_hits = 0

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out: free ones and cached ones no row uses."""
        return len(self._free) + len(self._cached_unused) + self.num_blocks + 1 - self._next_unused

    @property
    def usage(self) -> float:
        """The fraction of blocks in use by rows (vLLM's kv_cache_usage_perc)."""
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, num_positions: int) -> int:
        return -(-num_positions // self.block_size)

    def allocate(self) -> int:
        if self._free:
            block = self._free.pop()
        elif self._cached_unused:
            block, _ = self._cached_unused.popitem(last=False)
            del self._block_of_hash[self._hash_of_block.pop(block)]
        elif self._next_unused <= self.num_blocks:
            block = self._next_unused
            self._next_unused += 1
        else:
            raise KVCacheFull(f"all {self.num_blocks} KV blocks are in use")
        self._refs[block] = 1
        return block

    def release(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if block in self._hash_of_block:
                self._cached_unused[block] = None
            else:
                self._free.append(block)

    def register(self, block: int, key: int) -> None:
        """`block` now holds the full block of prefix `key`. The first block of a key keeps it."""
        if key not in self._block_of_hash and block not in self._hash_of_block:
            self._block_of_hash[key] = block
            self._hash_of_block[block] = key

    def match(self, keys: list[int], num_tokens: int) -> list[int]:
        """The cached blocks of the longest prefix of `keys`, taken for a row (counted as hits of the
        `num_tokens` looked up)."""
        blocks = []
        for key in keys:
            block = self._block_of_hash.get(key)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._cached_unused[block]
            self._refs[block] += 1
            blocks.append(block)
        self.prefix_queries += num_tokens
        self.prefix_hits += len(blocks) * self.block_size
        return blocks


def _zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros. On the CPU from anonymous memory, whose pages the OS maps in only when written: a
    pool's resident memory follows the tokens written, not its size."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8).view(dtype).view(shape)


class KVStorage:
    """The pool's keys and values, per layer [slots, kv heads, head dim]; a runner owns one."""

    def __init__(self, spec: PoolSpec):
        self.num_slots = (spec.num_blocks + 1) * spec.block_size
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def allocate(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype, device) -> None:
        """Every layer at once (the compact forward reads every layer from its first call)."""
        like = torch.empty(0, num_kv_heads, 0, head_dim, dtype=dtype, device=device)
        while len(self.keys) < num_layers:
            self.allocate_like(like)

    def allocate_like(self, key_states: torch.Tensor) -> None:
        """The next layer, shaped as a forward's keys [b, kv heads, n, head dim] (a tensor-parallel
        rank's hold only its own heads)."""
        shape = (self.num_slots, key_states.shape[1], key_states.shape[3])
        self.keys.append(_zeroed(shape, key_states.dtype, key_states.device))
        self.values.append(_zeroed(shape, key_states.dtype, key_states.device))


@dataclass(frozen=True)
class Addresses:
    """Where a forward's rows read and write, on the model's device. `positions` [b, n]: each fed
    token's position (padding repeats its row's last); `write_slots` [b, n]: where its key and
    value go (padding: the scratch slot); `slot_table` [b, t]: the slots of positions 0..t-1."""
    positions: torch.Tensor
    write_slots: torch.Tensor
    slot_table: torch.Tensor


class PagedKVCache:
    """One internal batch's rows over a model's block pool."""

    def __init__(self, pool: BlockPool, num_rows: int, capacity: int):
        self.pool = pool
        self.num_rows = num_rows
        self.capacity = capacity
        self.block_size = pool.block_size
        self._max_blocks = pool.blocks_for(capacity)
        self._tables: list[list[int]] = [[] for _ in range(num_rows)]
        self._table_tensor = torch.zeros(num_rows, self._max_blocks, dtype=torch.long)
        # With prefix caching: each row's tokens by position, and the keys of its registered blocks.
        self._tokens: list[list[int]] = [[] for _ in range(num_rows)]
        self._keys: list[list[int]] = [[] for _ in range(num_rows)]
        # Set by `aim` for transformers' forward (the eager path), which calls `update`.
        self._storage: KVStorage | None = None
        self._aimed: Addresses | None = None

    def check_room(self, num_positions: int) -> None:
        if num_positions > self.capacity:
            raise ValueError(f"KV cache overflow: a row needs {num_positions} positions, capacity is {self.capacity}")

    def num_blocks(self, row: int) -> int:
        return len(self._tables[row])

    def block_table(self, row: int) -> list[int]:
        return list(self._tables[row])

    def num_keyed_blocks(self, row: int) -> int:
        """The row's blocks keyed for prefix caching so far (its first ones)."""
        return len(self._keys[row])

    # -- before a forward ------------------------------------------------------------------------
    def reserve(self, rows: list[int], start_lens: list[int], feeds: list[list[int]]) -> None:
        """Make each row hold exactly the blocks for its first `start_len + len(feed)` positions:
        blocks past its start are handed back (a rollback), new ones allocated. Raises KVCacheFull
        (what was allocated stays with its row, trimmed at its next forward)."""
        for row, start, feed in zip(rows, start_lens, feeds):
            end = start + len(feed)
            self.check_room(end)
            if 0 < start < len(self._keys[row]) * self.block_size:
                raise RuntimeError("a row may not write into its committed blocks: others may share them")
            self._trim(row, self.pool.blocks_for(start))
            if self.pool.prefix_caching:
                self._tokens[row][start:] = feed
            table = self._tables[row]
            while len(table) < self.pool.blocks_for(end):
                block = self.pool.allocate()
                self._table_tensor[row, len(table)] = block
                table.append(block)

    def addresses(self, rows: list[int], start_lens: list[int], feed_lens: list[int], num_new: int,
                  visible_len: int, device) -> Addresses:
        """The forward's addresses for rows fed `feed_lens` tokens each after `start_lens`, padded to
        `num_new`, attending over `visible_len` positions (rows must be reserved)."""
        starts, lengths = torch.tensor(start_lens), torch.tensor(feed_lens)
        offsets = torch.arange(num_new)
        positions = starts[:, None] + torch.minimum(offsets, lengths[:, None] - 1)
        bs = self.block_size
        blocks = self._table_tensor[torch.tensor(rows)][:, :-(-visible_len // bs)]
        # Contiguous: a compiled graph would guard on the stride of a sliced table.
        slot_table = (blocks[:, :, None] * bs + torch.arange(bs)).flatten(1)[:, :visible_len].contiguous()
        write_slots = torch.where(offsets < lengths[:, None],
                                  slot_table.gather(1, positions.clamp(max=visible_len - 1)), SCRATCH_SLOT)
        return Addresses(positions.to(device), write_slots.to(device), slot_table.to(device))

    # -- rows coming and going -------------------------------------------------------------------
    def release_rows(self, rows) -> None:
        """The rows' requests left: their blocks go back to the pool (cached prefixes stay cached)."""
        for row in rows:
            self._trim(row, 0)

    def reset(self, pool: BlockPool | None = None) -> None:
        """Every row empty; with `pool`, over that pool from now on (its old one is dropped whole)."""
        if pool is None:
            self.release_rows(range(self.num_rows))
            return
        self.pool = pool
        self._tables = [[] for _ in range(self.num_rows)]
        self._tokens = [[] for _ in range(self.num_rows)]
        self._keys = [[] for _ in range(self.num_rows)]
        self._table_tensor.zero_()

    def move_row(self, src: int, dst: int) -> None:
        """Row `src` becomes row `dst` (whose blocks are handed back): keeps live rows contiguous."""
        self._take_row(self, src, dst)

    def take_row_from(self, other: "PagedKVCache", src: int, dst: int) -> None:
        """`other`'s row `src` becomes this cache's row `dst`: a request changes batch."""
        if other.pool is not self.pool:
            raise ValueError("rows move only between caches of one block pool")
        self._take_row(other, src, dst)

    def attach_prefix(self, row: int, token_ids: list[int], max_tokens: int) -> int:
        """Give an empty row the cached blocks of the longest cached prefix of `token_ids`, within its
        first `max_tokens` (which a forward will write: a shared block is never written). Returns
        the number of positions the row now holds."""
        if not self.pool.prefix_caching:
            return 0
        self._trim(row, 0)
        keys = block_hashes(token_ids, self.block_size, max_tokens // self.block_size)
        blocks = self.pool.match(keys, max_tokens)
        self._tables[row] = blocks
        self._table_tensor[row, :len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        self._keys[row] = keys[:len(blocks)]
        self._tokens[row] = list(token_ids[:len(blocks) * self.block_size])
        return len(blocks) * self.block_size

    def commit(self, row: int, length: int) -> None:
        """The row's first `length` positions are verified (no forward will start below them): with
        prefix caching, its full blocks there are keyed so that other requests can share them."""
        keys, num_full = self._keys[row], min(length, len(self._tokens[row])) // self.block_size
        if self.pool.prefix_caching and len(keys) < num_full:
            start = len(keys)
            tokens = self._tokens[row][start * self.block_size:]
            new = block_hashes(tokens, self.block_size, num_full - start, keys[-1] if keys else None)
            for block, key in zip(self._tables[row][start:num_full], new):
                self.pool.register(block, key)
            keys += new

    # -- transformers' Cache, the part attention layers call (the eager path) -----------------------
    def aim(self, storage: KVStorage, addresses: Addresses) -> None:
        self._storage, self._aimed = storage, addresses

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # key_states: [b, kv heads, n, head dim]
        storage, aimed = self._storage, self._aimed
        if layer_idx == len(storage.keys):
            storage.allocate_like(key_states)
        keys, values = storage.keys[layer_idx], storage.values[layer_idx]
        keys[aimed.write_slots] = key_states.transpose(1, 2)
        values[aimed.write_slots] = value_states.transpose(1, 2)
        return keys[aimed.slot_table].transpose(1, 2), values[aimed.slot_table].transpose(1, 2)

    # -- inside ------------------------------------------------------------------------------------
    def _trim(self, row: int, num_blocks: int) -> None:
        table = self._tables[row]
        if num_blocks < len(self._keys[row]):
            del self._keys[row][num_blocks:]
            del self._tokens[row][num_blocks * self.block_size:]
        while len(table) > num_blocks:
            self.pool.release(table.pop())
        self._table_tensor[row, num_blocks:] = NULL_BLOCK

    def _take_row(self, source: "PagedKVCache", src: int, dst: int) -> None:
        if source is self and src == dst:
            return
        self._trim(dst, 0)
        self._tables[dst], source._tables[src] = source._tables[src], []
        self._tokens[dst], source._tokens[src] = source._tokens[src], []
        self._keys[dst], source._keys[src] = source._keys[src], []
        self._table_tensor[dst] = source._table_tensor[src]
        source._table_tensor[src] = NULL_BLOCK
