"""Drafting: the one owner of the drafters and of every piece of draft state.

The engine asks for drafts for a step's plan, reads them at verification, and books each
verification's outcome; this module does the rest: which drafter runs, what each row feeds it,
handing drafts over, failures and restarts. The draft fields of `Sequence` (draft_ids,
draft_probs, draft_cached, draft_extent) and `Batch` (is_drafted, drafter) are written here only;
their consistency is what keeps output lossless. (`Batch.remove` queues its row moves in
`draft_moves`, which only this module consumes.)
"""
import logging

import numpy as np

from .drafter import DraftRow, DraftWork, DrafterError
from .policy import StepPlan
from .scheduler import Batch
from .sequence import Sequence

log = logging.getLogger("minedraft")


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
        self._fed_to: dict[int, list[int]] = {}  # per batch slot being drafted: each row's draft cache length after

    # -- what the engine calls ------------------------------------------------------------------------
    @property
    def reads_features(self) -> bool:
        """Whether the drafter is a feature draft: then the engine keeps the target's states."""
        return self.drafter is not None and self.drafter.reads_features

    def draft_for(self, plan: StepPlan):
        """Draft the batch about to be verified if it has no drafts yet (sequential), then start
        drafting the overlap batch, which runs while the target verifies. Returns the sequential
        drafting's span, if any; clears `plan.overlap` if its drafting could not start."""
        self.runs, self.catch_up_seconds = [], 0.0
        if self.drafter is None or plan.num_draft_tokens == 0:
            plan.overlap = None
            return None
        span = None
        if not plan.verify.is_drafted:
            # A probe drafts where the batch's rows already are: moving them costs a full refeed.
            drafter = plan.verify.drafter if plan.probe and plan.verify.drafter else self.sequential_drafter
            if self._start(plan.verify, plan.num_draft_tokens, drafter):
                span = self._collect(plan.verify, drafter, overlapped=False)
        if plan.overlap is not None and not self._start(plan.overlap, plan.num_draft_tokens, self.drafter):
            plan.overlap = None
        return span

    def collect_overlap(self, plan: StepPlan):
        """Take the drafts started beside verification; their span, or None."""
        if plan.overlap is None:
            return None
        return self._collect(plan.overlap, self.drafter, overlapped=True)

    def book(self, seq: Sequence, num_accepted: int) -> None:
        """After a verification: the draft cache keeps the accepted drafts it holds; drafts are spent."""
        seq.draft_cached += min(num_accepted, seq.draft_extent)
        seq.draft_ids, seq.draft_probs, seq.draft_extent = [], None, 0

    def verified(self, batch: Batch) -> None:
        batch.is_drafted = False

    def row_moved(self, seq: Sequence) -> None:
        """The request moved to the other batch, whose draft cache has no row for it yet."""
        seq.draft_cached = seq.draft_extent = 0

    def forget_all(self) -> None:
        """No drafts anywhere, every draft cache row to be refed: after a drafter failure, or a
        step that failed halfway with drafts started but never collected."""
        for batch in self.batches:
            batch.is_drafted = False
            batch.draft_moves.clear()
            batch.drafter = None
            for seq in batch.seqs:
                seq.draft_ids, seq.draft_probs, seq.draft_cached, seq.draft_extent = [], None, 0, 0

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
        if batch.drafter is not drafter:
            # The other drafter's cache holds nothing of this batch: every row starts over there.
            for seq in batch.seqs:
                seq.draft_cached = seq.draft_extent = 0
            batch.draft_moves.clear()
            batch.drafter = drafter
        inputs = [self._inputs(seq, drafter) for seq in batch.seqs]
        rows = [DraftRow(cached_len=seq.draft_cached, feed=feed, temperature=seq.params.temperature,
                         top_k=seq.params.top_k, top_p=seq.params.top_p,
                         num_eos_blocked=max(0, seq.params.min_tokens - seq.num_generated),
                         uniforms=seq.uniforms(cap).tolist(), max_tokens=cap, features=features)
                for seq, cap, (feed, features) in zip(batch.seqs, caps, inputs)]
        work = DraftWork(batch.slot, list(batch.draft_moves), rows, num_tokens, self.confidence_threshold)
        batch.draft_moves.clear()
        # A drafter without a cache (prompt lookup) is fed whole contexts and keeps nothing of them.
        self._fed_to[batch.slot] = [seq.draft_cached + len(feed) if drafter.keeps_cache else 0
                                    for seq, (feed, _) in zip(batch.seqs, inputs)]
        return work

    @staticmethod
    def _has_input(seq: Sequence, drafter) -> bool:
        """A feature draft reads with each token the target's state at the token before it: a
        newcomer has none until the target has read its prompt."""
        return not drafter.reads_features or seq.target_features.length >= len(seq.token_ids) - 1

    def _inputs(self, seq: Sequence, drafter) -> tuple[list[int], np.ndarray | None]:
        """What a row feeds its drafter: the verified tokens its draft cache lacks, and for a
        feature draft the target's states at the positions before them (a row without those feeds
        nothing)."""
        feed = seq.token_ids[seq.draft_cached:]
        if not drafter.reads_features:
            return feed, None
        if not self._has_input(seq, drafter):
            return [], None
        states = seq.target_features.span(max(0, seq.draft_cached - 1), len(seq.token_ids) - 1)
        return feed, states.float().cpu().numpy()

    def _collect(self, batch: Batch, drafter, overlapped: bool):
        try:
            drafts = drafter.finish()
        except DrafterError as exc:
            self._on_failure(exc, drafter)
            return None
        steps = drafts.ids.size(1)
        fed = self._fed_to.pop(batch.slot)
        for row, (seq, length, fed_to) in enumerate(zip(batch.seqs, drafts.lengths, fed)):
            seq.draft_ids = drafts.ids[row, :length].tolist()
            # A greedy row's q is one-hot at its drafts (rebuilt at verification); a sampled row's is
            # copied out of the drafter's buffer, which the drafter reuses for the batch's next drafts.
            # A drafter that proposes without probabilities (prompt lookup) has a one-hot q too.
            sampled = seq.params.temperature > 0 and drafts.probs is not None
            seq.draft_probs = drafts.probs[row, :length].clone() if sampled else None
            seq.draft_cached = fed_to
            seq.draft_extent = drafts.cached
        batch.is_drafted = True
        started, ended = drafter.last_span
        self.runs.append((len(batch), steps, ended - started - drafts.catch_up_seconds, overlapped))
        self.catch_up_seconds += drafts.catch_up_seconds
        return drafter.last_span

    def _on_failure(self, exc: Exception, drafter) -> None:
        """Lossless fallback: forget all drafts (the target decodes alone meanwhile) and restart."""
        self.num_failures += 1
        log.error("drafter failure %d: %s; restarting it, target-only steps meanwhile", self.num_failures, exc)
        self.forget_all()
        try:
            drafter.restart()
        except Exception as restart_exc:  # e.g. no process could be started: retried at the next step
            log.error("drafter restart failed: %s", restart_exc)
