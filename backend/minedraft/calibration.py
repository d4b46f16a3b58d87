"""Start-up calibration for flex: time the target's verification and the drafter's steps at
a ladder of batch sizes, on the engine's own devices and cores, before any request arrives.

The rows used are scratch: every request starts its cache rows from position 0, so what
calibration writes there is overwritten before anyone reads it.
"""
import statistics
import time

import torch

from . import sampler
from .cost_model import StepCosts
from .drafter import DraftRow, DraftWork

CONTEXT_LEN = 64  # a typical prompt plus some output: attention cost grows with it


def batch_ladder(max_batch: int) -> list[int]:
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    return sorted(set(sizes + [max_batch]))


def measure_step_costs(target, cache, drafter, max_k: int, max_batch: int, eos_token_ids, threads=None,
                       overlap_drafter=None, repeats: int = 3) -> StepCosts:
    """`drafter` drafts in SD steps; `overlap_drafter`, if another one, beside verification (PSD).
    `threads` (builder.StepThreads or None): when the target's thread count depends on the step,
    verification is timed at both counts; the SD drafter runs at the count of a step alone."""
    sizes = batch_ladder(max_batch)

    def verify_table():
        return [[_median_seconds(lambda: _verify_once(target, cache, b, k, eos_token_ids), repeats)
                 for k in range(max_k + 1)] for b in sizes]

    prefill_per_token = _prefill_context(target, cache, max_batch)
    verify_overlapped = None
    if threads is not None:
        threads.apply(overlapped=True)
        verify_overlapped = verify_table()
        threads.apply(overlapped=False)
    verify = verify_table()
    draft = [draft_step_seconds(drafter, b, max_k, repeats) for b in sizes]
    draft_overlapped = None
    if overlap_drafter is not None and overlap_drafter is not drafter:
        draft_overlapped = [draft_step_seconds(overlap_drafter, b, max_k, repeats) for b in sizes]
    return StepCosts(sizes, verify, draft, overhead_per_row=0.0, prefill_per_token=prefill_per_token,
                     verify_overlapped=verify_overlapped, draft_overlapped=draft_overlapped)


def _prefill_context(target, cache, rows: int) -> float:
    """Fill CONTEXT_LEN positions of every row; returns prefill seconds per prompt token at batch 1
    (timed on a second call: the first allocates the cache)."""
    target.fill(cache, slice(0, rows), [0] * rows, [_tokens(CONTEXT_LEN)] * rows)
    started = time.perf_counter()
    target.fill(cache, [0], [0], [_tokens(CONTEXT_LEN)])
    return (time.perf_counter() - started) / CONTEXT_LEN


def _verify_once(target, cache, rows: int, k: int, eos_token_ids) -> None:
    """What a verification does: the forward over 1 + k tokens per row, then the acceptance rule."""
    logits = target.forward(cache, slice(0, rows), [CONTEXT_LEN] * rows, [_tokens(k + 1)] * rows).cpu()
    greedy = [DraftRow(0, [], 0.0, 0, 1.0, 0, [], k)] * rows
    probs = sampler.processed_probs(logits, sampler.RowSampling.for_rows(greedy, [0] * rows, k + 1, eos_token_ids))
    draft_ids = torch.ones(rows, k, dtype=torch.long)
    sampler.verify(probs, draft_ids, probs[:, :k], torch.full((rows,), k), torch.rand(rows, k), torch.rand(rows))


def draft_step_seconds(drafter, rows: int, steps: int, repeats: int = 3) -> float:
    """Seconds per draft step at this batch size, from runs of `steps` steps on a filled context."""
    def work(cached_len, feed):
        row = DraftRow(cached_len, feed, 0.0, 0, 1.0, 0, [0.5] * steps, steps)
        return DraftWork(0, [], [row] * rows, steps)

    drafter.start(work(0, _tokens(CONTEXT_LEN)))
    drafter.finish()
    timings = []
    for _ in range(repeats):
        drafter.start(work(CONTEXT_LEN, _tokens(1)))
        drafter.finish()
        started, ended = drafter.last_span
        timings.append((ended - started) / steps)
    return statistics.median(timings)


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first calls at a new shape allocate
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def _tokens(n: int) -> list[int]:
    # Token 1 repeated: compute cost does not depend on which tokens are fed.
    return [1] * n
