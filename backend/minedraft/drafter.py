"""What every drafter takes and returns: the engine's drafting (drafting.py) hands a drafter a
`DraftWork` (one batch's rows) with `start`, and takes its `Drafts` with `finish`.

The drafters, each in a file of its own, share that interface (`start`, `finish`, `ready`,
`restart`, `close`, `reads_features`, `keeps_cache`, `overlaps`):
- `InlineDrafter` (inline_drafter.py): a draft model in the engine's process.
- `ProcessDrafter` (process_drafter.py): a draft model in a worker process on its own cores
  (MineDraft's workers are processes too); ids and probabilities come back through shared memory.
- `NgramDrafter` (ngram_drafter.py): prompt lookup, no model.
A draft model's drafting (draft_model.py) is one sampling loop over a proposer (proposers.py):
sequential, parallel (PARD) or feature (EAGLE).
"""
from dataclasses import dataclass

import numpy as np
import torch

NUM_BATCH_SLOTS = 2


class DrafterError(RuntimeError):
    """The drafter failed or died; the engine falls back to target-only steps and restarts it."""


@dataclass
class DraftRow:
    cached_len: int  # valid prefix of the draft cache for this row (rolls rejected drafts back)
    feed: list[int]  # verified tokens the draft cache lacks
    temperature: float
    top_k: int
    top_p: float
    num_eos_blocked: int  # leading draft positions where EOS is masked (min_tokens)
    uniforms: list[float]  # one per drafted position; drawn by the engine from the request's RNG
    max_tokens: int  # this row's draft length cap
    # A feature draft's input (EAGLE): with each fed token, the target's last hidden state at the
    # position before it, float32 (numpy: it crosses to a worker process by value); a row fed from
    # position 0 has no state before its first token (the draft reads zeros there), one fewer.
    features: np.ndarray | None = None


@dataclass
class DraftWork:
    batch_slot: int
    moves: list[tuple[int, int, int]]  # (src row, dst row, length) applied to the cache first
    rows: list[DraftRow]
    num_tokens: int  # the longest row cap: draft steps at most
    confidence_threshold: float = 0.0  # FlexDraft's cut: 0 drafts every row to its cap


@dataclass
class Drafts:
    ids: torch.Tensor  # [b, steps]
    probs: torch.Tensor | None  # [b, steps, V]; None when every row is greedy (its q is one-hot at its ids)
    lengths: list[int]  # tokens proposed per row (<= steps); the rest of the row is unused
    catch_up_seconds: float  # of the run, spent feeding rows' long backlogs (newcomers, after AR steps)
    cached: int  # how many leading drafts every row's draft cache holds: steps - 1, or 0 for a parallel draft
