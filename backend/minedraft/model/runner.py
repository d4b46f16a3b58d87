"""Runs batched forwards of one model over rows of its paged KV cache: through the compact,
compiled forward (model/compact.py) where the architecture has one, else through transformers' own."""
import inspect
import logging
import time

import torch

from minedraft.model import compact
from minedraft.model.cuda_graphs import StepGraphs
from minedraft.model.kv_cache import BlockPool, KVStorage, PagedKVCache, PoolSpec
from minedraft.model.packed_linear import pack_linears
from minedraft.model.quantization import is_quantized

log = logging.getLogger("minedraft")

PREFILL_CHUNK_TOKENS = 512


class ModelRunner:
    """Turns rows of token ids into one padded forward pass; never decides who runs.

    `enforce_eager` (vLLM's key) keeps transformers' eager forward as loaded; otherwise a CPU
    model's linear layers are packed for oneDNN (model/packed_linear.py, in place: the model is
    the runner's) and a Llama or Qwen2 model runs the compact forward under torch.compile
    (fullgraph, dynamic shapes), compiled at load for the shapes steps take; on CUDA its steps
    replay as CUDA graphs (model/cuda_graphs.py).

    The runner owns the model's KV pool (model/kv_cache.py): its tensors and the bookkeeping of
    its blocks, which every cache it makes shares."""

    def __init__(self, model, num_rows: int, capacity: int, enforce_eager: bool = True,
                 step_buckets: bool | None = None, pool: PoolSpec | None = None,
                 static_shapes: tuple[tuple[int, int], ...] = ()):
        """`num_rows` rows a cache, `capacity` positions a row at most; `pool`: the KV pool's size
        (None: room for two caches' rows at full capacity). `step_buckets`: run steps (a batch's
        first rows, up to 8 tokens each) through static buffers per bucket of rows and tokens
        (model/cuda_graphs.py); None: on CUDA, where each bucket is captured as a CUDA graph. Only
        with the compact forward. `static_shapes`: (rows, tokens) shapes whose forwards run a
        static-shape graph with frozen weights (compact.StaticSteps; a CPU model)."""
        self.model = model
        self.device = next(model.parameters()).device
        self.num_rows = num_rows
        self.capacity = capacity
        self.pool = BlockPool(pool or PoolSpec.holding(2 * num_rows, capacity))
        self.kv = KVStorage(self.pool.spec)
        self.vocab_size = model.config.vocab_size
        # transformers 5 renamed past_key_values to cache (the old name goes in 5.40); 4.x knows only the old one.
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.compact, self.compiled, self.graphs, self.static_steps = None, None, None, None
        if static_shapes and not enforce_eager and compact.is_supported(model) and self.device.type == "cpu":
            # Before packing: these graphs freeze the weights as loaded (or quantized).
            self.static_steps = compact.StaticSteps(model, static_shapes)
        # Quantized kernels read their weights once per input row: padding would only cost.
        self.min_tokens_per_forward = 1
        if not enforce_eager and pack_linears(model) and not is_quantized(model):
            self.min_tokens_per_forward = compact.MIN_TOKENS_PER_FORWARD
        if not enforce_eager and compact.is_supported(model):
            self.compact = compact.CompactDecoder(model)
            self.compiled = compact.compile_decoder(self.compact)
            # The compact forward writes every layer from its first call.
            self.kv.allocate(model.config.num_hidden_layers, self.compact.num_kv_heads, self.compact.head_dim,
                             model.dtype, self.device)
            self._warm_up()
            on_cuda = self.device.type == "cuda"
            if step_buckets or (step_buckets is None and on_cuda):
                self.graphs = StepGraphs(self.compiled, self.kv, num_rows, self.pool.blocks_for(capacity) *
                                         self.pool.block_size, capture=on_cuda)

    def new_cache(self, num_rows: int | None = None) -> PagedKVCache:
        return PagedKVCache(self.pool, num_rows or self.num_rows, self.capacity)

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Compile now, not in the first requests' steps: the graphs steps and prefills take, for
        a batch's first rows and for rows picked out, at every shape that has its own."""
        started = time.monotonic()
        cache = self.new_cache(max(self.num_rows, *(rows for rows, _ in compact.WARM_UP_SHAPES)))
        for num_rows, num_tokens in compact.WARM_UP_SHAPES:
            feeds = [list(range(1, num_tokens + 1))] * num_rows
            self._compact_hidden(cache, slice(0, num_rows), [4] * num_rows, feeds, None)
            self.fill(cache, list(range(num_rows)), [0] * num_rows, feeds)
        log.info("compiled %s's forward in %.1f s", type(self.model).__name__, time.monotonic() - started)
        for num_rows, num_tokens in self.static_steps.shapes if self.static_steps else ():
            started = time.monotonic()
            self.forward(cache, slice(0, num_rows), [4] * num_rows, [list(range(1, num_tokens + 1))] * num_rows)
            log.info("compiled %s's static step of %d rows x %d tokens in %.1f s", type(self.model).__name__,
                     num_rows, num_tokens, time.monotonic() - started)
        cache.reset()

    def close(self) -> None:
        """Nothing to stop: the model lives in this process (TensorParallelRunner's has workers)."""

    @torch.inference_mode()
    def fill(self, cache: PagedKVCache, rows, start_lens: list[int], feeds: list[list[int]], with_hidden: bool = False,
             embeds: list[torch.Tensor] | None = None):
        """Write the feeds' keys and values to the cache (a prefill). No logits are wanted, so the LM
        head runs at one position only; `with_hidden` returns the last hidden states [b, n, H]
        instead (what a feature draft reads) and runs no LM head at all. Feeds longer than
        PREFILL_CHUNK_TOKENS run in chunks, each attending to the ones before it: attention's
        scores grow with the chunk times the context, not the context squared."""
        longest = max(len(f) for f in feeds)
        if longest <= PREFILL_CHUNK_TOKENS or embeds is not None:
            return self._fill_once(cache, rows, start_lens, feeds, with_hidden, embeds)
        rows, pieces = _row_ids(rows), [[] for _ in feeds]
        for offset in range(0, longest, PREFILL_CHUNK_TOKENS):
            part = [i for i, feed in enumerate(feeds) if len(feed) > offset]
            chunks = [feeds[i][offset:offset + PREFILL_CHUNK_TOKENS] for i in part]
            hidden = self._fill_once(cache, [rows[i] for i in part], [start_lens[i] + offset for i in part], chunks,
                                     with_hidden, None)
            for j, (i, chunk) in enumerate(zip(part, chunks) if with_hidden else []):
                pieces[i].append(hidden[j, :len(chunk)])
        if not with_hidden:
            return None
        return torch.nn.utils.rnn.pad_sequence([torch.cat(piece) for piece in pieces], batch_first=True)

    def _fill_once(self, cache: PagedKVCache, rows, start_lens: list[int], feeds: list[list[int]], with_hidden: bool,
                   embeds: list[torch.Tensor] | None):
        if self.compiled is not None:
            hidden = self._compact_hidden(cache, rows, start_lens, feeds, embeds)
            return hidden if with_hidden else None
        inputs = self._inputs(cache, rows, start_lens, feeds, embeds)
        if with_hidden:
            return self.model.get_decoder()(**inputs).last_hidden_state
        self.model(**inputs, logits_to_keep=1)
        return None

    @torch.inference_mode()
    def forward(self, cache: PagedKVCache, rows, start_lens: list[int], feeds: list[list[int]],
                last_only: bool = False, with_hidden: bool = False, embeds: list[torch.Tensor] | None = None):
        """Feed each row its tokens, written after its first `start_lens[r]` cached positions.

        Returns float32 logits, [b, n, V], or [b, V] at each row's last real token when `last_only`.
        `with_hidden` returns (logits, last hidden states) alike: the states are the LM head's
        input, which a feature draft reads. `embeds` (a feature draft's inputs, [n_r, H] per row)
        replaces the feeds' token embeddings; the feeds still give the rows' lengths.
        """
        last = torch.tensor([len(f) - 1 for f in feeds], device=self.device) if last_only else None
        if self.static_steps is not None and embeds is None and not with_hidden:
            shape = self.static_steps.shape_for(len(feeds), max(map(len, feeds)))
            if shape is not None:
                logits = self._static_logits(cache, rows, start_lens, feeds, shape[1])
                return logits[torch.arange(len(feeds)), last] if last_only else logits
        if self.compiled is not None:
            hidden = self._compact_hidden(cache, rows, start_lens, feeds, embeds)
            if last_only:
                hidden = hidden[torch.arange(len(feeds), device=self.device), last]
            logits = self.model.get_output_embeddings()(hidden).float()
            return (logits, hidden) if with_hidden else logits
        inputs = self._inputs(cache, rows, start_lens, feeds, embeds)
        if with_hidden:
            hidden = self.model.get_decoder()(**inputs).last_hidden_state
            if last_only:
                hidden = hidden[torch.arange(len(feeds), device=self.device), last]
            return self.model.get_output_embeddings()(hidden).float(), hidden
        if not last_only:
            return self.model(**inputs).logits.float()
        # The LM head runs only at the rows' last real positions (a prefill's other positions need
        # no logits: for a 49k vocabulary that is a fifth of the work).
        keep = torch.unique(last)  # sorted
        logits = self.model(**inputs, logits_to_keep=keep).logits
        return logits[torch.arange(len(feeds), device=self.device), torch.searchsorted(keep, last)].float()

    def _compact_hidden(self, cache: PagedKVCache, rows, start_lens: list[int], feeds: list[list[int]],
                        embeds: list[torch.Tensor] | None) -> torch.Tensor:
        """The compiled forward's last hidden states [b, n, H]. Feeds are padded to a common
        length, and to `min_tokens_per_forward` tokens in all; padding repeats its row's last
        position and writes to the pool's scratch slot, which no query sees."""
        num_rows, num_tokens = len(feeds), max(len(f) for f in feeds)
        num_new = max(num_tokens, -(-self.min_tokens_per_forward // num_rows))
        row_ids, feed_lens, visible_len = self._reserve(cache, rows, start_lens, feeds)
        if embeds is None:
            input_ids, embeds_in = self._padded_ids(feeds, num_new), None
        else:
            padded = torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True)
            input_ids, embeds_in = None, torch.nn.functional.pad(padded, (0, 0, 0, num_new - padded.size(1)))
        if self.graphs is not None and embeds is None:
            bucket = self.graphs.bucket(num_rows, num_new)
            if bucket is not None:
                addresses = cache.addresses(row_ids, start_lens, feed_lens, num_new, self.graphs.table_width,
                                            self.device)
                return bucket.replay(input_ids, addresses)[:, :num_tokens]
        addresses = self._compiled_addresses(cache, row_ids, start_lens, feed_lens, num_new, visible_len)
        hidden = self.compiled(input_ids, embeds_in, addresses.positions, addresses.write_slots, addresses.slot_table,
                               self.kv.keys, self.kv.values)
        return hidden[:num_rows, :num_tokens]

    def _static_logits(self, cache: PagedKVCache, rows, start_lens: list[int], feeds: list[list[int]],
                       num_new: int) -> torch.Tensor:
        """The logits [b, n, V] of a static step graph whose shape holds the feeds, padded as
        `_compact_hidden` pads them."""
        row_ids, feed_lens, visible_len = self._reserve(cache, rows, start_lens, feeds)
        addresses = self._compiled_addresses(cache, row_ids, start_lens, feed_lens, num_new, visible_len)
        logits = self.static_steps(self._padded_ids(feeds, num_new), addresses.positions, addresses.write_slots,
                                   addresses.slot_table, self.kv.keys, self.kv.values)
        return logits[:, :max(feed_lens)]

    def _compiled_addresses(self, cache: PagedKVCache, row_ids: list[int], start_lens: list[int],
                            feed_lens: list[int], num_new: int, visible_len: int):
        """A compiled graph's addresses: its context length is a symbolic size, and a visible length
        of 1 would take a graph of its own."""
        return cache.addresses(row_ids, start_lens, feed_lens, num_new, max(2, visible_len), self.device)

    def _inputs(self, cache: PagedKVCache, rows, start_lens: list[int], feeds: list[list[int]],
                embeds: list[torch.Tensor] | None = None) -> dict:
        """The model's keyword arguments for these rows, with the cache aimed at them. Rows are
        right-padded to the longest feed; padding writes only to the pool's scratch slot and its
        outputs are garbage that no caller reads."""
        num_new = max(len(f) for f in feeds)
        if embeds is None:
            tokens = {"input_ids": self._padded_ids(feeds, num_new)}
        else:
            tokens = {"inputs_embeds": torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True)}
        row_ids, feed_lens, visible_len = self._reserve(cache, rows, start_lens, feeds)
        addresses = cache.addresses(row_ids, start_lens, feed_lens, num_new, visible_len, self.device)
        cache.aim(self.kv, addresses)
        return dict(**tokens, position_ids=addresses.positions, use_cache=True,
                    attention_mask=self._mask(addresses.positions, visible_len), **{self._cache_arg: cache})

    @staticmethod
    def _reserve(cache: PagedKVCache, rows, start_lens: list[int], feeds: list[list[int]]):
        """Blocks for the feeds in the rows' tables; returns the rows' ids, feed lengths and the
        longest visible length after the forward."""
        row_ids, feed_lens = _row_ids(rows), [len(f) for f in feeds]
        cache.reserve(row_ids, start_lens, feeds)
        return row_ids, feed_lens, max(s + n for s, n in zip(start_lens, feed_lens))

    def _padded_ids(self, feeds: list[list[int]], num_new: int) -> torch.Tensor:
        return torch.tensor([f + [0] * (num_new - len(f)) for f in feeds], device=self.device)

    def _mask(self, positions: torch.Tensor, visible_len: int) -> torch.Tensor:
        """Additive [b, 1, n, t] mask: a query at position p sees keys 0..p of its own row."""
        keys = torch.arange(visible_len, device=self.device)
        visible = keys[None, None, :] <= positions[:, :, None]
        dtype = self.model.dtype
        mask = torch.zeros(visible.shape, dtype=dtype, device=self.device)
        return mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]


def _row_ids(rows) -> list[int]:
    return list(range(rows.start, rows.stop)) if isinstance(rows, slice) else [int(r) for r in rows]
