"""What every drafter takes and returns: the engine's drafting (coordinator.py) hands a drafter a
`DraftWork` (one batch's rows) with `start`, and takes its `Drafts` with `finish`.

The drafters, each in a file of its own, share that interface (`start`, `finish`, `ready`,
`restart`, `close`, `reads_features`, `keeps_cache`, `overlaps`):
- `InlineDrafter` (inline.py): a draft model in the engine's process.
- `ProcessDrafter` (process.py, worker.py): a draft model in a worker process on its own cores
  (MineDraft's workers are processes too); ids and probabilities come back through shared memory.
- `NgramDrafter` (ngram.py): prompt lookup, no model.
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
    moves: list[tuple[int, int]]  # (src row, dst row) moves applied to the cache first
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


@dataclass(frozen=True)
class StepDrafts:
    """One batch's drafts as its verification reads them, a row per request in the batch's order."""
    ids: torch.Tensor  # [b, steps] long, 0 past each row's length
    lengths: torch.Tensor  # [b] long: drafts proposed per row
    probs: torch.Tensor | None  # [b, steps, V] q of the rows in has_probs; None when no row has one
    has_probs: torch.Tensor  # [b] bool: rows whose q is in probs; the others' q is one-hot at their ids

    @classmethod
    def empty(cls, num_rows: int) -> "StepDrafts":
        return cls(torch.zeros(num_rows, 0, dtype=torch.long), torch.zeros(num_rows, dtype=torch.long), None,
                   torch.zeros(num_rows, dtype=torch.bool))

    def _rows(self, index: list[int]) -> "StepDrafts":
        return StepDrafts(self.ids[index], self.lengths[index], None if self.probs is None else self.probs[index],
                          self.has_probs[index])

    def with_row_moved(self, src: int, dst: int) -> "StepDrafts":
        """Row `src` (the last) takes the place of row `dst`, which left."""
        index = list(range(len(self.lengths)))
        index[dst] = src
        return self._rows(index[:-1])

    def with_rows_added(self, num_rows: int) -> "StepDrafts":
        """Rows without drafts appended up to `num_rows`."""
        num_added = num_rows - len(self.lengths)
        if num_added == 0:
            return self
        probs = self.probs
        if probs is not None:
            probs = torch.cat([probs, probs.new_zeros(num_added, *probs.shape[1:])])
        return StepDrafts(torch.cat([self.ids, self.ids.new_zeros(num_added, self.ids.size(1))]),
                          torch.cat([self.lengths, self.lengths.new_zeros(num_added)]), probs,
                          torch.cat([self.has_probs, self.has_probs.new_zeros(num_added)]))

    def without_last_row(self) -> "StepDrafts":
        return self._rows(list(range(len(self.lengths) - 1)))
