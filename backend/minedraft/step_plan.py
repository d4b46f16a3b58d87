"""What one step does, decided by the policy before it runs and never changed afterwards."""
from dataclasses import dataclass

from minedraft.scheduler import Batch


@dataclass(frozen=True)
class StepPlan:
    mode: str  # "ar", "sd" or "psd": what this step does
    verify: Batch
    num_draft_tokens: int  # the step's cap on drafts per row; 0: target only
    overlap: Batch | None  # to be drafted while `verify` is verified (PSD)
    probe: bool = False  # a one-off SD step to measure acceptance (auto, while its rule says AR)
