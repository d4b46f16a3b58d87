"""Flex: every step, pick AR, SD(k) or PSD(k), whichever the cost model expects to yield the
most tokens per second for the requests now running.

Costs start from the engine's start-up calibration (calibration.py) and follow what the
steps actually take: per batch-size bucket, a moving average of measured over calibrated
time corrects the calibrated table. Acceptance is each request's own moving average
(sequence.AcceptanceEstimate). Switching needs a clear gain (hysteresis), and while AR is
chosen an occasional SD step keeps the acceptance estimates alive.
"""
from .cost_model import Choice, StepCosts, rank
from .policy import Policy, StepPlan
from .scheduler import Batch


Ratio = dict[tuple[int, bool], float]  # (batch-size bucket, overlapped) -> measured / calibrated


class OnlineCosts:
    """The calibrated StepCosts, scaled per batch-size bucket by measured/calibrated ratios,
    kept apart for overlapped (PSD) steps, where both sides contend for memory bandwidth (and the
    table itself may have separate figures for them: other threads, the drafter's process)."""

    def __init__(self, table: StepCosts, weight: float = 0.1):
        self.table = table
        self.weight = weight
        self.verify_ratio: Ratio = {}
        self.draft_ratio: Ratio = {}
        self.overhead_per_row = table.overhead_per_row

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


class FlexPolicy(Policy):
    """Ranks the choices with the cost model, then scales each mode's estimate by what that mode
    actually achieved at this load: a moving average of realised / predicted goodput over whole
    steps, per (mode, batch-size bucket). That catches what the component costs miss (the
    server's response sending, the GIL, pipe round trips), so the model proposes and the
    measurements dispose."""

    def __init__(self, max_draft_tokens: int, costs: StepCosts, batch_capacity: int, hysteresis: float = 0.2,
                 k_hysteresis: float = 0.05, min_dwell: int = 8, probe_interval: int = 8):
        super().__init__(Choice("sd", max_draft_tokens))
        self.name = "flex"
        self.costs = OnlineCosts(costs)
        self.batch_capacity = batch_capacity
        self.hysteresis = hysteresis  # for a change of mode, which moves requests and refeeds drafters
        self.k_hysteresis = k_hysteresis  # for a new k in the same mode, which costs nothing
        self.min_dwell = min_dwell
        self.probe_interval = probe_interval
        self.choice: Choice | None = None
        self.steps_since_switch = 0
        self.steps_since_draft = 0
        self.last_ranking: dict[Choice, float] = {}
        self.realised_ratio: dict[tuple[str, int], float] = {}  # (mode, bucket of running rows)
        self._planned: tuple[Choice, int, float] | None = None  # choice, rows, predicted goodput

    @property
    def splits_batches(self) -> bool:
        return self.choice is None or self.choice.mode == "psd"

    def choose(self, alphas: list[float]) -> tuple[Choice, bool]:
        """The best expected goodput. The current choice stays for min_dwell steps, and after that
        until another beats it clearly: a switch costs more than the step (requests move between
        the batches, and a drafter change refeeds that drafter's cache). Also says whether the
        step is a probe."""
        predicted = rank(alphas, self.costs, self.max_draft_tokens, self.batch_capacity)
        bucket = self.costs.bucket(len(alphas))
        ranking = {c: g * self.realised_ratio.get((c.mode, bucket), 1.0) for c, g in predicted.items()}
        best = max(ranking, key=ranking.get)
        self.steps_since_switch += 1
        margin = self.k_hysteresis if self.choice is not None and best.mode == self.choice.mode else self.hysteresis
        if self.choice not in ranking or (self.steps_since_switch >= self.min_dwell
                                          and ranking[best] > (1 + margin) * ranking[self.choice]):
            self.choice = best
            self.steps_since_switch = 0
        self.last_ranking = ranking
        choice, probe = self.choice, False
        if self.choice.mode == "ar" and self.steps_since_draft >= self.probe_interval:
            # AR learns nothing about acceptance: one SD step now and then lets it come back.
            choice, probe = max((c for c in ranking if c.mode == "sd"), key=ranking.get), True
        # What a mode achieves is judged on its settled steps: right after a switch the layout and
        # the drafters' caches are still moving, and a probe is one SD step in an AR layout.
        settled = not probe and self.steps_since_switch >= self.min_dwell
        self._planned = (choice, len(alphas), predicted[choice]) if settled else None
        return choice, probe

    def plan(self, batches: list[Batch]) -> StepPlan | None:
        alphas = [seq.acceptance.value for batch in batches for seq in batch.seqs]
        if not alphas:
            return None
        choice, probe = self.choose(alphas)
        plan = self.plan_choice(batches, choice)
        plan.probe = probe
        return plan

    def threads(self, plan: StepPlan, prefill: bool = False) -> int | None:
        return self.costs.table.step_threads(len(plan.verify), plan.overlap is not None, prefill)

    def observe(self, record) -> None:
        costs = self.costs
        overlapped = record.draft_slot is not None
        costs.observe_verify(record.verify_size, record.verified_drafts, overlapped,
                             record.verify_span[1] - record.verify_span[0])
        for rows, steps, seconds, alongside in record.draft_runs:
            costs.observe_draft(rows, steps, alongside, seconds)
        self.steps_since_draft = 0 if record.draft_runs else self.steps_since_draft + 1
        costs.observe_overhead(record.verify_size, record.commit_seconds)
        # A backlog refeed is a one-off of the switch or the arrival, not this mode's steady cost.
        seconds = max(record.seconds - record.catch_up_seconds, record.verify_span[1] - record.verify_span[0])
        if self._planned is not None and seconds > 0:
            choice, rows, predicted = self._planned
            key = (choice.mode, costs.bucket(rows))
            ratio = record.num_tokens / seconds / predicted
            old = self.realised_ratio.get(key)
            self.realised_ratio[key] = ratio if old is None else old + costs.weight * (ratio - old)
            self._planned = None
