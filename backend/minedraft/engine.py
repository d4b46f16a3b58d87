"""The engine: `step()` = admit -> plan -> draft/verify -> commit, for every policy.

Usable without Triton:

    engine = Engine(EngineConfig(mode="psd"))
    engine.submit("r1", "def add(a, b):", {"max_tokens": 32, "temperature": 0})
    while engine.has_work():
        for out in engine.step():
            print(out.text_delta, end="")
"""
import logging
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from . import sampler
from .config import ConfigError, EngineConfig
from .calibration import draft_step_seconds, measure_step_costs
from .cost_model import MODES, Choice
from .drafter import (D2T_FILE, DraftRow, DraftVocabulary, DraftWork, DrafterError, InlineDrafter, ProcessDrafter,
                      build_draft_model)
from .flex import FlexPolicy
from .model_runner import ModelRunner, load_config, load_model, load_tokenizer
from .policy import Policy, StepPlan
from .sampling_params import InvalidRequest, SamplingParams
from .scheduler import Batch, Scheduler
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
    draft_size: int
    draft_span: tuple[float, float] | None
    num_draft_tokens: int  # the step's cap on drafts per row
    prefill_seconds: float  # target time spent on newcomers' prompts this step
    commit_seconds: float  # booking, detokenising and output building for the verified rows
    # Every drafting this step: (rows, steps, seconds less catch-up, whether it ran beside verification).
    draft_runs: list[tuple[int, int, float, bool]]
    seconds: float  # the whole step after prefill: drafting, verification, waits, commit
    catch_up_seconds: float  # of which drafters spent refeeding backlogs (newcomers, moved rows, after AR)
    num_tokens: int  # tokens the step committed


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.tokenizer = load_tokenizer(config.target_model)
        self.eos_token_ids = end_of_sequence_ids(config.target_model, self.tokenizer)
        self.target_vocab_size = load_config(config.target_model).vocab_size
        # A prompt longer than this many characters has more than max_model_len tokens whatever it
        # says: no token is longer. Checked before tokenizing, which a huge prompt would make slow.
        self.max_prompt_chars = config.max_model_len * longest_token_chars(self.tokenizer)
        target_cpus, draft_cpus = config.cpu_split() if config.target_device == "cpu" else (set(), set())
        capacity = config.max_model_len + config.num_draft_tokens + 2
        drafts = config.mode != "ar" and config.num_draft_tokens > 0
        self.drafter = self._start_drafter(capacity, draft_cpus) if drafts else None
        self._pin_target(target_cpus)
        # Flex's sequential (SD) steps draft in-process, on the target's cores: with nothing to
        # overlap, a round trip to the worker process costs more than it hides.
        self.sequential_drafter = self.drafter
        if config.mode == "flex" and isinstance(self.drafter, ProcessDrafter):
            self.sequential_drafter = InlineDrafter(build_draft_model(
                config.draft_model, config.draft_device, config.dtype, config.max_num_seqs, capacity,
                self.eos_token_ids, self.target_vocab_size))
        target = load_model(config.target_model, config.target_device, config.dtype)
        _check_context(target.config, config)
        self.target = ModelRunner(target, config.max_num_seqs, capacity)
        batches = [Batch(slot, self.target.new_cache(), config.max_num_seqs) for slot in range(config.num_batches)]
        self.scheduler = Scheduler(batches)
        self.policy = self._make_policy()
        self._lock = threading.Lock()  # guards the waiting queue and cancellations, filled from other threads
        self._cancelled: set[str] = set()
        self.step_log: deque[StepRecord] = deque(maxlen=4096)
        self.num_drafter_failures = 0
        self.steps_by_mode = dict.fromkeys(MODES, 0)
        self.acceptance_prior = 0.5  # a newcomer's alpha before its first verification: the running mean
        self._draft_runs: list[tuple[int, int, float, bool]] = []
        self._catch_up_seconds = 0.0
        self.fault_hook = None  # tests: called with each Sequence before its commit

    # -- set-up -------------------------------------------------------------------------------
    def _start_drafter(self, capacity: int, draft_cpus: set[int]):
        cfg = self.config
        draft_config = load_config(cfg.draft_model)
        check_vocabularies(self.tokenizer, cfg.draft_model, self.target_vocab_size, draft_config.vocab_size)
        _check_context(draft_config, cfg)
        if cfg.drafter_kind == "process":
            return ProcessDrafter(cfg.draft_model, cfg.draft_device, cfg.dtype, cfg.max_num_seqs, capacity,
                                  self.eos_token_ids, self.target_vocab_size, cfg.num_draft_tokens, draft_cpus)
        model = build_draft_model(cfg.draft_model, cfg.draft_device, cfg.dtype, cfg.max_num_seqs, capacity,
                                  self.eos_token_ids, self.target_vocab_size)
        return InlineDrafter(model)

    def _make_policy(self) -> Policy:
        cfg = self.config
        if cfg.mode != "flex":
            return Policy(Choice(cfg.mode, cfg.num_draft_tokens if cfg.mode != "ar" else 0))
        batch = self.scheduler.batches[0]
        costs = measure_step_costs(self.target, batch.target_cache, self.sequential_drafter, cfg.num_draft_tokens,
                                   cfg.max_num_seqs, self.eos_token_ids)
        log.info("flex calibration: %s", costs.to_json())
        policy = FlexPolicy(cfg.num_draft_tokens, costs, cfg.max_num_seqs)
        if self.drafter is not self.sequential_drafter:
            # PSD's drafts run in the worker: start its estimates from the worker's own timings.
            for size, inline_seconds in zip(costs.batch_sizes, costs.draft):
                worker_seconds = draft_step_seconds(self.drafter, size, cfg.num_draft_tokens)
                policy.costs.draft_ratio[(size, True)] = worker_seconds / inline_seconds
        return policy

    def _pin_target(self, cpus: set[int]) -> None:
        """Size the target's thread pool to its share of cores. The affinity is only set when
        configured: it applies to the calling thread, which an embedding program may not expect."""
        if not cpus:
            return
        torch.set_num_threads(len(cpus))
        if self.config.target_cpus:
            os.sched_setaffinity(0, cpus)

    def close(self) -> None:
        for drafter in {self.drafter, self.sequential_drafter} - {None}:
            drafter.close()
        self.drafter = self.sequential_drafter = None

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
            self._forget_drafts()
            raise

    def _step(self) -> list[RequestOutput]:
        outputs = self._apply_cancellations()
        with self._lock:
            admitted = self.scheduler.admit(split=self.policy.splits_batches)
        self._arrange_batches()
        prefill_started = time.monotonic()
        self._prefill(admitted)
        prefill_seconds = time.monotonic() - prefill_started
        plan = self.policy.plan(self.scheduler.batches)
        if plan is None:
            return outputs
        self._draft_runs, self._catch_up_seconds = [], 0.0
        draft_span = self._draft_for(plan)
        verify_started = time.monotonic()
        # Snapshot the drafts being verified: a drafter failure below forgets every seq's drafts.
        drafts = [seq.draft_ids for seq in plan.verify.seqs]
        verified_drafts = max(map(len, drafts))
        accepted, next_tokens = self._verify(plan.verify)
        verify_span = (verify_started, time.monotonic())
        if plan.overlap is not None and self.drafter is not None:
            draft_span = self._collect_drafts(plan.overlap, self.drafter, overlapped=True) or draft_span
        verify_size = len(plan.verify)
        commit_started = time.monotonic()
        committed = self._commit(plan.verify, drafts, accepted, next_tokens)
        outputs += committed
        ended = time.monotonic()
        record = StepRecord(
            plan.mode, plan.verify.slot, verify_size, verify_span, verified_drafts,
            plan.overlap.slot if plan.overlap else None, len(plan.overlap) if plan.overlap else 0,
            draft_span, plan.num_draft_tokens, prefill_seconds, ended - commit_started, self._draft_runs,
            ended - prefill_started - prefill_seconds, self._catch_up_seconds,
            sum(len(out.new_token_ids) for out in committed))
        self.step_log.append(record)
        self.steps_by_mode[plan.mode] += 1
        self.policy.observe(record)
        return outputs

    def _draft_for(self, plan: StepPlan):
        """Draft the batch about to be verified if it has no drafts yet (sequential), then
        start drafting the overlap batch, which runs while the target verifies."""
        if self.drafter is None or plan.num_draft_tokens == 0:
            return None
        span = None
        if not plan.verify.is_drafted:
            # A probe drafts where the batch's rows already are: moving them costs a full refeed.
            drafter = plan.verify.drafter if plan.probe and plan.verify.drafter else self.sequential_drafter
            if self._start_draft(plan.verify, plan.num_draft_tokens, drafter):
                span = self._collect_drafts(plan.verify, drafter)
        if plan.overlap is not None and not self._start_draft(plan.overlap, plan.num_draft_tokens, self.drafter):
            plan.overlap = None
        return span

    def _is_ready(self, drafter) -> bool:
        """A restarted worker loads in the background; meanwhile the target decodes alone."""
        try:
            return drafter.ready
        except DrafterError as exc:
            self._on_drafter_failure(exc, drafter)
            return False

    def _start_draft(self, batch: Batch, step_cap: int, drafter) -> bool:
        if not self._is_ready(drafter):
            return False
        work = self._draft_work(batch, step_cap, drafter)
        if work is None:
            return False
        try:
            drafter.start(work)
        except DrafterError as exc:
            self._on_drafter_failure(exc, drafter)
            return False
        return True

    def _draft_work(self, batch: Batch, step_cap: int, drafter) -> DraftWork | None:
        caps = [seq.draft_budget(self.config.max_model_len, step_cap) for seq in batch.seqs]
        num_tokens = max(caps)
        if num_tokens == 0:
            return None
        if batch.drafter is not drafter:
            # The other drafter's cache holds nothing of this batch: every row starts over there.
            for seq in batch.seqs:
                seq.draft_cached = seq.draft_extent = 0
            batch.draft_moves.clear()
            batch.drafter = drafter
        rows = [DraftRow(cached_len=seq.draft_cached, feed=seq.token_ids[seq.draft_cached:],
                         temperature=seq.params.temperature, top_k=seq.params.top_k, top_p=seq.params.top_p,
                         num_eos_blocked=max(0, seq.params.min_tokens - seq.num_generated),
                         uniforms=seq.uniforms(cap).tolist(), max_tokens=cap)
                for seq, cap in zip(batch.seqs, caps)]
        work = DraftWork(batch.slot, list(batch.draft_moves), rows, num_tokens, self.config.draft_confidence_threshold)
        batch.draft_moves.clear()
        return work

    def _collect_drafts(self, batch: Batch, drafter, overlapped: bool = False):
        try:
            drafts = drafter.finish()
        except DrafterError as exc:
            self._on_drafter_failure(exc, drafter)
            return None
        steps = drafts.ids.size(1)
        for row, (seq, length) in enumerate(zip(batch.seqs, drafts.lengths)):
            seq.draft_ids = drafts.ids[row, :length].tolist()
            # A greedy row's q is one-hot at its drafts (rebuilt at verification); a sampled row's is
            # copied out of the drafter's buffer, which the drafter reuses for the batch's next drafts.
            seq.draft_probs = drafts.probs[row, :length].clone() if seq.params.temperature > 0 else None
            seq.draft_cached = len(seq.token_ids)
            seq.draft_extent = steps - 1
        batch.is_drafted = True
        started, ended = drafter.last_span
        self._draft_runs.append((len(batch), steps, ended - started - drafts.catch_up_seconds, overlapped))
        self._catch_up_seconds += drafts.catch_up_seconds
        return drafter.last_span

    def _on_drafter_failure(self, exc: Exception, drafter) -> None:
        """Lossless fallback: forget all drafts (the target decodes alone meanwhile) and restart."""
        self.num_drafter_failures += 1
        log.error("drafter failure %d: %s; restarting it, target-only steps meanwhile",
                  self.num_drafter_failures, exc)
        self._forget_drafts()
        try:
            drafter.restart()
        except Exception as restart_exc:  # e.g. no process could be started: retried at the next step
            log.error("drafter restart failed: %s", restart_exc)

    def _forget_drafts(self) -> None:
        for batch in self.scheduler.batches:
            batch.is_drafted = False
            batch.draft_moves.clear()
            batch.drafter = None
            for seq in batch.seqs:
                seq.draft_ids, seq.draft_probs, seq.draft_cached, seq.draft_extent = [], None, 0, 0

    def _arrange_batches(self) -> None:
        """Move running requests between the batches when the policy's layout changed (flex).
        Only between verifications: pending drafts belong to their batch's rows."""
        if any(b.is_drafted for b in self.scheduler.batches):
            return
        for seq, source, target in self.scheduler.layout_moves(self.policy.splits_batches):
            target.target_cache.copy_row_from(source.target_cache, len(source) - 1, len(target), seq.target_cached)
            source.remove(seq)
            target.add(seq)
            seq.draft_cached = seq.draft_extent = 0  # the target batch's draft cache has no row for it yet

    def _prefill(self, admitted: list[tuple[Sequence, Batch]]) -> None:
        """Fill the target cache with all but the last prompt token, which stays pending."""
        for batch in self.scheduler.batches:
            seqs = [seq for seq, b in admitted if b is batch and len(seq.token_ids) > 1]
            if seqs:
                rows = [batch.seqs.index(seq) for seq in seqs]
                self.target.forward(batch.target_cache, rows, [0] * len(seqs),
                                    [seq.token_ids[:-1] for seq in seqs], last_only=True)
            for seq, b in admitted:
                if b is batch:
                    seq.target_cached = len(seq.token_ids) - 1

    def _verify(self, batch: Batch):
        """One target forward over the batch: each row feeds its pending token and its drafts."""
        seqs = batch.seqs
        num_drafts = torch.tensor([len(s.draft_ids) for s in seqs])
        k = int(num_drafts.max())
        feeds = [s.token_ids[s.target_cached:] + s.draft_ids for s in seqs]
        logits = self.target.forward(batch.target_cache, slice(0, len(seqs)), [s.target_cached for s in seqs], feeds)
        # Row r's p_i sits at offset (pending tokens - 1) + i of its feed; pad rows repeat the last.
        first = torch.tensor([len(f) - 1 - len(s.draft_ids) for f, s in zip(feeds, seqs)])
        positions = (first[:, None] + torch.arange(k + 1)).clamp(max=logits.size(1) - 1)
        logits = logits[torch.arange(len(seqs))[:, None], positions].cpu()
        target_probs = sampler.processed_probs(logits, self._row_sampling(seqs, k + 1))
        vocab = target_probs.size(-1)
        draft_ids = torch.zeros(len(seqs), k, dtype=torch.long)
        draft_probs = torch.zeros(len(seqs), k, vocab)
        accept_uniforms = torch.zeros(len(seqs), k)
        for row, seq in enumerate(seqs):
            n = len(seq.draft_ids)
            if n:
                draft_ids[row, :n] = torch.tensor(seq.draft_ids)
                if seq.draft_probs is None:  # greedy: q is one-hot at the draft
                    draft_probs[row, torch.arange(n), draft_ids[row, :n]] = 1.0
                else:
                    draft_probs[row, :n] = seq.draft_probs[:, :vocab]
                accept_uniforms[row, :n] = seq.uniforms(n)
        resample_uniforms = torch.cat([seq.uniforms(1) for seq in seqs])
        return sampler.verify(target_probs, draft_ids, draft_probs, num_drafts, accept_uniforms, resample_uniforms)

    def _row_sampling(self, seqs: list[Sequence], num_positions: int) -> sampler.RowSampling:
        return sampler.RowSampling.for_rows([s.params for s in seqs],
                                            [s.params.min_tokens - s.num_generated for s in seqs],
                                            num_positions, self.eos_token_ids)

    def _commit(self, batch: Batch, drafts: list[list[int]], accepted: torch.Tensor,
                next_tokens: torch.Tensor) -> list[RequestOutput]:
        outputs = []
        for seq, drafted, num_accepted, next_token in zip(batch.seqs, drafts, accepted.tolist(), next_tokens.tolist()):
            try:
                if self.fault_hook is not None:
                    self.fault_hook(seq)
                appended = self._advance(seq, len(drafted), num_accepted, drafted[:num_accepted] + [next_token])
                outputs.append(self._output(seq, appended))
            except Exception as exc:  # one request's failure must not take the batch down
                log.exception("request %s failed", seq.request_id)
                seq.finish_reason = "error"
                outputs.append(self._output(seq, [], error=f"{type(exc).__name__}: {exc}"))
        # Only now: a row's move copies the cache extent its commit has just booked.
        for seq in [s for s in batch.seqs if s.is_finished]:
            batch.remove(seq)
        batch.is_drafted = False
        return outputs

    def _advance(self, seq: Sequence, num_drafted: int, num_accepted: int, new_tokens: list[int]) -> list[int]:
        """Book the verification's result; returns the tokens kept (up to a finishing one)."""
        seq.num_drafted += num_drafted
        seq.num_accepted += num_accepted
        seq.acceptance.update(num_drafted, num_accepted)
        if num_drafted:
            self.acceptance_prior += 0.2 * (seq.acceptance.value - self.acceptance_prior)
        seq.target_cached = len(seq.token_ids) + num_accepted
        seq.draft_cached += min(num_accepted, seq.draft_extent)
        seq.draft_ids, seq.draft_probs, seq.draft_extent = [], None, 0
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        params = seq.params
        for kept, token in enumerate(new_tokens, 1):
            seq.token_ids.append(token)
            if token in self.eos_token_ids and not params.ignore_eos:
                seq.finish_reason = "eos"
            elif params.stop and seq.num_generated >= params.min_tokens and self._cut_at_stop(seq):
                seq.finish_reason = "stop"
            elif seq.num_generated >= params.max_tokens or len(seq.token_ids) >= self.config.max_model_len:
                seq.finish_reason = "length"
            if seq.is_finished:
                return new_tokens[:kept]
        return new_tokens

    def _cut_at_stop(self, seq: Sequence) -> bool:
        text = self._decode(seq)
        hits = [i for i in (text.find(s, max(0, seq.num_text_sent - len(s))) for s in seq.params.stop) if i >= 0]
        if hits:
            seq.text = text[:min(hits)]
        return bool(hits)

    def _decode(self, seq: Sequence) -> str:
        return self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)

    def _output(self, seq: Sequence, new_tokens: list[int], error: str | None = None) -> RequestOutput:
        return RequestOutput(seq.request_id, new_tokens, self._text_delta(seq), seq.is_finished, seq.finish_reason,
                             seq.num_prompt_tokens, seq.num_generated, seq.num_drafted, seq.num_accepted, error)

    def _text_delta(self, seq: Sequence) -> str:
        """New text since the last output. Held back while it ends in an incomplete UTF-8
        character, or could still grow into a stop string, so the deltas always concatenate
        to the final text."""
        if seq.finish_reason != "stop":
            seq.text = self._decode(seq)
        ready = len(seq.text)
        if not seq.is_finished:
            ready = len(seq.text.rstrip("\ufffd"))
            if seq.params.stop:
                ready = min(ready, len(seq.text) - max(len(s) for s in seq.params.stop) + 1)
        delta = seq.text[seq.num_text_sent:max(ready, seq.num_text_sent)]
        seq.num_text_sent += len(delta)
        return delta

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
                outputs.append(self._output(seq, []))
        return outputs

    # -- convenience for scripts and tests -------------------------------------------------------
    def generate(self, prompts: list, params) -> list[RequestOutput]:
        """Run prompts to completion; returns one aggregated output per prompt, in order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        results: dict[str, RequestOutput] = {}
        texts: dict[str, list] = {}
        for i, (prompt, p) in enumerate(zip(prompts, params_list)):
            self.submit(f"gen-{i}", prompt, p)
            texts[f"gen-{i}"] = [[], ""]
        while self.has_work():
            for out in self.step():
                acc = texts[out.request_id]
                acc[0] += out.new_token_ids
                acc[1] += out.text_delta
                if out.finished:
                    results[out.request_id] = out
        return [RequestOutput(rid, texts[rid][0], texts[rid][1], True, r.finish_reason, r.num_input_tokens,
                              r.num_output_tokens, r.num_drafted_tokens, r.num_accepted_tokens, r.error)
                for rid, r in ((f"gen-{i}", results[f"gen-{i}"]) for i in range(len(prompts)))]


def check_vocabularies(tokenizer, draft_path: str, target_vocab_size: int, draft_vocab_size: int) -> None:
    vocabulary = DraftVocabulary.load(draft_path, target_vocab_size)
    if vocabulary.d2t is not None:
        # A reduced draft vocabulary: its ids map into the target's, plus at most one input-only id.
        if draft_vocab_size not in (vocabulary.size, vocabulary.size + 1):
            raise ConfigError(f"draft_model: {D2T_FILE} maps {vocabulary.size} ids but the draft has "
                              f"{draft_vocab_size}")
        if int(vocabulary.d2t.max()) >= target_vocab_size or int(vocabulary.d2t.min()) < 0:
            raise ConfigError(f"draft_model: {D2T_FILE} names ids outside the target's vocabulary")
    elif target_vocab_size != draft_vocab_size:
        raise ConfigError(f"draft_model: vocabulary size {draft_vocab_size} differs from the target's "
                          f"{target_vocab_size}; the pair must share a tokenizer")
    try:
        draft_tokenizer = load_tokenizer(draft_path)
    except (OSError, ValueError):
        return  # a draft directory without its own tokenizer uses the target's
    if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError("draft_model: its tokenizer's vocabulary differs from the target's")


def end_of_sequence_ids(model_path: str, tokenizer) -> tuple[int, ...]:
    """Every id that ends a request: the tokenizer's EOS and those of the generation config
    (instruct models often list several, e.g. Llama 3's end-of-turn tokens)."""
    ids = [tokenizer.eos_token_id]
    try:
        configured = GenerationConfig.from_pretrained(model_path).eos_token_id
    except (OSError, ValueError):
        configured = None
    ids += configured if isinstance(configured, list) else [configured]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def longest_token_chars(tokenizer) -> int:
    return max(len(tokenizer.convert_tokens_to_string([token])) for token in tokenizer.get_vocab())


def _check_context(model_config, config: EngineConfig) -> None:
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and config.max_model_len > limit:
        raise ConfigError(f"max_model_len {config.max_model_len} exceeds the model's "
                          f"max_position_embeddings {limit}")
