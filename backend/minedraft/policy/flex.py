"""Flex: every step, AR, SD(k) or PSD(k), whichever yields the most tokens per second for the
requests now running.

Two layers. The cost model proposes: costs start from the start-up calibration (calibration.py)
and follow what the steps take (per batch-size bucket, a moving average of measured over
calibrated time); acceptance is each request's own moving average (sequence.AcceptanceEstimate);
it orders the choices to try. The measurements dispose: per batch-size bucket, every choice (AR,
and SD and PSD at a few draft lengths) is run and timed whole (the step and the serving loop's gap
after the previous one), and the one that yields the most tokens per second there runs. Time per
row is measured per choice and bucket; tokens per row per draft length are pooled over every step
that drafted that many tokens, because acceptance depends on the draft length, not on the step's
mode or load. Why measured rates rather than the model alone, and why pooled yields rather than
per-request estimates: docs/flex.md.
"""
import logging
from collections import deque

from minedraft.policy.cost_model import Choice, StepCosts, rank
from minedraft.policy.fixed import Policy
from minedraft.scheduler import Batch
from minedraft.step_plan import StepPlan

log = logging.getLogger("minedraft")


Ratio = dict[tuple[int, bool], float]  # (batch-size bucket, overlapped) -> measured / calibrated


class OnlineCosts:
    """The calibrated StepCosts, scaled per batch-size bucket by measured/calibrated ratios,
    kept apart for overlapped (PSD) steps, where both sides contend for memory bandwidth (and the
    table may have separate drafting figures for them: the drafter's process)."""

    def __init__(self, table: StepCosts, weight: float = 0.1):
        self.table = table
        self.weight = weight
        self.verify_ratio: Ratio = {}
        self.draft_ratio: Ratio = {}
        self.overhead_per_row = table.overhead_per_row
        self.draft_prefill_per_token = table.draft_prefill_per_token

    def bucket(self, batch_size: float) -> int:
        """The calibrated batch size that a batch of this size is measured against."""
        return self.table.batch_sizes[self.table.bucket_index(batch_size)]

    def verify_seconds(self, batch_size: float, k: int, overlapped: bool = False) -> float:
        return (self.table.verify_seconds(batch_size, k, overlapped)
                * self._ratio(self.verify_ratio, batch_size, overlapped))

    def draft_seconds(self, batch_size: float, k: int, overlapped: bool = False) -> float:
        return (self.table.draft_seconds(batch_size, k, overlapped)
                * self._ratio(self.draft_ratio, batch_size, overlapped))

    def _ratio(self, ratios: Ratio, batch_size: float, overlapped: bool) -> float:
        # A bucket not seen yet borrows the mean correction of those seen the same way: the
        # calibration's bias (bare forwards on a synthetic context) is mostly common to all sizes.
        key = (self.bucket(batch_size), overlapped)
        if key in ratios:
            return ratios[key]
        seen = [r for (_, o), r in ratios.items() if o == overlapped] or list(ratios.values()) or [1.0]
        return sum(seen) / len(seen)

    def observe_verify(self, batch_size: int, k: int, overlapped: bool, seconds: float) -> None:
        self._update(self.verify_ratio, batch_size, overlapped,
                     seconds / self.table.verify_seconds(batch_size, k, overlapped))

    def observe_draft(self, batch_size: int, steps: int, overlapped: bool, seconds: float) -> None:
        self._update(self.draft_ratio, batch_size, overlapped,
                     seconds / self.table.draft_seconds(batch_size, steps, overlapped))

    def observe_overhead(self, batch_size: int, seconds: float) -> None:
        self.overhead_per_row += self.weight * (seconds / batch_size - self.overhead_per_row)

    def _update(self, ratios: Ratio, batch_size: int, overlapped: bool, ratio: float) -> None:
        key = (self.bucket(batch_size), overlapped)
        ratios[key] = ratios[key] + self.weight * (ratio - ratios[key]) if key in ratios else ratio


