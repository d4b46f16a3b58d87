"""Mode `auto`: FlexDraft's batch-size switch, the simple baseline beside flex.

The number of running requests alone picks the step: SD while it is small, PSD above a first
threshold, AR above a second (or any order the costs give). The rule is read off the start-up
calibration's costs with the cost model, at the running requests' mean acceptance rounded to
ACCEPTANCE_STEP and their prompt tokens per output token rounded to a power of sqrt(2) (so it is
re-read rarely): speculation pays the draft's prefill of every newcomer, which matters more the
more requests finish per second. No online cost corrections, no per-row acceptance, no
hysteresis. While the rule says AR at every load, one SD step every PROBE_INTERVAL steps keeps the
acceptance estimates alive (without it such a rule would never see a draft again), unless the
probe's catch-up would cost more than PROBE_CATCH_UP_SHARE of the AR steps it comes after: a
probe makes the draft read what it lacks of every row, the whole context of a row that has never
drafted (a chat turn of a long history: seconds of draft prefill for one draft token). A rule that
says AR only under load needs no probe: it drafts again, and re-reads acceptance, once the load
falls; probing there costs a refeed of every row's context to the draft (docs/flex.md).
"""
import math

from minedraft.policy.cost_model import Choice, StepCosts, rank
from minedraft.policy.fixed import Policy
from minedraft.scheduler import Batch
from minedraft.step_plan import StepPlan

ACCEPTANCE_STEP = 0.05
PROBE_INTERVAL = 8
PROBE_CATCH_UP_SHARE = 0.25
# What the rule's model still leaves out costs speculation only: the draft's catch-up after AR
# steps, and acceptance that falls along a draft where the model takes one rate. How the margin
# was chosen: docs/flex.md.
SPECULATION_MARGIN = 1.1


def pick(ranking: dict[Choice, float]) -> Choice:
    """The highest expected goodput, but AR unless a speculative step beats it by the margin."""
    best = max(ranking, key=ranking.get)
    ar = Choice("ar", 0)
    return best if best == ar or ranking[best] >= SPECULATION_MARGIN * ranking[ar] else ar


class AutoPolicy(Policy):
    def __init__(self, max_draft_tokens: int, costs: StepCosts, batch_capacity: int, max_running: int,
                 overlaps: bool = True):
        super().__init__(Choice("sd", max_draft_tokens))
        self.costs = costs
        # Without a drafter beside the target (an inline drafter on CPU drafts in the step thread),
        # a PSD step is an SD step in two halves: the rule chooses between AR and SD only.
        self.overlaps = overlaps
        self.batch_capacity = batch_capacity
        self.max_running = max_running
        self.rule: list[Choice] = []  # [running requests - 1] -> the step to run
        self.never_drafts = False  # the rule says AR at every load: then it probes
        self.rule_key: tuple[float, float] | None = None  # (acceptance, prompt per output) it was read at
        self.steps_since_draft = 0

    @property
    def splits_batches(self) -> bool:
        return self.choice.mode == "psd"

    def rule_for(self, acceptance: float, prompt_per_output: float = 0.0) -> list[Choice]:
        """The best choice for 1..max_running requests that all accept drafts at this rate and
        bring this many prompt tokens per token they generate."""
        return [pick(rank([acceptance] * rows, self.costs, self.max_draft_tokens, self.batch_capacity, self.overlaps,
                          prompt_per_output))
                for rows in range(1, self.max_running + 1)]

    def thresholds(self) -> list[tuple[int, Choice]]:
        """Where the rule changes: (from this many running requests, the choice)."""
        return [(rows, c) for rows, c in enumerate(self.rule, 1) if rows == 1 or c != self.rule[rows - 2]]

    def plan(self, batches: list[Batch], drafted: set[int]) -> StepPlan | None:
        seqs = [seq for batch in batches for seq in batch.seqs]
        if not seqs:
            return None
        alphas = [seq.acceptance.value for seq in seqs]
        acceptance = round(sum(alphas) / len(alphas) / ACCEPTANCE_STEP) * ACCEPTANCE_STEP
        prompt_per_output = sum(s.num_prompt_tokens for s in seqs) / sum(s.params.max_tokens for s in seqs)
        key = (acceptance, 2 ** (round(2 * math.log2(prompt_per_output)) / 2) if prompt_per_output > 0 else 0.0)
        if key != self.rule_key:
            self.rule, self.rule_key = self.rule_for(*key), key
            self.never_drafts = all(choice.mode == "ar" for choice in self.rule)
        self.choice = self.rule[min(len(alphas), self.max_running) - 1]
        probe = self.never_drafts and self.steps_since_draft >= PROBE_INTERVAL and self._probe_is_cheap(seqs)
        return self.plan_choice(batches, drafted, Choice("sd", 1) if probe else self.choice, probe)

    def _probe_is_cheap(self, seqs) -> bool:
        """Whether the draft's catch-up in a probe (a row that never drafted brings every token it
        has; one that did, the tokens since the last drafting) stays within PROBE_CATCH_UP_SHARE of
        the time the AR steps since the last one took."""
        backlog = sum(len(s.token_ids) if s.num_drafted_tokens == 0 else self.steps_since_draft for s in seqs)
        between_probes = self.steps_since_draft * self.costs.verify_seconds(len(seqs), 0)
        return backlog * self.costs.draft_prefill_per_token <= PROBE_CATCH_UP_SHARE * between_probes

    def observe(self, record) -> None:
        self.steps_since_draft = 0 if record.draft_runs else self.steps_since_draft + 1
