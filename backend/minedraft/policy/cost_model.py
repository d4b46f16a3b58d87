"""The cost model shared by the flex policy and `minedraft simulate`: what one step of AR,
SD(k) or PSD(k) costs and yields, from measured step times and acceptance rates.

Pure Python (no torch), so operators can plan deployments with it anywhere.

Step times come as a table over batch sizes (interpolated linearly in between):
- verify[b][k]: one target forward over b rows, each feeding its pending token and k drafts,
  including the acceptance rule;
- draft[b]: one draft-model step (one token for each of b rows);
- overhead_per_row: the engine's own per-row work in a step (commit, detokenise, stream);
- prefill_per_token: target prefill time per prompt token (paid once per request);
- draft_prefill_per_token: the draft's, paid once per request by speculative modes only.
"""
import json
from dataclasses import asdict, dataclass
from pathlib import Path

STEP_MODES = ("ar", "sd", "psd")  # what one step can do
# Keys of costs calibrated with `target_threads: per_step` (removed: it never beat a pinned target),
# such as the archived benchmark runs' costs.json: read without them.
RETIRED_KEYS = ("verify_overlapped", "threads_alone", "threads_overlapped", "threads_prefill")


@dataclass(frozen=True)
class Choice:
    mode: str  # "ar", "sd" or "psd"
    k: int  # draft tokens per row; 0 for ar

    def __str__(self) -> str:
        return self.mode if self.mode == "ar" else f"{self.mode}(k={self.k})"


@dataclass
class StepCosts:
    batch_sizes: list[int]  # ascending
    verify: list[list[float]]  # seconds, [batch size index][k], k = 0..max_k
    draft: list[float]  # seconds per draft step, [batch size index]
    overhead_per_row: float = 0.0
    prefill_per_token: float = 0.0
    draft_prefill_per_token: float = 0.0
    # A PSD step's drafting where the drafter runs beside verification (its worker process on a
    # CPU). None: the same as a step alone.
    draft_overlapped: list[float] | None = None

    @property
    def max_k(self) -> int:
        return len(self.verify[0]) - 1

    # `overlapped`: the step runs beside the other side's work (PSD). The table has one verification
    # figure for both; flex's online estimates add the contention for memory bandwidth.
    def verify_seconds(self, batch_size: float, k: int, overlapped: bool = False) -> float:
        return self._interpolate([row[min(k, self.max_k)] for row in self.verify], batch_size)

    def draft_seconds(self, batch_size: float, k: int, overlapped: bool = False) -> float:
        """k draft steps; the first also feeds the newly verified tokens, which costs alike."""
        table = self.draft_overlapped if overlapped and self.draft_overlapped else self.draft
        return k * self._interpolate(table, batch_size)

    def bucket_index(self, batch_size: float) -> int:
        """The calibrated batch size that a batch of this size is measured against (the last beyond)."""
        return next((i for i, b in enumerate(self.batch_sizes) if batch_size <= b), len(self.batch_sizes) - 1)

    def _interpolate(self, values: list[float], batch_size: float) -> float:
        sizes = self.batch_sizes
        if batch_size <= sizes[0]:
            return values[0] * max(batch_size, 1) / sizes[0] if sizes[0] > 1 else values[0]
        for i in range(1, len(sizes)):
            if batch_size <= sizes[i]:
                weight = (batch_size - sizes[i - 1]) / (sizes[i] - sizes[i - 1])
                return values[i - 1] + weight * (values[i] - values[i - 1])
        # Beyond the table: extend the last segment's slope (work grows with rows; a noisy
        # table's falling last segment must not make large batches cheaper).
        if len(sizes) == 1:
            return values[0] * batch_size / sizes[0]
        slope = max(0.0, (values[-1] - values[-2]) / (sizes[-1] - sizes[-2]))
        return values[-1] + slope * (batch_size - sizes[-1])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "StepCosts":
        data = json.loads(text)
        costs = cls(**{key: value for key, value in data.items() if key not in RETIRED_KEYS})
        per_size = [t for t in (costs.verify, costs.draft, costs.draft_overlapped) if t is not None]
        if costs.batch_sizes != sorted(costs.batch_sizes) or any(len(t) != len(costs.batch_sizes) for t in per_size) \
                or len({len(row) for row in costs.verify}) != 1:
            raise ValueError("step costs: batch_sizes must ascend, verify/draft need one entry per batch size, "
                             "and every verify row the same k = 0..max_k")
        return costs

    @classmethod
    def load(cls, path: str | Path) -> "StepCosts":
        return cls.from_json(Path(path).read_text())


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one verification yields for a row drafting k tokens with per-token acceptance alpha:
    E(k) = (1 - alpha^(k+1)) / (1 - alpha); the target always adds one token of its own."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