class MeasuredRates:
    """Per arm and batch-size bucket, seconds per verified row over the arm's last `window`
    settled steps there, and when it last ran there (in steps); per draft length, tokens per
    verified row over the last `yield_window` steps that drafted that many."""

    def __init__(self, window: int = 64, yield_window: int = 1024):
        self.window = window
        self._time: dict[tuple[Choice, int], deque[tuple[int, float]]] = {}
        self._yield: dict[int, deque[tuple[int, int]]] = {}
        self.yield_window = yield_window
        self.last_run: dict[tuple[Choice, int], int] = {}

    def add_time(self, arm: Choice, bucket: int, rows: int, seconds: float, now: int) -> None:
        self._time.setdefault((arm, bucket), deque(maxlen=self.window)).append((rows, seconds))
        self.last_run[(arm, bucket)] = now

    def add_yield(self, k: int, rows: int, tokens: int) -> None:
        self._yield.setdefault(k, deque(maxlen=self.yield_window)).append((rows, tokens))

    def forget(self, arm: Choice, bucket: int) -> None:
        self._time.pop((arm, bucket), None)

    def samples(self, arm: Choice, bucket: int) -> int:
        return len(self._time.get((arm, bucket), ()))

    def tokens_per_row(self, k: int) -> float:
        steps = self._yield.get(k, ()) if k else ()
        rows = sum(r for r, _ in steps)
        return sum(t for _, t in steps) / rows if rows else 1.0

    def rate(self, arm: Choice, bucket: int) -> float:
        steps = self._time.get((arm, bucket), ())
        seconds = sum(s for _, s in steps)
        return sum(r for r, _ in steps) * self.tokens_per_row(arm.k) / seconds if seconds else 0.0


def arms(max_k: int) -> list[int]:
    """The draft lengths flex measures: powers of two up to max_k, and max_k. Fewer arms, fewer
    steps spent measuring the poor ones."""
    lengths = {max_k}
    k = 1
    while k < max_k:
        lengths.add(k)
        k *= 2
    return sorted(lengths)


