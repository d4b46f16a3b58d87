"""The fixed modes over the one step loop: each step verifies one batch, and may draft another
batch at the same time. AR, SD and MineDraft's PSD differ only in these choices; `auto` and
`flex` make the choice anew every step."""
from minedraft.policy.cost_model import Choice
from minedraft.scheduler import Batch
from minedraft.step_plan import StepPlan


class Policy:
    """A fixed choice: AR (k = 0), SD(k), or PSD(k) over two batches."""

    def __init__(self, choice: Choice):
        self.choice = choice
        self.max_draft_tokens = choice.k
        self._last_verified = -1

    @property
    def splits_batches(self) -> bool:
        """Whether newcomers should balance the two batches (PSD) or fill the first one."""
        return self.choice.mode == "psd"

    def plan(self, batches: list[Batch], drafted: set[int]) -> StepPlan | None:
        """`drafted`: the slots of the batches whose drafts wait for verification."""
        return self.plan_choice(batches, drafted, self.choice)

    def observe(self, record) -> None:
        """A fixed policy learns nothing from the step just run."""

    def plan_choice(self, batches: list[Batch], drafted: set[int], choice: Choice, probe: bool = False) -> StepPlan | None:
        live = [b for b in batches if b.seqs]
        if not live:
            return None
        # Alternate: prefer a batch whose drafts are ready, otherwise the one not verified last.
        verify = next((b for b in live if b.slot in drafted),
                      next((b for b in live if b.slot != self._last_verified), live[0]))
        self._last_verified = verify.slot
        # PSD: draft the other batch meanwhile. With one live batch it falls back to sequential.
        other = next((b for b in live if b is not verify and b.slot not in drafted), None)
        overlap = other if choice.mode == "psd" and choice.k > 0 else None
        return StepPlan(choice.mode, verify, choice.k, overlap, probe)
