"""The engine: `step()` = admit -> plan -> draft/verify -> commit, for every policy.

Usable without Triton:

    engine = Engine(EngineConfig(mode="psd"))
    engine.submit("r1", "def add(a, b):", {"max_tokens": 32, "temperature": 0})
    while engine.has_work():
        for out in engine.step():
            print(out.text_delta, end="")
"""
import logging
import secrets
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import sampler
from .builder import build
from .config import EngineConfig
from .cost_model import STEP_MODES
from .placement import Placement
from .sampling_params import InvalidRequest, SamplingParams
from .scheduler import Batch
from .sequence import RequestOutput, Sequence

log = logging.getLogger("minedraft")

@dataclass
class StepRecord:
    """Timing of one step, kept for metrics, for flex's cost estimates and for the overlap test."""
    mode: str  # what the step did: "ar", "sd" or "psd"
    verify_slot: int
    verify_size: int
    verify_span: tuple[float, float]
    verified_drafts: int  # the longest row's drafts in the verification (its forward's width - 1)
    draft_slot: int | None  # the batch drafted alongside the verification (PSD)
    draft_span: tuple[float, float] | None
    num_draft_tokens: int  # the step's cap on drafts per row
    prefill_seconds: float  # target time spent on newcomers' prompts this step
    commit_seconds: float  # booking, detokenising and output building for the verified rows
    # Every drafting this step: (rows, steps, seconds less catch-up, whether it ran beside verification).
    draft_runs: list[tuple[int, int, float, bool]]
    seconds: float  # the whole step less prefill: drafting, verification, waits, commit
    catch_up_seconds: float  # of which drafters spent refeeding backlogs (newcomers, moved rows, after AR)
    num_tokens: int  # tokens the step committed
    # Since the previous step ended, with work waiting all along (0 after an idle wait): what the
    # serving loop and the threads beside the engine (sending responses) cost this step.
    gap_seconds: float = 0.0


class StepTimer:
    """Times one step's phases on one clock and makes its StepRecord."""

    def __init__(self, previous_end: float | None):
        self.started = time.monotonic()
        # With work waiting all along since the previous step (None after an idle wait).
        self.gap = self.started - previous_end if previous_end is not None else 0.0
        self.spans: dict[str, tuple[float, float]] = {}

    @contextmanager
    def phase(self, name: str):
        started = time.monotonic()
        try:
            yield
        finally:
            self.spans[name] = (started, time.monotonic())

    def seconds(self, name: str) -> float:
        started, ended = self.spans[name]
        return ended - started

    @property
    def ended(self) -> float:
        return self.spans["commit"][1]  # the last phase

    def record(self, plan, drafts: list[list[int]], draft_span, drafting, committed) -> StepRecord:
        return StepRecord(
            mode=plan.mode, verify_slot=plan.verify.slot, verify_size=len(drafts), verify_span=self.spans["verify"],
            verified_drafts=max(map(len, drafts)), draft_slot=plan.overlap.slot if plan.overlap else None,
            draft_span=draft_span,
            num_draft_tokens=plan.num_draft_tokens, prefill_seconds=self.seconds("prefill"),
            commit_seconds=self.seconds("commit"), draft_runs=drafting.runs,
            seconds=self.ended - self.started - self.seconds("prefill"), catch_up_seconds=drafting.catch_up_seconds,
            num_tokens=sum(len(out.new_token_ids) for out in committed), gap_seconds=self.gap)


@dataclass
class Verdict:
    """A verification's outcome, per row: how many drafts it accepted, the target's own next token,
    and the raw logits (on the target's device) that the emitted tokens' log-probabilities come from."""
    accepted: torch.Tensor
    next_tokens: torch.Tensor
    logits: torch.Tensor
    hidden: torch.Tensor | None = None  # [b, n, H] the target's states over the rows' feeds, for a feature draft


