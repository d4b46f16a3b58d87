"""Start-up calibration for flex and auto: time the target's verification and the drafter's steps at
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
# A step alone runs on fewer threads than all the cores only where calibration found that clearly
# faster. On the real pair one thread and two tie in-process at batch <= 8, and the tie was broken by
# noise; through the server, AR on both cores beat AR on one by 27-41 % at c >= 8 (the server's own
# threads share the cores), so a tie goes to all the cores.
FEWER_THREADS_MARGIN = 0.9


def batch_ladder(max_batch: int) -> list[int]:
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    return sorted(set(sizes + [max_batch]))


def measure_step_costs(target, cache, drafter, max_k: int, max_batch: int, eos_token_ids,
                       thread_counts: tuple[int, int] | None = None, overlap_drafter=None,
                       repeats: int = 5) -> StepCosts:
    """`drafter` drafts in SD steps; `overlap_drafter`, if another one, beside verification (PSD).
    `thread_counts` (all the cores, the target's share), for a target whose threads are set per
    step: a step alone (its verification and its in-process drafting, which follows the engine
    thread's count) runs at whichever count calibrates faster at its batch size (small models are
    often faster on one thread), a PSD step's verification at the share; a prompt's prefill, which
    is compute-bound where decoding is not, at its own faster count. The counts are timed in turn,
    shape by shape, so that drift on a shared machine hits both alike."""
    sizes = batch_ladder(max_batch)
    counts = tuple(dict.fromkeys(thread_counts or (torch.get_num_threads(),)))
    target.fill(cache, slice(0, max_batch), [0] * max_batch, [_tokens(CONTEXT_LEN)] * max_batch)  # the context
    prefill = _in_turn(counts, lambda: _timed(lambda: target.fill(cache, [0], [0], [_tokens(CONTEXT_LEN)])), repeats)
    prefill_threads = min(prefill, key=prefill.get)
    prefill_per_token = prefill[prefill_threads] / CONTEXT_LEN
    verify = {count: [] for count in counts}  # thread count -> [batch size index][k]
    draft = {count: [] for count in counts}  # thread count -> [batch size index]
    for b in sizes:
        for count, seconds in _in_turn(counts, lambda: _draft_once(drafter, b, max_k), repeats,
                                       before=lambda: _fill_drafter(drafter, b, max_k)).items():
            draft[count].append(seconds)
        per_k = [_in_turn(counts, lambda: _timed(lambda: _verify_once(target, cache, b, k, eos_token_ids)), repeats)
                 for k in range(max_k + 1)]
        for count in counts:
            verify[count].append([medians[count] for medians in per_k])

    def step_alone(count, i):  # a step alone summed over k: verify plus k draft steps
        return sum(verify[count][i][k] + k * draft[count][i] for k in range(max_k + 1))
    def faster_count(i):  # all the cores unless the share is clearly faster (see FEWER_THREADS_MARGIN)
        return counts[-1] if step_alone(counts[-1], i) < FEWER_THREADS_MARGIN * step_alone(counts[0], i) else counts[0]
    best = [faster_count(i) for i in range(len(sizes))]
    draft_overlapped = None
    if overlap_drafter is not None and overlap_drafter is not drafter:
        draft_overlapped = [_in_turn((None,), lambda: _draft_once(overlap_drafter, b, max_k), repeats,
                                     before=lambda: _fill_drafter(overlap_drafter, b, max_k))[None] for b in sizes]
    per_step = thread_counts is not None
    return StepCosts(sizes, [verify[c][i] for i, c in enumerate(best)], [draft[c][i] for i, c in enumerate(best)],
                     overhead_per_row=0.0, prefill_per_token=prefill_per_token,
                     verify_overlapped=verify[counts[-1]] if per_step else None, draft_overlapped=draft_overlapped,
                     threads_alone=best if per_step else None, threads_overlapped=counts[-1] if per_step else None,
                     threads_prefill=prefill_threads if per_step else None)


def _in_turn(counts, measure, repeats: int, before=None) -> dict:
    """Median seconds of `measure()` at each thread count (None: leave threads alone), the counts
    taking turns; a first, untimed round warms every shape up."""
    timings = {count: [] for count in counts}
    if before is not None:
        before()
    for round_ in range(repeats + 1):
        for count in counts:
            if count is not None:
                torch.set_num_threads(count)
            seconds = measure()
            if round_:
                timings[count].append(seconds)
    return {count: statistics.median(values) for count, values in timings.items()}


def _verify_once(target, cache, rows: int, k: int, eos_token_ids) -> None:
    """What a verification does: the forward over 1 + k tokens per row, then the acceptance rule
    where the logits are (as `Engine._verify` runs it), then the verdict read back, which waits for
    the device."""
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
    drafter.start(_draft_row_work(rows, steps, 0, _tokens(CONTEXT_LEN)))
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


def _tokens(n: int) -> list[int]:
    # Token 1 repeated: compute cost does not depend on which tokens are fed.
    return [1] * n
