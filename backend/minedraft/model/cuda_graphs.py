"""Step forwards replayed as CUDA graphs, one per bucket of rows and tokens, as nano-vllm's model
runner captures its decode step (vLLM and SGLang capture the target's verification alike).

A step (an AR token, a draft token, a verification of k + 1) feeds a batch's first rows a few
tokens each. Such a forward is copied into the static input buffers of the smallest bucket that
holds it, the bucket's graph replays the whole compact forward with no Python in between, and the
first rows and tokens of its static output are the step's hidden states. Padding rows and tokens
write only to the pool's scratch slot. A graph reads the slot table of the rows' whole capacity
(masked; past a row's blocks it names the null block): a captured graph cannot take a length that
changes at every step. The graphs hold the runner's KV pool tensors, which every cache shares.

Without a GPU the same buffers and buckets run the forward directly (`capture=False`): that is
how the tests check them on CPU.
"""
import torch

from minedraft.model.kv_cache import SCRATCH_SLOT

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
    """The static inputs and output of one (rows, tokens) bucket, and its graph."""

    def __init__(self, forward, storage, num_rows: int, num_tokens: int, table_width: int, device, capture: bool,
                 pool):
        self.forward, self.storage = forward, storage
        self.input_ids = torch.zeros(num_rows, num_tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(num_rows, num_tokens, dtype=torch.long, device=device)
        self.write_slots = torch.full((num_rows, num_tokens), SCRATCH_SLOT, dtype=torch.long, device=device)
        self.slot_table = torch.full((num_rows, table_width), SCRATCH_SLOT, dtype=torch.long, device=device)
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
        return self.forward(self.input_ids, None, self.positions, self.write_slots, self.slot_table,
                            self.storage.keys, self.storage.values)

    def replay(self, input_ids: torch.Tensor, addresses) -> torch.Tensor:
        """The forward of these [b, n] feeds (b, n within the bucket) at `addresses`, whose slot
        table spans the bucket's width; returns hidden [b, n, H]."""
        b, n = input_ids.shape
        self.input_ids.zero_()
        self.input_ids[:b, :n] = input_ids
        # Padding tokens repeat their row's last position; padding rows sit at position 0. Both
        # write to the scratch slot.
        self.positions.zero_()
        self.positions[:b] = addresses.positions[:, -1:]
        self.positions[:b, :n] = addresses.positions
        self.write_slots.fill_(SCRATCH_SLOT)
        self.write_slots[:b, :n] = addresses.write_slots
        self.slot_table.fill_(SCRATCH_SLOT)
        self.slot_table[:b] = addresses.slot_table
        if self.graph is None:
            return self._run()[:b, :n]
        self.graph.replay()
        return self.output[:b, :n]


class StepGraphs:
    """The buckets of one model's step forward over its KV pool, built (and on a GPU captured)
    once: every cache's rows reach the same pool tensors through their slot tables."""

    @torch.inference_mode()
    def __init__(self, forward, storage, max_rows: int, table_width: int, capture: bool):
        self.row_buckets = row_buckets(max_rows)
        self.table_width = table_width
        self.capture = capture
        pool = torch.cuda.graph_pool_handle() if capture else None
        device = storage.keys[0].device
        self._buckets = {(rows, tokens): StepBucket(forward, storage, rows, tokens, table_width, device, capture, pool)
                         for rows in self.row_buckets for tokens in TOKEN_BUCKETS}

    def bucket(self, num_rows: int, num_tokens: int) -> StepBucket | None:
        rows, tokens = smallest_holding(num_rows, self.row_buckets), smallest_holding(num_tokens, TOKEN_BUCKETS)
        return self._buckets.get((rows, tokens))
