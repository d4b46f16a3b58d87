"""A batched KV cache whose rows each have their own length.

HF's DynamicCache appends the same number of positions to every row and can only crop
all rows together. Speculative decoding needs each row to roll back by its own amount,
so this cache preallocates [rows, heads, capacity, head_dim] per layer and writes every
forward's new keys at each row's own offset. Rolling a row back is just lowering its
length: stale entries past it are masked out and later overwritten (gpt-fast's habit).
"""
import torch


def feed_positions(start_lens: torch.Tensor, feed_lens: torch.Tensor, num_new: int, capacity: int):
    """Each fed token's position and the cache position its keys go to, [b, num_new] each, for rows
    right-padded to `num_new`. Padding repeats its row's last position (it must not run past the
    model's position table) and writes to the scratch slot past the capacity, which no query sees,
    so that a row near the end of its capacity cannot overflow it."""
    offsets = torch.arange(num_new, device=start_lens.device)
    positions = start_lens[:, None] + torch.minimum(offsets, feed_lens[:, None] - 1)
    write_positions = torch.where(offsets < feed_lens[:, None], start_lens[:, None] + offsets, capacity)
    return positions, write_positions


class RowKVCache:
    """Duck-types the part of transformers' `Cache` that attention layers call: `update`."""

    def __init__(self, num_rows: int, capacity: int):
        self.num_rows = num_rows
        self.capacity = capacity
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        # Set by `prepare` for the forward about to run.
        self._rows: slice | torch.Tensor = slice(0, 0)
        self._write_rows: torch.Tensor | None = None
        self._write_positions: torch.Tensor | None = None
        self._visible_len = 0

    def check_room(self, num_positions: int) -> None:
        if num_positions > self.capacity:
            raise ValueError(f"KV cache overflow: a row needs {num_positions} positions, capacity is {self.capacity}")

    def prepare(self, rows: slice | torch.Tensor, start_lens: torch.Tensor, feed_lens: torch.Tensor,
                num_new: int) -> torch.Tensor:
        """Aim the next forward at `rows`, whose `feed_lens` new tokens start at `start_lens`, padded
        to `num_new` (see feed_positions). Returns the fed tokens' positions."""
        visible_len = int((start_lens + feed_lens).max())
        self.check_room(visible_len)
        self._visible_len = visible_len
        self._rows = rows
        row_ids = torch.arange(rows.start, rows.stop, device=start_lens.device) if isinstance(rows, slice) else rows
        self._write_rows = row_ids[:, None].expand(-1, num_new)
        positions, self._write_positions = feed_positions(start_lens, feed_lens, num_new, self.capacity)
        return positions

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # key_states: [b, kv_heads, n, head_dim]
        if layer_idx == len(self.keys):
            self._allocate(key_states)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        # Advanced indices on dims 0 and 2 put them first: the target view is [b, n, heads, dim].
        keys[self._write_rows, :, self._write_positions] = key_states.transpose(1, 2)
        values[self._write_rows, :, self._write_positions] = value_states.transpose(1, 2)
        visible = slice(0, self._visible_len)
        return keys[self._rows, :, visible], values[self._rows, :, visible]

    def allocate(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype, device) -> None:
        """Every layer at once (the compact forward's cache is there before its first write)."""
        like = torch.empty(0, num_kv_heads, 0, head_dim, dtype=dtype, device=device)
        for _ in range(num_layers):
            self._allocate(like)

    def _allocate(self, like: torch.Tensor) -> None:
        shape = (self.num_rows, like.shape[1], self.capacity + 1, like.shape[3])  # + the padding's scratch slot
        self.keys.append(torch.zeros(shape, dtype=like.dtype, device=like.device))
        self.values.append(torch.zeros(shape, dtype=like.dtype, device=like.device))

    @torch.inference_mode()
    def copy_row_from(self, other: "RowKVCache", src: int, dst: int, length: int) -> None:
        """Copy `other`'s row `src` (its first `length` positions) into this cache's row `dst`."""
        for layer, (keys, values) in enumerate(zip(other.keys, other.values)):
            if layer == len(self.keys):
                self._allocate(keys)  # same [rows, heads, positions, dim] layout as a forward's keys
            self.keys[layer][dst, :, :length].copy_(keys[src, :, :length])
            self.values[layer][dst, :, :length].copy_(values[src, :, :length])

    @torch.inference_mode()
    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row `src`'s first `length` positions over row `dst`: keeps live rows contiguous."""
        for keys, values in zip(self.keys, self.values):
            keys[dst, :, :length].copy_(keys[src, :, :length])
            values[dst, :, :length].copy_(values[src, :, :length])
