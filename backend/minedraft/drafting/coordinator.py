"""Drafting: the one owner of the drafters and of every piece of draft state.

The engine asks for drafts for a step's plan, takes them as one `StepDrafts` at verification, and
books each verification's outcome; this module does the rest: which drafter runs, what each row
feeds it, handing drafts over, failures and restarts. Nothing outside it reads or writes draft
state: per batch, which drafter's cache holds its rows, the row moves that cache has yet to apply
and the drafts waiting for verification; per request, how much of it the draft cache holds. Their
consistency is what keeps output lossless.
"""
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from minedraft.drafting.drafter import (
    DrafterError,
    DraftRow,
    Drafts,
    DraftWork,
    StepDrafts,
)
from minedraft.scheduler import Batch, RowMove
from minedraft.sequence import Sequence
from minedraft.step_plan import StepPlan

log = logging.getLogger("minedraft")


@dataclass
class RowDraftState:
    """How much of one request its drafter's cache holds."""
    num_cached_tokens: int = 0  # the prefix of the request's token_ids in the draft cache
    num_cached_drafts: int = 0  # drafted tokens the draft cache holds beyond token_ids (until verified)


@dataclass
class BatchDraftState:
    drafter: object = None  # the drafter whose cache holds this batch's rows (flex has two)
    pending_moves: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) row moves for that cache
    drafts: StepDrafts | None = None  # every row's drafts, waiting for verification
    fed_to: list[int] | None = None  # while drafting: each row's draft cache length after it


@dataclass(frozen=True)
class DraftingStarted:
    span: tuple[float, float] | None  # the sequential drafting's, if one ran
    overlap: Batch | None  # the batch whose drafting runs beside verification, if it started


