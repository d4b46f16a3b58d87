"""Step forwards replayed as CUDA graphs, one per bucket of rows and tokens, as nano-vllm's model
runner captures its decode step (vLLM and SGLang capture the target's verification alike).

A step (an AR token, a draft token, a verification of k + 1) feeds a batch's first rows a few
tokens each. Such a forward is copied into the static input buffers of the smallest bucket that
holds it, the bucket's graph replays the whole compact forward with no Python in between, and the
first rows and tokens of its static output are the step's hidden states. Padding rows and tokens
write only to the cache's scratch slot. A graph reads the whole capacity of its cache's rows
(masked): a captured graph cannot take a length that changes at every step. A graph holds its
cache's tensors, so each cache has its own graphs, captured when the runner makes the cache.

Without a GPU the same buffers and buckets run the forward directly (`capture=False`): that is
how the tests check them on CPU.
"""
import weakref

import torch

# nano-vllm's sizes: 1, 2, 4, 8, then every 16 up to the batch.
SMALL_ROW_BUCKETS = (1, 2, 4, 8)
ROW_BUCKET_STEP = 16
# Tokens a row: a draft or AR step feeds 1, a verification k + 1 (num_draft_tokens is at most 7
# in the shipped configs); wider feeds (prefills) run uncaptured.
TOKEN_BUCKETS = (1, 2, 4, 8)


def row_buckets(max_rows: int) -> list[int]:
    sizes = [s for s in SMALL_ROW_BUCKETS if s < max_rows]
    sizes += list(range(ROW_BUCKET_STEP, max_rows, ROW_BUCKET_STEP))
    return sizes + [max_rows]


def smallest_holding(size: int, buckets) -> int | None:
    return next((bucket for bucket in buckets if bucket >= size), None)


class StepBucket:
    """The static inputs and output of one (rows, tokens) bucket over one cache, and its graph."""

    def __init__(self, forward, cache, num_rows: int, num_tokens: int, device, capture: bool, pool):
        self.forward, self.cache = forward, cache
        self.input_ids = torch.zeros(num_rows, num_tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(num_rows, num_tokens, dtype=torch.long, device=device)
        self.write_positions = torch.full((num_rows, num_tokens), cache.capacity, dtype=torch.long, device=device)
        self.graph = None
        if capture:
            # Kernels pick their algorithms and allocate their workspaces in a first run, off the
            # graph's stream, as torch's capture recipe asks.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._run()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.output = self._run()

    def _run(self) -> torch.Tensor:
        # Every position of the rows' capacity is visible to the mask; the scratch slot is not.
        return self.forward(self.input_ids, None, self.positions, self.write_positions, None, self.cache.capacity,
                            self.cache.keys, self.cache.values)

    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor, write_positions: torch.Tensor) -> torch.Tensor:
        """The forward of these [b, n] feeds (b, n within the bucket); returns hidden [b, n, H]."""
        b, n = input_ids.shape
        self.input_ids.zero_()
        self.input_ids[:b, :n] = input_ids
        # Padding tokens repeat their row's last position; padding rows sit at position 0. Both
        # write to the scratch slot.
        self.positions.zero_()
        self.positions[:b] = positions[:, -1:]
        self.positions[:b, :n] = positions
        self.write_positions.fill_(self.cache.capacity)
        self.write_positions[:b, :n] = write_positions
        if self.graph is None:
            return self._run()[:b, :n]
        self.graph.replay()
        return self.output[:b, :n]


class StepGraphs:
    """The buckets of one model's step forward, for every cache it runs over."""

    def __init__(self, forward, max_rows: int, capture: bool):
        self.forward = forward
        self.row_buckets = row_buckets(max_rows)
        self.capture = capture
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self._buckets: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @torch.inference_mode()
    def prepare(self, cache) -> None:
        """Builds (and on a GPU captures) every bucket over this cache; the cache must hold the
        largest row bucket."""
        device = cache.keys[0].device
        self._buckets[cache] = {(rows, tokens): StepBucket(self.forward, cache, rows, tokens, device, self.capture,
                                                           self.pool)
                                for rows in self.row_buckets if rows <= cache.num_rows for tokens in TOKEN_BUCKETS}

    def bucket(self, cache, num_rows: int, num_tokens: int) -> StepBucket | None:
        buckets = self._buckets.get(cache)
        rows, tokens = smallest_holding(num_rows, self.row_buckets), smallest_holding(num_tokens, TOKEN_BUCKETS)
        return None if buckets is None else buckets.get((rows, tokens))
