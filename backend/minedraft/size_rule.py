"""Mode `auto`: FlexDraft's batch-size switch, the simple baseline beside flex.

The number of running requests alone picks the step: SD while it is small, PSD above a first
threshold, AR above a second (or any order the costs give). The rule is read off the start-up
calibration's costs with the cost model, at the running requests' mean acceptance rounded to
ACCEPTANCE_STEP (so it is re-read rarely); no online cost corrections, no per-row acceptance, no
hysteresis. While the rule says AR at every load, one SD step every PROBE_INTERVAL steps keeps the
acceptance estimates alive (without it such a rule would never see a draft again). A rule that says
AR only under load needs no probe: it drafts again, and re-reads acceptance, once the load falls.
Probing there cost more than it told: an AR step leaves the draft's cache behind, so a probe at 8
running requests on the Qwen pair refed their whole contexts to the draft (~1 s a probe).
"""
from .cost_model import Choice, StepCosts, rank
from .policy import Policy, StepPlan
from .scheduler import Batch

ACCEPTANCE_STEP = 0.05
PROBE_INTERVAL = 8
# What the rule's model leaves out costs speculation only: the draft's prefill of every newcomer,
# its catch-up after AR steps, and acceptance that falls along a draft where the model takes one
# rate (measured per row at short drafts, it overstates long ones). On the Qwen pair through the
# server a margin of 1.1 let auto run SD at 8 requests, 19.1 tok/s against AR's 30.6; the cost
# model's error on served SD steps was 34 % (docs/benchmarks.md, the simulator's check).
SPECULATION_MARGIN = 1.35


def pick(ranking: dict[Choice, float]) -> Choice:
    """The highest expected goodput, but AR unless a speculative step beats it by the margin."""
    best = max(ranking, key=ranking.get)
    ar = Choice("ar", 0)
    return best if best == ar or ranking[best] >= SPECULATION_MARGIN * ranking[ar] else ar


class BatchSizeRule(Policy):
    def __init__(self, max_draft_tokens: int, costs: StepCosts, batch_capacity: int, max_running: int,
                 overlaps: bool = True):
        super().__init__(Choice("sd", max_draft_tokens))
        self.name = "auto"
        self.costs = costs
        # Without a drafter beside the target (an inline drafter on CPU drafts in the step thread),
        # a PSD step is an SD step in two halves: the rule chooses between AR and SD only.
        self.overlaps = overlaps
        self.batch_capacity = batch_capacity
        self.max_running = max_running
        self.rule: list[Choice] = []  # [running requests - 1] -> the step to run
        self.never_drafts = False  # the rule says AR at every load: then it probes
        self.rule_acceptance: float | None = None
        self.steps_since_draft = 0

    @property
    def splits_batches(self) -> bool:
        return self.choice.mode == "psd"

    def rule_for(self, acceptance: float) -> list[Choice]:
        """The best choice for 1..max_running requests that all accept drafts at this rate."""
        rule = []
        for rows in range(1, self.max_running + 1):
            rule.append(pick(rank([acceptance] * rows, self.costs, self.max_draft_tokens, self.batch_capacity,
                                     self.overlaps)))
        return rule

    def thresholds(self) -> list[tuple[int, Choice]]:
        """Where the rule changes: (from this many running requests, the choice)."""
        return [(rows, c) for rows, c in enumerate(self.rule, 1) if rows == 1 or c != self.rule[rows - 2]]

    def plan(self, batches: list[Batch]) -> StepPlan | None:
        alphas = [seq.acceptance.value for batch in batches for seq in batch.seqs]
        if not alphas:
            return None
        acceptance = round(sum(alphas) / len(alphas) / ACCEPTANCE_STEP) * ACCEPTANCE_STEP
        if acceptance != self.rule_acceptance:
            self.rule, self.rule_acceptance = self.rule_for(acceptance), acceptance
            self.never_drafts = all(choice.mode == "ar" for choice in self.rule)
        self.choice = self.rule[min(len(alphas), self.max_running) - 1]
        probe = self.never_drafts and self.steps_since_draft >= PROBE_INTERVAL
        plan = self.plan_choice(batches, Choice("sd", 1) if probe else self.choice)
        plan.probe = probe
        return plan

    def observe(self, record) -> None:
        self.steps_since_draft = 0 if record.draft_runs else self.steps_since_draft + 1