class FlexPolicy(Policy):
    """Per batch-size bucket: measure every arm once, in the order the cost model ranks them,
    then run the one measured fastest; another takes over only when its measured rate beats the
    current one's by `hysteresis`. An arm not run in a bucket for `refresh` steps is measured
    again (acceptance and load move), which bounds the steps spent away from the best to about
    (min_dwell + min_samples) per `refresh` for each other arm. An arm is a Choice."""

    def __init__(self, max_draft_tokens: int, costs: StepCosts, batch_capacity: int, hysteresis: float = 0.05,
                 min_dwell: int = 8, min_samples: int = 32, refresh: int = 10000):
        super().__init__(Choice("sd", max_draft_tokens))
        self.choice: Choice | None = None  # the arm running; none before the first step
        self.costs = OnlineCosts(costs)
        self.batch_capacity = batch_capacity
        self.draft_lengths = arms(max_draft_tokens)
        self.hysteresis = hysteresis
        self.min_dwell = min_dwell  # steps after a switch before an arm is judged: the layout and caches move
        # Settled steps an arm is measured on before it is compared: with 16, one arm's rate on the real
        # pair moved 10-15 % between two measurements at one load, as much as the arms differ.
        self.min_samples = min_samples
        self.refresh = refresh
        self.rates = MeasuredRates()
        self.steps = 0
        self.steps_since_switch = 0
        self.bucket: int | None = None
        self.steps_in_bucket = 0  # consecutive steps at the current bucket
        self._planned: tuple[Choice, int] | None = None  # a settled step's arm and bucket, to judge

    @property
    def splits_batches(self) -> bool:
        return self.choice is None or self.choice.mode == "psd"

    def candidates(self, alphas: list[float]) -> dict[Choice, float]:
        """Every arm for this many rows, with the model's goodput."""
        predicted = rank(alphas, self.costs, self.max_draft_tokens, self.batch_capacity)
        return {choice: goodput for choice, goodput in predicted.items()
                if not choice.k or choice.k in self.draft_lengths}

    def choose(self, alphas: list[float]) -> Choice:
        predicted = self.candidates(alphas)
        bucket = self.costs.bucket(len(alphas))
        self.steps += 1
        self.steps_since_switch += 1
        self.steps_in_bucket = self.steps_in_bucket + 1 if bucket == self.bucket else 0
        self.bucket = bucket
        if self.choice not in predicted:  # the first step, or PSD with a single request left
            self._switch(max(predicted, key=predicted.get))
        elif self.steps_in_bucket < self.min_dwell:
            pass  # a passing load (a request ending, the next arriving) is no reason to switch
        elif self.steps_since_switch >= self.min_dwell + self.min_samples or self._measured(self.choice, bucket):
            arm = self._arbitrate(bucket, predicted)
            if arm != self.choice:
                # What flex saw, for the server log: each arm's measured tokens/s in this bucket.
                log.info("flex: %s -> %s at bucket %d; measured %s", self.choice, arm, bucket,
                         {str(a): round(self.rates.rate(a, bucket), 1)
                          for a in predicted if self.rates.samples(a, bucket)})
                self._switch(arm)
        return self.choice

    def _measured(self, arm: Choice, bucket: int) -> bool:
        return (self.rates.samples(arm, bucket) >= self.min_samples
                and self.steps - self.rates.last_run.get((arm, bucket), -self.refresh) < self.refresh)

    def _arbitrate(self, bucket: int, predicted: dict[Choice, float]) -> Choice:
        """The current arm while it is being measured; then any arm not measured (lately) in this
        bucket, the model's favourite first; then the fastest measured, if it beats the current
        arm by the hysteresis."""
        unmeasured = [a for a in predicted if not self._measured(a, bucket)]
        if self.choice in unmeasured:
            return self.choice
        if unmeasured:
            explore = max(unmeasured, key=predicted.get)
            # A stale rate is measured afresh, not topped up; a measurement that a passing load cut
            # short (PSD with one request left) is continued, or flex would try it forever.
            if self.steps - self.rates.last_run.get((explore, bucket), self.steps) >= self.refresh:
                self.rates.forget(explore, bucket)
            return explore
        fastest = max(predicted, key=lambda a: self.rates.rate(a, bucket))
        beats = self.rates.rate(fastest, bucket) > (1 + self.hysteresis) * self.rates.rate(self.choice, bucket)
        return fastest if beats else self.choice

    def _switch(self, arm: Choice) -> None:
        self.choice = arm
        self.steps_since_switch = 0

    def plan(self, batches: list[Batch], drafted: set[int]) -> StepPlan | None:
        alphas = [seq.acceptance.value for batch in batches for seq in batch.seqs]
        if not alphas:
            return None
        arm = self.choose(alphas)
        plan = self.plan_choice(batches, drafted, arm)
        settled = self.steps_since_switch >= self.min_dwell
        self._planned = (arm, self.costs.bucket(len(alphas))) if settled else None
        return plan

    def observe(self, record) -> None:
        costs = self.costs
        overlapped = record.draft_slot is not None
        costs.observe_verify(record.verify_size, record.verified_drafts, overlapped,
                             record.verify_span[1] - record.verify_span[0])
        for rows, steps, seconds, alongside in record.draft_runs:
            costs.observe_draft(rows, steps, alongside, seconds)
        costs.observe_overhead(record.verify_size, record.commit_seconds)
        if record.verified_drafts:
            self.rates.add_yield(record.verified_drafts, record.verify_size, record.num_tokens)
        if self._planned is None:
            return
        # The step's wall time with drafter refeeds, and the gap since the previous step: through the
        # server, the thread sending responses shares the core and the GIL, and the more steps an
        # arm takes per token the more it pays. Leaving refeeds out flattered PSD, whose drafter
        # refeeds beside verification (flex chose it at c = 4 and made 230 tokens/s where SD made
        # 384, toy pair). Newcomers' prefill is left out: it costs the same whatever the arm, and
        # arrivals come in bursts that would land on whichever arm happened to be running.
        arm, bucket = self._planned
        self.rates.add_time(arm, bucket, record.verify_size, record.seconds + record.gap_seconds, self.steps)
        self._planned = None