class Drafting:
    def __init__(self, drafter, sequential_drafter, batches: list[Batch], max_model_len: int,
                 confidence_threshold: float):
        """`drafter` drafts beside verification (PSD); `sequential_drafter` drafts the batch about
        to be verified (SD). They are one object except under flex on a CPU. Either may be None (AR)."""
        self.drafter = drafter
        self.sequential_drafter = sequential_drafter
        self.batches = batches
        self.max_model_len = max_model_len
        self.confidence_threshold = confidence_threshold
        self.num_failures = 0
        # This step's draftings, for the step record: (rows, steps, seconds less catch-up, overlapped).
        self.runs: list[tuple[int, int, float, bool]] = []
        self.catch_up_seconds = 0.0
        self._batch_states = {batch.slot: BatchDraftState() for batch in batches}
        self._row_states: dict[Sequence, RowDraftState] = {}

    # -- what the engine calls ------------------------------------------------------------------------
    @property
    def reads_features(self) -> bool:
        """Whether the drafter is a feature draft: then the engine keeps the target's states."""
        return self.drafter is not None and self.drafter.reads_features

    def drafted_slots(self) -> set[int]:
        """The batches whose drafts wait for verification."""
        return {slot for slot, state in self._batch_states.items() if state.drafts is not None}

    def row(self, seq: Sequence) -> RowDraftState:
        return self._row_states.setdefault(seq, RowDraftState())

    def draft_for(self, plan: StepPlan) -> DraftingStarted:
        """Draft the batch about to be verified if it has no drafts yet (sequential), then start
        drafting the overlap batch, which runs while the target verifies."""
        self.runs, self.catch_up_seconds = [], 0.0
        if self.drafter is None or plan.num_draft_tokens == 0:
            return DraftingStarted(None, None)
        span = None
        verify_state = self._batch_states[plan.verify.slot]
        if verify_state.drafts is None:
            # A probe drafts where the batch's rows already are: moving them costs a full refeed.
            drafter = verify_state.drafter if plan.probe and verify_state.drafter else self.sequential_drafter
            if self._start(plan.verify, plan.num_draft_tokens, drafter):
                span = self._collect(plan.verify, drafter, overlapped=False)
        overlap = plan.overlap
        if overlap is not None and not self._start(overlap, plan.num_draft_tokens, self.drafter):
            overlap = None
        return DraftingStarted(span, overlap)

    def collect_overlap(self, started: DraftingStarted) -> tuple[float, float] | None:
        """Take the drafts started beside verification; their span, or None."""
        if started.overlap is None:
            return None
        return self._collect(started.overlap, self.drafter, overlapped=True)

    def take(self, batch: Batch) -> StepDrafts:
        """The drafts this batch's verification reads (none for a row without drafts). They are
        spent: after it, only what the draft cache holds of them remains, until `book`."""
        state = self._batch_states[batch.slot]
        drafts, state.drafts = state.drafts, None
        # Newcomers admitted since the drafting sit after the drafted rows, without drafts.
        return drafts.with_rows_added(len(batch)) if drafts is not None else StepDrafts.empty(len(batch))

    def book(self, seq: Sequence, num_accepted: int) -> None:
        """After a verification: the draft cache keeps the accepted drafts it holds."""
        row = self.row(seq)
        row.num_cached_tokens += min(num_accepted, row.num_cached_drafts)
        row.num_cached_drafts = 0

    def row_left(self, batch: Batch, seq: Sequence, move: RowMove | None) -> None:
        """`seq` left `batch` (finished, cancelled or moved); `move` is the row that took its place."""
        self._row_states.pop(seq, None)
        state = self._batch_states[batch.slot]
        # The batch had one row more before `seq` left; rows admitted after the drafting have none.
        drafts = state.drafts.with_rows_added(len(batch) + 1) if state.drafts is not None else None
        if move is None:
            state.drafts = drafts.without_last_row() if drafts is not None else None
            return
        state.pending_moves.append((move.src, move.dst))
        state.drafts = drafts.with_row_moved(move.src, move.dst) if drafts is not None else None

    def forget_all(self) -> None:
        """No drafts anywhere, every draft cache row to be refed: after a drafter failure, or a
        step that failed halfway with drafts started but never collected."""
        self._batch_states = {batch.slot: BatchDraftState() for batch in self.batches}
        self._row_states.clear()

    def close(self) -> None:
        for drafter in {self.drafter, self.sequential_drafter} - {None}:
            drafter.close()
        self.drafter = self.sequential_drafter = None

    # -- inside ---------------------------------------------------------------------------------------
    def _start(self, batch: Batch, step_cap: int, drafter) -> bool:
        if not self._is_ready(drafter):
            return False
        work = self._work(batch, step_cap, drafter)
        if work is None:
            return False
        try:
            drafter.start(work)
        except DrafterError as exc:
            self._on_failure(exc, drafter)
            return False
        return True

    def _is_ready(self, drafter) -> bool:
        """A restarted worker loads in the background; meanwhile the target decodes alone."""
        try:
            return drafter.ready
        except DrafterError as exc:
            self._on_failure(exc, drafter)
            return False

    def _work(self, batch: Batch, step_cap: int, drafter) -> DraftWork | None:
        caps = [seq.draft_budget(self.max_model_len, step_cap) if self._has_input(seq, drafter) else 0
                for seq in batch.seqs]
        num_tokens = max(caps)
        if num_tokens == 0:
            return None
        state = self._batch_states[batch.slot]
        if state.drafter is not drafter:
            # The other drafter's cache holds nothing of this batch: every row starts over there.
            for seq in batch.seqs:
                self._row_states[seq] = RowDraftState()
            state.pending_moves.clear()
            state.drafter = drafter
        rows = [self.row(seq) for seq in batch.seqs]
        inputs = [self._inputs(seq, row, drafter) for seq, row in zip(batch.seqs, rows)]
        draft_rows = [DraftRow(cached_len=row.num_cached_tokens, feed=feed, temperature=seq.params.temperature,
                               top_k=seq.params.top_k, top_p=seq.params.top_p,
                               num_eos_blocked=max(0, seq.params.min_tokens - seq.num_generated),
                               uniforms=seq.uniforms(cap).tolist(), max_tokens=cap, features=features)
                      for seq, row, cap, (feed, features) in zip(batch.seqs, rows, caps, inputs)]
        work = DraftWork(batch_slot=batch.slot, moves=list(state.pending_moves), rows=draft_rows,
                         num_tokens=num_tokens, confidence_threshold=self.confidence_threshold)
        state.pending_moves.clear()
        # A drafter without a cache (prompt lookup) is fed whole contexts and keeps nothing of them.
        state.fed_to = [row.num_cached_tokens + len(feed) if drafter.keeps_cache else 0
                        for row, (feed, _) in zip(rows, inputs)]
        return work

    @staticmethod
    def _has_input(seq: Sequence, drafter) -> bool:
        """A feature draft reads with each token the target's state at the token before it: a
        newcomer has none until the target has read its prompt."""
        return not drafter.reads_features or seq.target_features.length >= len(seq.token_ids) - 1

    def _inputs(self, seq: Sequence, row: RowDraftState, drafter) -> tuple[list[int], np.ndarray | None]:
        """What a row feeds its drafter: the verified tokens its draft cache lacks, and for a
        feature draft the target's states at the positions before them (a row without those feeds
        nothing)."""
        feed = seq.token_ids[row.num_cached_tokens:]
        if not drafter.reads_features:
            return feed, None
        if not self._has_input(seq, drafter):
            return [], None
        states = seq.target_features.span(max(0, row.num_cached_tokens - 1), len(seq.token_ids) - 1)
        return feed, states.float().cpu().numpy()

    def _collect(self, batch: Batch, drafter, overlapped: bool):
        try:
            drafts = drafter.finish()
        except DrafterError as exc:
            self._on_failure(exc, drafter)
            return None
        state = self._batch_states[batch.slot]
        for seq, fed_to in zip(batch.seqs, state.fed_to):
            row = self.row(seq)
            row.num_cached_tokens, row.num_cached_drafts = fed_to, drafts.cached
        state.fed_to = None
        state.drafts = self._step_drafts(batch, drafts)
        started, ended = drafter.last_span
        self.runs.append((len(batch), drafts.ids.size(1), ended - started - drafts.catch_up_seconds, overlapped))
        self.catch_up_seconds += drafts.catch_up_seconds
        return drafter.last_span

    @staticmethod
    def _step_drafts(batch: Batch, drafts: Drafts) -> StepDrafts:
        """The drafter's reply, copied out of its buffers (which its next drafting of this batch
        reuses). A greedy row's q is one-hot at its drafts, as is every row's from a drafter that
        proposes without probabilities (prompt lookup): those rows carry no probabilities."""
        lengths = torch.tensor(drafts.lengths, dtype=torch.long)
        ids = drafts.ids.masked_fill(torch.arange(drafts.ids.size(1)) >= lengths[:, None], 0)
        sampled = torch.tensor([seq.params.temperature > 0 and drafts.probs is not None for seq in batch.seqs])
        probs = drafts.probs.clone() if bool(sampled.any()) else None
        return StepDrafts(ids=ids, lengths=lengths, probs=probs, has_probs=sampled)

    def _on_failure(self, exc: Exception, drafter) -> None:
        """Lossless fallback: forget all drafts (the target decodes alone meanwhile) and restart."""
        self.num_failures += 1
        log.error("drafter failure %d: %s; restarting it, target-only steps meanwhile", self.num_failures, exc)
        self.forget_all()
        try:
            drafter.restart()
        except Exception as restart_exc:  # e.g. no process could be started: retried at the next step
            log.error("drafter restart failed: %s", restart_exc)
