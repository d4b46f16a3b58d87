"""The engine: `step()` = admit -> plan -> draft/verify -> commit, for every policy.

Requests are admitted while the target's KV pool has blocks for them; when running requests need
more blocks than are free, the newest is preempted: it goes back to the head of the queue with
every token it has, and is recomputed (from the prefix cache where it can) when admitted again.

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
from collections import deque
from dataclasses import dataclass, replace

import torch

from minedraft.config import EngineConfig
from minedraft.drafting.drafter import StepDrafts
from minedraft.engine.builder import build
from minedraft.engine.placement import Placement
from minedraft.engine.stats import SpecDecodeStats, StepRecord, StepTimer
from minedraft.model import sampler
from minedraft.policy.cost_model import STEP_MODES
from minedraft.sampling_params import InvalidRequest, SamplingParams
from minedraft.scheduler import Batch
from minedraft.sequence import RequestOutput, Sequence
from minedraft.step_plan import StepPlan

log = logging.getLogger("minedraft")

ACCEPTANCE_PRIOR = 0.5  # a newcomer's alpha before the engine has seen any verification
ACCEPTANCE_PRIOR_RATE = 0.2  # how far each verified request moves the running prior towards its own alpha


@dataclass(frozen=True)
class Verdict:
    """A verification's outcome, per row: how many drafts it accepted, the target's own next token,
    and the raw logits (on the target's device) that the emitted tokens' log-probabilities come from."""
    accepted: torch.Tensor
    next_tokens: torch.Tensor
    logits: torch.Tensor
    hidden: torch.Tensor | None = None  # [b, n, H] the target's states over the rows' feeds, for a feature draft


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        parts = build(config)
        self.tokenizer = parts.tokenizer
        self.eos_token_ids = parts.eos_token_ids
        self.max_prompt_chars = parts.max_prompt_chars
        self.target = parts.target
        self.target_caches = parts.target_caches  # one per internal batch, by slot
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
        self.num_preemptions = 0
        self._num_arrivals = 0  # numbers requests as they arrive: preemption takes the newest
        self.spec_stats = SpecDecodeStats(config.num_draft_tokens)
        self.acceptance_prior = ACCEPTANCE_PRIOR  # a newcomer's alpha before its first verification: the running mean
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
            seq.arrival = self._num_arrivals
            self._num_arrivals += 1
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
        self._preempt_for_room()
        with self._lock:
            admitted = self.scheduler.admit(split=self.policy.splits_batches, fits=self._admission())
        self._arrange_batches()
        timer = StepTimer(self._last_step_end)
        plan = self.policy.plan(self.scheduler.batches, self.drafting.drafted_slots())
        if plan is None:
            self._prefill(admitted)
            return outputs
        with timer.phase("draft"):
            started = self.drafting.draft_for(plan)
        with timer.phase("prefill"):
            if admitted:
                self._prefill(admitted)
        drafts = self.drafting.take(plan.verify)
        with timer.phase("verify"):
            verdict = self._verify(plan.verify, drafts)
        draft_span = self.drafting.collect_overlap(started) or started.span
        with timer.phase("commit"):
            committed = self._commit(plan.verify, drafts, verdict)
        self._record(self._step_record(plan, started, drafts, draft_span, timer, committed))
        self._last_step_end = timer.ended
        return outputs + committed

    def _step_record(self, plan: StepPlan, started, drafts: StepDrafts, draft_span, timer: StepTimer,
                     committed: list[RequestOutput]) -> StepRecord:
        return StepRecord(
            mode=plan.mode, verify_size=len(drafts.lengths), verify_span=timer.spans["verify"],
            verified_drafts=int(drafts.lengths.max()), draft_slot=started.overlap.slot if started.overlap else None,
            draft_span=draft_span, num_draft_tokens=plan.num_draft_tokens, prefill_seconds=timer.seconds("prefill"),
            commit_seconds=timer.seconds("commit"), draft_runs=self.drafting.runs, seconds=timer.seconds_less_prefill,
            catch_up_seconds=self.drafting.catch_up_seconds,
            num_tokens=sum(len(out.new_token_ids) for out in committed), gap_seconds=timer.gap)

    def _record(self, record: StepRecord) -> None:
        self.step_log.append(record)
        self.steps_by_mode[record.mode] += 1
        self.num_generated_tokens += record.num_tokens
        self.policy.observe(record)

    def _arrange_batches(self) -> None:
        """Move running requests between the batches when the policy's layout changed (flex).
        Only between verifications: pending drafts belong to their batch's rows."""
        if self.drafting.drafted_slots():
            return
        for seq, source, target in self.scheduler.layout_moves(self.policy.splits_batches):
            self.target_caches[target.slot].take_row_from(self.target_caches[source.slot], len(source) - 1,
                                                          len(target))
            self._remove(source, seq)
            target.add(seq)

    def _remove(self, batch: Batch, seq: Sequence) -> None:
        """Take a request out of its batch: its blocks go back to the pool, and the batch's last
        row takes its place in every cache."""
        self.target_caches[batch.slot].release_rows([batch.seqs.index(seq)])
        move = batch.remove(seq)
        if move is not None:
            self.target_caches[batch.slot].move_row(move.src, move.dst)
        self.drafting.row_left(batch, seq, move)

    def _prefill(self, admitted: list[tuple[Sequence, Batch]]) -> None:
        """Fill the target cache with all but the last token, which stays pending: from the prefix
        cache as far as it holds them (not for a feature draft, which reads the target's states at
        every position), the rest by a forward."""
        for batch in self.scheduler.batches:
            cache = self.target_caches[batch.slot]
            seqs = [seq for seq, b in admitted if b is batch]
            rows = [batch.seqs.index(seq) for seq in seqs]
            starts = [0 if self.drafting.reads_features else cache.attach_prefix(row, seq.token_ids,
                                                                                 len(seq.token_ids) - 1)
                      for row, seq in zip(rows, seqs)]
            fed = [(row, seq, start) for row, seq, start in zip(rows, seqs, starts) if start < len(seq.token_ids) - 1]
            if fed:
                hidden = self.target.fill(cache, [row for row, _, _ in fed], [start for _, _, start in fed],
                                          [seq.token_ids[start:-1] for _, seq, start in fed],
                                          with_hidden=self.drafting.reads_features)
                for i, (_, seq, _) in enumerate(fed if hidden is not None else []):
                    seq.target_features.append(hidden[i, :len(seq.token_ids) - 1])
            for row, seq in zip(rows, seqs):
                seq.num_target_cached_tokens = len(seq.token_ids) - 1
                cache.commit(row, seq.num_target_cached_tokens)

    # -- blocks -------------------------------------------------------------------------------------
    def _blocks_to_start(self, num_tokens: int) -> int:
        """Blocks a request of `num_tokens` needs through its next verification."""
        return self.target.pool.blocks_for(num_tokens + self.policy.max_draft_tokens + 1)

    def _blocks_to_grow(self, batch: Batch, row: int) -> int:
        """Blocks a running request may still need for its next verification."""
        seq = batch.seqs[row]
        return max(0, self._blocks_to_start(len(seq.token_ids)) - self.target_caches[batch.slot].num_blocks(row))

    def _running_growth(self) -> int:
        return sum(self._blocks_to_grow(batch, row) for batch in self.scheduler.batches for row in range(len(batch)))

    def _admission(self):
        """The scheduler's test of a waiting request: blocks for it, beyond what the running ones
        may still need (first come, first served: the queue's head waits for room)."""
        room = self.target.pool.num_free - self._running_growth()

        def fits(seq: Sequence) -> bool:
            nonlocal room
            need = self._blocks_to_start(len(seq.token_ids))
            if need > room:
                return False
            room -= need
            return True
        return fits

    def _preempt_for_room(self) -> None:
        """While the running requests may need more blocks than are free, preempt the newest (vLLM's
        recompute policy): its blocks go back, it waits at the queue's head with every token it has,
        and its next admission recomputes its cache (the prefix cache keeps what it can)."""
        while self._running_growth() > self.target.pool.num_free:
            running = [(seq, batch) for batch in self.scheduler.batches for seq in batch.seqs]
            if len(running) <= 1:
                return  # the pool holds one whole request (checked at build)
            seq, batch = max(running, key=lambda hit: hit[0].arrival)
            self._remove(batch, seq)
            seq.preempted()
            with self._lock:
                self.scheduler.waiting.appendleft(seq)
            self.num_preemptions += 1

    def _verify(self, batch: Batch, drafts: StepDrafts) -> Verdict:
        """One target forward over the batch: each row feeds its pending token and its drafts."""
        seqs = batch.seqs
        num_drafts = drafts.lengths
        k = drafts.ids.size(1)
        draft_ids = drafts.ids
        feeds = [s.token_ids[s.num_target_cached_tokens:] + ids[:n]
                 for s, ids, n in zip(seqs, draft_ids.tolist(), num_drafts.tolist())]
        keeps_states = self.drafting.reads_features
        out = self.target.forward(self.target_caches[batch.slot], slice(0, len(seqs)),
                                  [s.num_target_cached_tokens for s in seqs], feeds, with_hidden=keeps_states)
        logits, hidden = out if keeps_states else (out, None)
        # Row r's p_i sits at offset (pending tokens - 1) + i of its feed; pad rows repeat the last.
        first = torch.tensor([len(f) - 1 for f in feeds]) - num_drafts
        positions = (first[:, None] + torch.arange(k + 1)).clamp(max=logits.size(1) - 1)
        logits = logits[torch.arange(len(seqs))[:, None].to(logits.device), positions.to(logits.device)]
        sampling = self._row_sampling(seqs, k + 1)
        if bool((sampling.temperature == 0).all()):
            # Greedy rows need ids only: the argmax runs on the target's device and only ids cross
            # to the CPU; no [b, k + 1, V] probabilities, no uniforms.
            accepted, next_tokens = sampler.verify_greedy(sampler.greedy_tokens(logits, sampling).cpu(), draft_ids,
                                                          num_drafts)
            return Verdict(accepted, next_tokens, logits, hidden)
        # Sampled rows: the acceptance rule runs where the logits are (the target's device).
        device = logits.device
        target_probs = sampler.processed_probs(logits, sampling.to(device))
        draft_probs = self._draft_probs(drafts, target_probs.size(-1), device)
        accept_uniforms = torch.zeros(len(seqs), k)
        for row, (seq, n) in enumerate(zip(seqs, num_drafts.tolist())):
            if n:
                accept_uniforms[row, :n] = seq.uniforms(n)
        resample_uniforms = torch.cat([seq.uniforms(1) for seq in seqs])
        accepted, next_tokens = sampler.verify(target_probs, draft_ids, draft_probs, num_drafts, accept_uniforms,
                                               resample_uniforms)
        return Verdict(accepted, next_tokens, logits, hidden)

    @staticmethod
    def _draft_probs(drafts: StepDrafts, vocab: int, device) -> torch.Tensor:
        """q for every row and position, [b, k, vocab]: the drafter's where it sent them, one-hot at
        the drafts elsewhere (greedy rows, drafters without probabilities); zero past a row's drafts."""
        k = drafts.ids.size(1)
        probs = torch.nn.functional.one_hot(drafts.ids, vocab).float()
        if drafts.probs is not None:
            probs = torch.where(drafts.has_probs[:, None, None], drafts.probs[:, :k, :vocab].float(), probs)
        probs *= (torch.arange(k) < drafts.lengths[:, None])[..., None]
        return probs.to(device)

    def _row_sampling(self, seqs: list[Sequence], num_positions: int) -> sampler.RowSampling:
        return sampler.RowSampling.for_rows([s.params for s in seqs],
                                            [s.params.min_tokens - s.num_generated for s in seqs],
                                            num_positions, self.eos_token_ids)

    def _commit(self, batch: Batch, drafts: StepDrafts, verdict: Verdict) -> list[RequestOutput]:
        outputs = []
        rows = zip(batch.seqs, drafts.ids.tolist(), drafts.lengths.tolist(), verdict.accepted.tolist(),
                   verdict.next_tokens.tolist())
        for row, (seq, draft_ids, num_drafted, num_accepted, next_token) in enumerate(rows):
            try:
                if verdict.hidden is not None:  # the states of the pending token(s) and the accepted drafts
                    seq.target_features.append(
                        verdict.hidden[row, :len(seq.token_ids) - seq.num_target_cached_tokens + num_accepted])
                self._book(seq, num_drafted, num_accepted)
                self.target_caches[batch.slot].commit(row, seq.num_target_cached_tokens)
                appended = self.outputs.append(seq, draft_ids[:num_accepted] + [next_token])
                logprobs = self.outputs.logprobs(seq, verdict.logits[row], appended)
                outputs.append(self.outputs.output(seq, appended, logprobs=logprobs))
            except Exception as exc:  # one request's failure must not take the batch down
                log.exception("request %s failed", seq.request_id)
                seq.finish_reason = "error"
                outputs.append(self.outputs.output(seq, [], error=f"{type(exc).__name__}: {exc}"))
        # Only now: a row's move copies the cache extent its commit has just booked.
        for seq in [s for s in batch.seqs if s.is_finished]:
            self._remove(batch, seq)
        return outputs

    def _book(self, seq: Sequence, num_drafted: int, num_accepted: int) -> None:
        """Count the verification and move the caches' extents past the accepted drafts."""
        seq.num_drafted_tokens += num_drafted
        seq.num_accepted_tokens += num_accepted
        seq.acceptance.update(num_drafted, num_accepted)
        self.spec_stats.observe(num_drafted, num_accepted)
        if num_drafted:
            self.acceptance_prior += ACCEPTANCE_PRIOR_RATE * (seq.acceptance.value - self.acceptance_prior)
        seq.num_target_cached_tokens = len(seq.token_ids) + num_accepted
        self.drafting.book(seq, num_accepted)

    def _apply_cancellations(self) -> list[RequestOutput]:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            found = [hit for hit in map(self.scheduler.find, cancelled) if hit is not None]
            for seq, batch in found:
                if batch is None:
                    self.scheduler.waiting.remove(seq)
                else:
                    self._remove(batch, seq)
        outputs = []
        for seq, _ in found:
            seq.finish_reason = "cancelled"
            outputs.append(self.outputs.output(seq, []))
        return outputs

    # -- convenience for scripts and tests -------------------------------------------------------
    def generate(self, prompts: list, params) -> list[RequestOutput]:
        """Run prompts to completion; returns one aggregated output per prompt, in order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        request_ids = [f"gen-{i}" for i in range(len(prompts))]
        for request_id, prompt, p in zip(request_ids, prompts, params_list):
            self.submit(request_id, prompt, p)
        outputs: dict[str, list[RequestOutput]] = {request_id: [] for request_id in request_ids}
        while self.has_work():
            for out in self.step():
                outputs[out.request_id].append(out)
        return [_aggregate(outputs[request_id]) for request_id in request_ids]


def _aggregate(outputs: list[RequestOutput]) -> RequestOutput:
    """One request's outputs as one: its tokens, text and log-probabilities, with the last's counts."""
    logprobs = [out.logprobs for out in outputs if out.logprobs is not None]
    return replace(outputs[-1], new_token_ids=[t for out in outputs for t in out.new_token_ids],
                   text_delta="".join(out.text_delta for out in outputs),
                   logprobs=[entry for entries in logprobs for entry in entries] if logprobs else None)
