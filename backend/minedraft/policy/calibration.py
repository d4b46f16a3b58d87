"""Start-up calibration for flex and auto: time the target's verification and the drafter's steps at
a ladder of batch sizes, on the engine's own devices and cores, before any request arrives.

The rows used are scratch: every request starts its cache rows from position 0, so what
calibration writes there is overwritten before anyone reads it.
"""
import itertools
import statistics
import time

import torch

from minedraft.drafting.drafter import DraftRow, DraftWork
from minedraft.model import sampler
from minedraft.policy.cost_model import StepCosts

CONTEXT_LEN = 64  # a typical prompt plus some output: attention cost grows with it
_fresh_starts = itertools.count()


def batch_ladder(max_batch: int) -> list[int]:
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    return sorted(set(sizes + [max_batch]))


def measure_step_costs(target, cache, drafter, max_k: int, max_batch: int, eos_token_ids, overlap_drafter=None,
                       repeats: int = 5) -> StepCosts:
    """`drafter` drafts in SD steps; `overlap_drafter`, if another one, beside verification (PSD).
    Each figure is the median of `repeats` timings after an untimed warm-up."""
    sizes = batch_ladder(max_batch)
    target.fill(cache, slice(0, max_batch), [0] * max_batch, [_tokens(CONTEXT_LEN)] * max_batch)  # the context
    prefill = _median(lambda: _timed(lambda: target.fill(cache, [0], [0], [_tokens(CONTEXT_LEN)])), repeats)
    verify, draft = [], []  # [batch size index][k], [batch size index]
    for b in sizes:
        draft.append(_median(lambda: _draft_once(drafter, b, max_k), repeats,
                             before=lambda: _fill_drafter(drafter, b, max_k)))
        verify.append([_median(lambda: _timed(lambda: _verify_once(target, cache, b, k, eos_token_ids)), repeats)
                       for k in range(max_k + 1)])
    # One row's context fed whole: its one forward also yields the first draft token.
    draft_prefill = _median(lambda: _timed(lambda: _fill_drafter(drafter, 1, 1)), repeats)
    draft_overlapped = None
    if overlap_drafter is not None and overlap_drafter is not drafter:
        draft_overlapped = [_median(lambda: _draft_once(overlap_drafter, b, max_k), repeats,
                                    before=lambda: _fill_drafter(overlap_drafter, b, max_k)) for b in sizes]
    return StepCosts(sizes, verify, draft, overhead_per_row=0.0, prefill_per_token=prefill / CONTEXT_LEN,
                     draft_prefill_per_token=draft_prefill / CONTEXT_LEN, draft_overlapped=draft_overlapped)


def _median(measure, repeats: int, before=None) -> float:
    """Median seconds of `measure()` over `repeats` calls after an untimed one that warms the shape up."""
    if before is not None:
        before()
    measure()
    return statistics.median(measure() for _ in range(repeats))


def _verify_once(target, cache, rows: int, k: int, eos_token_ids) -> None:
    """What a verification of sampled rows does: the forward over 1 + k tokens per row, then the
    acceptance rule where the logits are (as `Engine._verify` runs it), then the verdict read back,
    which waits for the device. Greedy rows cost less (ids only, no probabilities over the
    vocabulary), so for greedy traffic these figures lean towards fewer tokens verified."""
    logits = target.forward(cache, slice(0, rows), [CONTEXT_LEN] * rows, [_tokens(k + 1)] * rows)
    greedy = [DraftRow(0, [], 0.0, 0, 1.0, 0, [], k)] * rows
    sampling = sampler.RowSampling.for_rows(greedy, [0] * rows, k + 1, eos_token_ids).to(logits.device)
    probs = sampler.processed_probs(logits, sampling)
    draft_ids = torch.ones(rows, k, dtype=torch.long)
    accepted, next_tokens = sampler.verify(probs, draft_ids, probs[:, :k], torch.full((rows,), k), torch.rand(rows, k),
                                           torch.rand(rows))
    accepted.tolist(), next_tokens.tolist()


def _draft_row_work(rows: int, steps: int, cached_len: int, feed: list[int]) -> DraftWork:
    row = DraftRow(cached_len, feed, 0.0, 0, 1.0, 0, [0.5] * steps, steps)
    return DraftWork(0, [], [row] * rows, steps)


def _fill_drafter(drafter, rows: int, steps: int) -> None:
    # A context the draft's prefix cache has not seen: a prefill that matched the last one's blocks
    # would time only its tail (it once made the draft's prefill look 4x cheaper than it is).
    drafter.start(_draft_row_work(rows, steps, 0, _tokens(CONTEXT_LEN, first=2 + next(_fresh_starts) % 512)))
    drafter.finish()


def _draft_once(drafter, rows: int, steps: int) -> float:
    """Seconds per draft step: one drafting of `steps` steps after the filled context (the drafter's
    own span: a worker's pipe round trip is not drafting)."""
    drafter.start(_draft_row_work(rows, steps, CONTEXT_LEN, _tokens(1)))
    drafter.finish()
    started, ended = drafter.last_span
    return (ended - started) / steps


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _tokens(n: int, first: int = 1) -> list[int]:
    # Token 1 repeated: compute cost does not depend on which tokens are fed. A prefix cache keys
    # blocks by every token before them too, so another first token makes a context new to it.
    return [first] + [1] * (n - 1)
