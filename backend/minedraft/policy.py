"""Decoding policies over the one step loop: each step verifies one batch, and may draft
another batch at the same time. AR, SD and MineDraft's PSD differ only in these choices;
flex (flex.py) makes the choice anew every step."""
from dataclasses import dataclass

from .cost_model import Choice
from .scheduler import Batch


@dataclass
class StepPlan:
    mode: str  # "ar", "sd" or "psd": what this step does
    verify: Batch
    num_draft_tokens: int  # the server's cap for this step; 0: target only
    overlap: Batch | None  # drafted while `verify` is verified
    probe: bool = False  # a one-off SD step to measure acceptance (auto, while its rule says AR)


class Policy:
    """A fixed choice: AR (k = 0), SD(k), or PSD(k) over two batches."""

    def __init__(self, choice: Choice):
        self.name = choice.mode
        self.choice = choice
        self.max_draft_tokens = choice.k
        self._last_verified = -1

    @property
    def splits_batches(self) -> bool:
        """Whether newcomers should balance the two batches (PSD) or fill the first one."""
        return self.choice.mode == "psd"

    def plan(self, batches: list[Batch]) -> StepPlan | None:
        return self.plan_choice(batches, self.choice)

    def observe(self, record) -> None:
        """A fixed policy learns nothing from the step just run."""

    def plan_choice(self, batches: list[Batch], choice: Choice) -> StepPlan | None:
        live = [b for b in batches if b.seqs]
        if not live:
            return None
        # Alternate: prefer a batch whose drafts are ready, otherwise the one not verified last.
        verify = next((b for b in live if b.is_drafted),
                      next((b for b in live if b.slot != self._last_verified), live[0]))
        self._last_verified = verify.slot
        # PSD: draft the other batch meanwhile. With one live batch it falls back to sequential.
        other = next((b for b in live if b is not verify and not b.is_drafted), None)
        overlap = other if choice.mode == "psd" and choice.k > 0 else None
        return StepPlan(choice.mode, verify, choice.k, overlap)