class SpecDecodeStats:
    """Speculation counters with vLLM's meaning (spec_decode_num_drafts, ..._num_draft_tokens,
    ..._num_accepted_tokens, ..._num_accepted_tokens_per_pos): a draft is one request's proposal in
    one verification; position i counts drafts whose first i + 1 tokens were all accepted.
    Mean acceptance length = 1 + accepted / drafts."""

    def __init__(self, max_draft_tokens: int):
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_position = [0] * max_draft_tokens

    def observe(self, num_drafted: int, num_accepted: int) -> None:
        if num_drafted == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_drafted
        self.num_accepted_tokens += num_accepted
        for position in range(num_accepted):
            self.accepted_per_position[position] += 1


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        parts = build(config)
        self.tokenizer = parts.tokenizer
        self.eos_token_ids = parts.eos_token_ids
        self.max_prompt_chars = parts.max_prompt_chars
        self.target = parts.target
        self.scheduler = parts.scheduler
        self.drafting = parts.drafting
        self.policy = parts.policy
        self.outputs = parts.outputs
        self.placement = Placement(parts.step_cpus)
        self._lock = threading.Lock()  # guards the waiting queue and cancellations, filled from other threads
        self._cancelled: set[str] = set()
        self.step_log: deque[StepRecord] = deque(maxlen=4096)
        self.steps_by_mode = dict.fromkeys(STEP_MODES, 0)
        self.num_generated_tokens = 0  # committed by steps, counted as they go (a metric per step, as vLLM's)
        self.spec_stats = SpecDecodeStats(config.num_draft_tokens)
        self.acceptance_prior = 0.5  # a newcomer's alpha before its first verification: the running mean
        self.fault_hook = None  # tests: called with each Sequence before its commit
        self._last_step_end: float | None = None  # None: the engine has waited for work since

    @property
    def drafter(self):
        return self.drafting.drafter

    @property
    def num_drafter_failures(self) -> int:
        return self.drafting.num_failures

    def close(self) -> None:
        self.drafting.close()
        self.target.close()

    # -- requests -----------------------------------------------------------------------------
    def submit(self, request_id: str, prompt: str | list[int], params: SamplingParams | dict | None = None) -> None:
        """Validate and queue a request; raises InvalidRequest with a clear message."""
        if not isinstance(params, SamplingParams):
            params = SamplingParams.from_dict(params or {})
        prompt_ids = self._encode(prompt)
        if len(prompt_ids) >= self.config.max_model_len:
            raise InvalidRequest(f"prompt has {len(prompt_ids)} tokens; max_model_len is {self.config.max_model_len}")
        num_draft = self.policy.max_draft_tokens
        if params.num_draft_tokens is not None:
            num_draft = min(params.num_draft_tokens, num_draft)
        seed = params.seed if params.seed is not None else secrets.randbits(62)
        seq = Sequence(request_id, prompt_ids, params, num_draft, torch.Generator().manual_seed(seed),
                       self.acceptance_prior)
        with self._lock:
            if self.scheduler.find(request_id) is not None:
                raise InvalidRequest(f"request id {request_id!r} is already in flight")
            self.scheduler.waiting.append(seq)

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt is empty")
            if len(prompt) > self.max_prompt_chars:
                raise InvalidRequest(f"prompt has {len(prompt)} characters, more than max_model_len "
                                     f"{self.config.max_model_len} tokens can hold")
            ids = self.tokenizer(prompt).input_ids
            if not ids:
                raise InvalidRequest("prompt tokenizes to no tokens")
            return ids
        ids = list(prompt)
        if not ids or not all(isinstance(t, int) and 0 <= t < len(self.tokenizer) for t in ids):
            raise InvalidRequest("prompt token ids must be a non-empty list of ids within the vocabulary")
        return ids

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.add(request_id)

    def note_idle(self) -> None:
        """The caller is about to wait for work: the next step's gap would time the wait."""
        self._last_step_end = None

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.scheduler.waiting or self.scheduler.num_running or self._cancelled)

    @property
    def num_free_slots(self) -> int:
        with self._lock:
            return self.scheduler.capacity - self.scheduler.num_running - len(self.scheduler.waiting)

    def batch_sizes(self) -> list[int]:
        return [len(b) for b in self.scheduler.batches]

    # -- the step loop ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        try:
            return self._step()
        except Exception:
            # A step that failed halfway (say, out of memory in verification) may leave drafts that
            # were started but never collected: forget them all, so that no later step pairs a
            # batch with drafts that are not its own. The drafter skips the unread reply by number.
            self.drafting.forget_all()
            raise

    def _step(self) -> list[RequestOutput]:
        """plan -> draft -> verify -> commit. Newcomers' prompts fill the target's cache after the
        overlap batch's drafting has started (drafting reads token ids, not the target's cache): in
        PSD the prefill runs beside it."""
        self.placement.pin_step_thread()
        outputs = self._apply_cancellations()
        with self._lock:
            admitted = self.scheduler.admit(split=self.policy.splits_batches)
        self._arrange_batches()
        timer = StepTimer(self._last_step_end)
        plan = self.policy.plan(self.scheduler.batches)
        if plan is None:
            self._prefill(admitted)
            return outputs
        with timer.phase("draft"):
            draft_span = self.drafting.draft_for(plan)
        with timer.phase("prefill"):
            if admitted:
                self._prefill(admitted)
        drafts = [seq.draft_ids for seq in plan.verify.seqs]  # a drafter failure below forgets every seq's
        with timer.phase("verify"):
            verdict = self._verify(plan.verify)
        draft_span = self.drafting.collect_overlap(plan) or draft_span
        with timer.phase("commit"):
            committed = self._commit(plan.verify, drafts, verdict)
        self._record(timer.record(plan, drafts, draft_span, self.drafting, committed))
        self._last_step_end = timer.ended
        return outputs + committed

    def _record(self, record: StepRecord) -> None:
        self.step_log.append(record)
        self.steps_by_mode[record.mode] += 1
        self.num_generated_tokens += record.num_tokens
        self.policy.observe(record)

    def _arrange_batches(self) -> None:
        """Move running requests between the batches when the policy's layout changed (flex).
        Only between verifications: pending drafts belong to their batch's rows."""
        if any(b.is_drafted for b in self.scheduler.batches):
            return
        for seq, source, target in self.scheduler.layout_moves(self.policy.splits_batches):
            target.target_cache.copy_row_from(source.target_cache, len(source) - 1, len(target), seq.target_cached)
            source.remove(seq)
            target.add(seq)
            self.drafting.row_moved(seq)

    def _prefill(self, admitted: list[tuple[Sequence, Batch]]) -> None:
        """Fill the target cache with all but the last prompt token, which stays pending."""
        for batch in self.scheduler.batches:
            seqs = [seq for seq, b in admitted if b is batch and len(seq.token_ids) > 1]
            if seqs:
                rows = [batch.seqs.index(seq) for seq in seqs]
                hidden = self.target.fill(batch.target_cache, rows, [0] * len(seqs),
                                          [seq.token_ids[:-1] for seq in seqs], with_hidden=self.drafting.reads_features)
                for row, seq in enumerate(seqs if hidden is not None else []):
                    seq.target_features.append(hidden[row, :len(seq.token_ids) - 1])
            for seq, b in admitted:
                if b is batch:
                    seq.target_cached = len(seq.token_ids) - 1

    def _verify(self, batch: Batch):
        """One target forward over the batch: each row feeds its pending token and its drafts."""
        seqs = batch.seqs
        num_drafts = torch.tensor([len(s.draft_ids) for s in seqs])
        k = int(num_drafts.max())
        feeds = [s.token_ids[s.target_cached:] + s.draft_ids for s in seqs]
        keeps_states = self.drafting.reads_features
        out = self.target.forward(batch.target_cache, slice(0, len(seqs)), [s.target_cached for s in seqs], feeds,
                                  with_hidden=keeps_states)
        logits, hidden = out if keeps_states else (out, None)
        # Row r's p_i sits at offset (pending tokens - 1) + i of its feed; pad rows repeat the last.
        first = torch.tensor([len(f) - 1 - len(s.draft_ids) for f, s in zip(feeds, seqs)])
        positions = (first[:, None] + torch.arange(k + 1)).clamp(max=logits.size(1) - 1)
        logits = logits[torch.arange(len(seqs))[:, None].to(logits.device), positions.to(logits.device)]
        sampling = self._row_sampling(seqs, k + 1)
        draft_ids = torch.zeros(len(seqs), k, dtype=torch.long)
        for row, seq in enumerate(seqs):
            draft_ids[row, :len(seq.draft_ids)] = torch.tensor(seq.draft_ids, dtype=torch.long)
        if bool((sampling.temperature == 0).all()):
            # Greedy rows need ids only: the argmax runs on the target's device and only ids cross
            # to the CPU; no [b, k + 1, V] probabilities, no uniforms.
            return Verdict(*sampler.verify_greedy(sampler.greedy_tokens(logits, sampling).cpu(), draft_ids, num_drafts),
                           logits, hidden)
        # Sampled rows: the acceptance rule runs where the logits are (the target's device).
        device = logits.device
        target_probs = sampler.processed_probs(logits, sampling.to(device))
        vocab = target_probs.size(-1)
        draft_probs = torch.zeros(len(seqs), k, vocab, device=device)
        accept_uniforms = torch.zeros(len(seqs), k)
        for row, seq in enumerate(seqs):
            n = len(seq.draft_ids)
            if n:
                if seq.draft_probs is None:  # greedy: q is one-hot at the draft
                    draft_probs[row, torch.arange(n), draft_ids[row, :n].to(device)] = 1.0
                else:
                    draft_probs[row, :n] = seq.draft_probs[:, :vocab].to(device)
                accept_uniforms[row, :n] = seq.uniforms(n)
        resample_uniforms = torch.cat([seq.uniforms(1) for seq in seqs])
        return Verdict(*sampler.verify(target_probs, draft_ids, draft_probs, num_drafts, accept_uniforms,
                                       resample_uniforms), logits, hidden)

    def _row_sampling(self, seqs: list[Sequence], num_positions: int) -> sampler.RowSampling:
        return sampler.RowSampling.for_rows([s.params for s in seqs],
                                            [s.params.min_tokens - s.num_generated for s in seqs],
                                            num_positions, self.eos_token_ids)

    def _commit(self, batch: Batch, drafts: list[list[int]], verdict: Verdict) -> list[RequestOutput]:
        outputs = []
        for row, (seq, drafted, num_accepted, next_token) in enumerate(
                zip(batch.seqs, drafts, verdict.accepted.tolist(), verdict.next_tokens.tolist())):
            try:
                if self.fault_hook is not None:
                    self.fault_hook(seq)
                if verdict.hidden is not None:  # the states of the pending token(s) and the accepted drafts
                    seq.target_features.append(verdict.hidden[row, :len(seq.token_ids) - seq.target_cached + num_accepted])
                self._book(seq, len(drafted), num_accepted)
                appended = self.outputs.append(seq, drafted[:num_accepted] + [next_token])
                logprobs = self.outputs.logprobs(seq, verdict.logits[row], appended)
                outputs.append(self.outputs.output(seq, appended, logprobs=logprobs))
            except Exception as exc:  # one request's failure must not take the batch down
                log.exception("request %s failed", seq.request_id)
                seq.finish_reason = "error"
                outputs.append(self.outputs.output(seq, [], error=f"{type(exc).__name__}: {exc}"))
        # Only now: a row's move copies the cache extent its commit has just booked.
        for seq in [s for s in batch.seqs if s.is_finished]:
            batch.remove(seq)
        self.drafting.verified(batch)
        return outputs

    def _book(self, seq: Sequence, num_drafted: int, num_accepted: int) -> None:
        """Count the verification and move the caches' extents past the accepted drafts."""
        seq.num_drafted += num_drafted
        seq.num_accepted += num_accepted
        seq.acceptance.update(num_drafted, num_accepted)
        self.spec_stats.observe(num_drafted, num_accepted)
        if num_drafted:
            self.acceptance_prior += 0.2 * (seq.acceptance.value - self.acceptance_prior)
        seq.target_cached = len(seq.token_ids) + num_accepted
        self.drafting.book(seq, num_accepted)

    def _apply_cancellations(self) -> list[RequestOutput]:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            found = [(rid, self.scheduler.find(rid)) for rid in cancelled]
            for _, hit in found:
                if hit is not None:
                    self.scheduler.drop(*hit)
        outputs = []
        for rid, hit in found:
            if hit is not None:
                seq = hit[0]
                seq.finish_reason = "cancelled"
                outputs.append(self.outputs.output(seq, []))
        return outputs

    # -- convenience for scripts and tests -------------------------------------------------------
    def generate(self, prompts: list, params) -> list[RequestOutput]:
        """Run prompts to completion; returns one aggregated output per prompt, in order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        results: dict[str, RequestOutput] = {}
        texts: dict[str, list] = {}
        for i, (prompt, p) in enumerate(zip(prompts, params_list)):
            self.submit(f"gen-{i}", prompt, p)
            texts[f"gen-{i}"] = [[], "", None]
        while self.has_work():
            for out in self.step():
                acc = texts[out.request_id]
                acc[0] += out.new_token_ids
                acc[1] += out.text_delta
                if out.logprobs is not None:
                    acc[2] = (acc[2] or []) + out.logprobs
                if out.finished:
                    results[out.request_id] = out
        return [RequestOutput(rid, texts[rid][0], texts[rid][1], True, r.finish_reason, r.num_input_tokens,
                              r.num_output_tokens, r.num_drafted_tokens, r.num_accepted_tokens, r.error,
                              texts[rid][2], r.cumulative_logprob)
                for rid, r in ((f"gen-{i}", results[f"gen-{i}"]) for i in range(len(prompts)))]
