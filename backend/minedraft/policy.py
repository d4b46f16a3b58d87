"""Decoding policies over the one step loop: each step verifies one batch, and may draft
another batch at the same time. AR, SD and MineDraft's PSD differ only in these choices."""
from dataclasses import dataclass

from .scheduler import Batch


@dataclass
class StepPlan:
    verify: Batch
    num_draft_tokens: int  # the server's cap for this step; 0: target only
    overlap: Batch | None  # drafted while `verify` is verified


class Policy:
    """`num_batches` 1 and k 0 is AR; 1 and k > 0 is SD; 2 with overlap is PSD."""

    def __init__(self, name: str, num_draft_tokens: int, num_batches: int):
        self.name = name
        self.num_draft_tokens = num_draft_tokens
        self.num_batches = num_batches
        self._last_verified = -1

    def plan(self, batches: list[Batch]) -> StepPlan | None:
        live = [b for b in batches if b.seqs]
        if not live:
            return None
        # Alternate: prefer a batch whose drafts are ready, otherwise the one not verified last.
        verify = next((b for b in live if b.is_drafted),
                      next((b for b in live if b.slot != self._last_verified), live[0]))
        self._last_verified = verify.slot
        # PSD: draft the other batch meanwhile. With one live batch it falls back to sequential.
        other = next((b for b in live if b is not verify and not b.is_drafted), None)
        overlap = other if self.num_batches > 1 and self.num_draft_tokens > 0 else None
        return StepPlan(verify, self.num_draft_tokens, overlap)


def make_policy(mode: str, num_draft_tokens: int) -> Policy:
    if mode == "ar":
        return Policy("ar", 0, 1)
    if mode == "sd":
        return Policy("sd", num_draft_tokens, 1)
    return Policy("psd", num_draft_tokens, 2)
