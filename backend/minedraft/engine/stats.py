"""What the engine records of its steps: one `StepRecord` a step (for metrics, for flex's cost
estimates and for the overlap test), the timer that makes it, and the speculation counters."""
import time
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class StepRecord:
    mode: str  # what the step did: "ar", "sd" or "psd"
    verify_size: int
    verify_span: tuple[float, float]
    verified_drafts: int  # the longest row's drafts in the verification (its forward's width - 1)
    draft_slot: int | None  # the batch drafted alongside the verification (PSD)
    draft_span: tuple[float, float] | None
    num_draft_tokens: int  # the step's cap on drafts per row
    prefill_seconds: float  # target time spent on newcomers' prompts this step
    commit_seconds: float  # booking, detokenising and output building for the verified rows
    # Every drafting this step: (rows, steps, seconds less catch-up, whether it ran beside verification).
    draft_runs: list[tuple[int, int, float, bool]]
    seconds: float  # the whole step less prefill: drafting, verification, waits, commit
    catch_up_seconds: float  # of which drafters spent refeeding backlogs (newcomers, moved rows, after AR)
    num_tokens: int  # tokens the step committed
    # Since the previous step ended, with work waiting all along (0 after an idle wait): what the
    # serving loop and the threads beside the engine (sending responses) cost this step.
    gap_seconds: float = 0.0


class StepTimer:
    """Times one step's phases on one clock."""

    def __init__(self, previous_end: float | None):
        self.started = time.monotonic()
        # With work waiting all along since the previous step (None after an idle wait).
        self.gap = self.started - previous_end if previous_end is not None else 0.0
        self.spans: dict[str, tuple[float, float]] = {}

    @contextmanager
    def phase(self, name: str):
        started = time.monotonic()
        try:
            yield
        finally:
            self.spans[name] = (started, time.monotonic())

    def seconds(self, name: str) -> float:
        started, ended = self.spans[name]
        return ended - started

    @property
    def ended(self) -> float:
        return self.spans["commit"][1]  # the last phase

    @property
    def seconds_less_prefill(self) -> float:
        return self.ended - self.started - self.seconds("prefill")


class SpecDecodeStats:
    """Speculation counters with vLLM's meaning (spec_decode_num_drafts, ..._num_draft_tokens,
    ..._num_accepted_tokens, ..._num_accepted_tokens_per_pos): a draft is one request's proposal in
    one verification; position i counts drafts whose first i + 1 tokens were all accepted.
    Mean acceptance length = 1 + accepted / drafts."""

    def __init__(self, max_draft_tokens: int):
        self.num_drafts = 0
        self.num_drafted_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_position = [0] * max_draft_tokens

    def observe(self, num_drafted: int, num_accepted: int) -> None:
        if num_drafted == 0:
            return
        self.num_drafts += 1
        self.num_drafted_tokens += num_drafted
        self.num_accepted_tokens += num_accepted
        for position in range(num_accepted):
            self.accepted_per_position[position] += 1