@dataclass(frozen=True)
class Estimate:
    tokens_per_step: float  # tokens produced per verification of one batch
    step_seconds: float

    @property
    def goodput(self) -> float:
        return self.tokens_per_step / self.step_seconds if self.step_seconds > 0 else 0.0


def estimate(choice: Choice, expected_sum: float, num_rows: int, costs, batch_capacity: int | None = None,
             prompt_per_output: float = 0.0) -> Estimate:
    """One step of `choice` over num_rows running requests whose E(k) sum to expected_sum.

    `costs` is anything with verify_seconds, draft_seconds, overhead_per_row and
    draft_prefill_per_token (StepCosts, or the flex policy's online tracker). AR and SD run one
    batch of up to batch_capacity rows per step (more rows take turns in equal batches). PSD splits
    the rows into two batches and verifies one of them per step while the other is drafted: a step
    costs max(verify, draft). `prompt_per_output`, the running requests' prompt tokens per token
    they generate: each token a speculative step yields brings the draft that many prompt tokens
    of newcomers to prefill (AR pays no draft prefill; the target's prefill is the same in every mode)."""
    if choice.mode == "psd":
        half = num_rows / 2
        tokens = expected_sum / 2
        verify = costs.verify_seconds(half, choice.k, overlapped=True) + costs.overhead_per_row * half
        draft = costs.draft_seconds(half, choice.k, overlapped=True) + _draft_prefill(tokens, prompt_per_output, costs)
        return Estimate(tokens, max(verify, draft))
    turns = -(-num_rows // batch_capacity) if batch_capacity else 1
    b, tokens = num_rows / turns, expected_sum / turns
    if choice.mode == "ar":
        return Estimate(b, costs.verify_seconds(b, 0) + costs.overhead_per_row * b)
    return Estimate(tokens, costs.verify_seconds(b, choice.k) + costs.draft_seconds(b, choice.k)
                    + costs.overhead_per_row * b + _draft_prefill(tokens, prompt_per_output, costs))


def _draft_prefill(tokens: float, prompt_per_output: float, costs) -> float:
    return tokens * prompt_per_output * costs.draft_prefill_per_token


def candidates(max_k: int, num_rows: int, overlaps: bool = True) -> list[Choice]:
    """AR, SD(k) and, when there are two requests to split and a drafter that runs beside the
    target (`overlaps`), PSD(k) for k = 1..max_k."""
    choices = [Choice("ar", 0)] + [Choice("sd", k) for k in range(1, max_k + 1)]
    if num_rows >= 2 and overlaps:
        choices += [Choice("psd", k) for k in range(1, max_k + 1)]
    return choices


def rank(alphas: list[float], costs, max_k: int, batch_capacity: int | None = None,
         overlaps: bool = True, prompt_per_output: float = 0.0) -> dict[Choice, float]:
    """Expected goodput (tokens/s) of every candidate for rows with these acceptance rates."""
    sums = [sum(expected_tokens(a, k) for a in alphas) for k in range(max_k + 1)]
    return {c: estimate(c, sums[c.k], len(alphas), costs, batch_capacity, prompt_per_output).goodput
            for c in candidates(max_k, len(alphas), overlaps)}
