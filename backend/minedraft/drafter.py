"""The drafter: proposes k tokens per row from verified context, with their probabilities.

`DraftModel` does the work. Two ways to run it behind the same start/finish interface:
- `InlineDrafter`: a thread in the engine's process. On CUDA it issues its kernels on its
  own stream of `draft_device`, so they overlap the target's. On CPU the GIL serialises
  the two sides' Python, which is why CPU overlap uses the next one.
- `ProcessDrafter`: a worker process on its own cores (MineDraft's workers are processes too).
  Each call sends a small control message through a pipe; draft ids and their [b, k, V]
  probabilities come back through shared memory.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from . import sampler
from .model_runner import ModelRunner, load_model
from .quantization import quantize_linears

NUM_BATCH_SLOTS = 2
D2T_FILE = "d2t.json"
# In a draft's directory: what makes it a feature draft (EAGLE), the projection of [token embedding;
# the target's last hidden state] to the draft's input, `weight` [H, H + H_target] and `bias` [H].
FEATURE_PROJECTION_FILE = "feature_projection.safetensors"
PARALLEL_DRAFT_KEY = "pard_token"  # in a draft's config.json: the mask token id of a parallel draft
RESPAWN_BACKOFF_SECONDS = (1.0, 60.0)  # first and longest wait before respawning a worker that failed to start
# Both sides poll the pipe this long before blocking on it: a blocked virtual CPU halts, and
# waking it is slow. In one profiling run here, SD steps through the worker with both sides
# blocking ran their verifications 26 % and their drafts 48 % slower than the same steps in one
# process; polling first recovered much of that (noisy). Beyond this, an idle drafter sleeps.
SPIN_SECONDS = 0.05


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


class DraftVocabulary:
    """The draft's token ids in the target's vocabulary, for a draft with a reduced vocabulary
    (FR-Spec, EAGLE-3): `d2t.json` in the draft's directory lists, for each draft id, its target id.
    Target tokens outside it are fed as the draft's extra last id and are never proposed: their q is
    0, which keeps rejection sampling lossless. Without `d2t.json` the two vocabularies are one."""

    def __init__(self, d2t: list[int] | None, target_vocab_size: int):
        self.target_vocab_size = target_vocab_size
        self.d2t = None if d2t is None else torch.tensor(d2t, dtype=torch.long)
        if self.d2t is not None:
            self.size = len(d2t)
            self.t2d = torch.full((target_vocab_size,), self.size, dtype=torch.long)
            self.t2d[self.d2t] = torch.arange(self.size)

    @classmethod
    def load(cls, model_path: str, target_vocab_size: int) -> "DraftVocabulary":
        path = Path(model_path) / D2T_FILE
        return cls(json.loads(path.read_text()) if path.is_file() else None, target_vocab_size)

    def to_draft(self, ids: list[int]) -> list[int]:
        return ids if self.d2t is None else self.t2d[torch.tensor(ids, dtype=torch.long)].tolist()

    def draft_id(self, target_id: int | None) -> int | None:
        if self.d2t is None or target_id is None:
            return target_id
        draft_id = int(self.t2d[target_id])
        return draft_id if draft_id < self.size else None

    def proposable(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.d2t is None else logits[..., :self.size]

    def to_target(self, ids: torch.Tensor) -> torch.Tensor:
        return ids if self.d2t is None else self.d2t[ids]

    def expand(self, probs: torch.Tensor) -> torch.Tensor:
        """[b, draft vocab] -> [b, target vocab], zero outside the draft's vocabulary."""
        if self.d2t is None:
            return probs
        full = probs.new_zeros(probs.size(0), self.target_vocab_size)
        return full.index_copy_(1, self.d2t, probs)

    def place(self, device) -> None:
        """Keep the draft-to-target map where the drafts are drawn (t2d serves CPU id lists)."""
        if self.d2t is not None:
            self.d2t = self.d2t.to(device)


class DraftModel:
    """Draft model plus one RowKVCache per internal batch."""

    def __init__(self, runner: ModelRunner, eos_token_ids: tuple[int, ...], vocabulary: DraftVocabulary,
                 projection: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.runner = runner
        self.vocabulary = vocabulary
        vocabulary.place(runner.device)
        # A parallel draft (PARD) names its mask token in its config, as vLLM's parallel drafting reads it.
        self.mask_token_id = getattr(runner.model.config, PARALLEL_DRAFT_KEY, None)
        self.projection = projection  # (weight, bias) of a feature draft, else None
        self.eos_token_ids = tuple(filter(lambda i: i is not None, map(vocabulary.draft_id, eos_token_ids)))
        self.caches = [runner.new_cache() for _ in range(NUM_BATCH_SLOTS)]
        self.last_span = (0.0, 0.0)  # monotonic start and end of the last run (shared clock across processes)

    def run(self, work: DraftWork) -> Drafts:
        """Drafts every row up to its cap, or until its confidence runs out; `last_span` times it."""
        started = time.monotonic()
        drafts = self._draft(work)
        self.last_span = (started, time.monotonic())
        return drafts

    def _draft(self, work: DraftWork) -> Drafts:
        cache = self.caches[work.batch_slot]
        for src, dst, length in work.moves:
            cache.move_row(src, dst, length)
        rows, k = work.rows, work.num_tokens
        catch_up_started = time.monotonic()
        states = [self._states(r) for r in rows] if self.projection is not None else None
        lens = self._prefill_long_feeds(cache, rows, states)
        catch_up_seconds = time.monotonic() - catch_up_started
        feeds = [self.vocabulary.to_draft(r.feed[len(r.feed) - min(len(r.feed), 2):]) for r in rows]
        if states is not None:
            logits, next_logits = self._feature_drafting(cache, lens, feeds, rows, states)
        elif self.mask_token_id is None:
            logits = self.runner.forward(cache, slice(0, len(rows)), lens, feeds, last_only=True)
            lens = [n + len(f) for n, f in zip(lens, feeds)]
            def next_logits(j, tokens):
                nonlocal lens
                step = self.runner.forward(cache, slice(0, len(rows)), lens, [[t] for t in tokens.tolist()],
                                           last_only=True)
                lens = [n + 1 for n in lens]
                return step
        else:
            every_position = self._parallel_logits(cache, lens, feeds, k)
            logits = every_position[:, 0]
            def next_logits(j, tokens):
                return every_position[:, j]
        sampling = sampler.RowSampling.for_rows(rows, [r.num_eos_blocked for r in rows], k, self.eos_token_ids)
        # Each row brings uniforms for its own cap only: its draws never depend on its neighbours.
        uniforms = torch.tensor([r.uniforms[:k] + [0.0] * (k - len(r.uniforms[:k])) for r in rows],
                                dtype=torch.float32)
        caps = torch.tensor([r.max_tokens for r in rows])
        lengths = torch.zeros(len(rows), dtype=torch.long)
        confidence = torch.ones(len(rows))
        drafting = caps > 0
        all_greedy = bool((sampling.temperature == 0).all())
        ids, probs = [], []
        # Sampling runs on the draft's device; only ids (and sampled rows' q) leave it.
        device = self.runner.device
        device_sampling, uniforms = sampling.to(device), uniforms.to(device)
        for j in range(k):
            logits = self.vocabulary.proposable(logits)
            if all_greedy:  # ids suffice: no [b, V] probabilities to build and hand over
                tokens = sampler.greedy_tokens(logits[:, None], device_sampling.at(j))[:, 0]
            else:
                step_probs = sampler.processed_probs(logits[:, None], device_sampling.at(j))[:, 0]
                tokens = sampler.sample(step_probs, uniforms[:, j])
                probs.append(self.vocabulary.expand(step_probs))
            ids.append(self.vocabulary.to_target(tokens))
            # FlexDraft's cut on the draft's own (untempered) top-1 probabilities, so that greedy
            # rows, whose processed distribution is one-hot, are cut alike. Every row keeps its first
            # token: the step that drew it is paid for. Any cut is lossless: it depends on the
            # draft alone, and the target then samples the next token itself.
            if work.confidence_threshold > 0:  # with no cut, every confidence passes: skip the softmax
                confidence *= logits.softmax(-1).amax(-1).cpu()
                drafting &= (confidence >= work.confidence_threshold) | (j == 0)
            lengths[drafting] = j + 1
            drafting &= caps > j + 1
            if not drafting.any():  # the last draft never needs to be fed: its successor is the target's
                break
            logits = next_logits(j + 1, tokens)
        steps = int(lengths.max())  # a token drawn after every row stopped is no one's draft
        # A sequential draft fed its first steps - 1 drafts to its cache; a parallel one fed masks
        # there, and a feature draft fed its own guesses of the target's states, which the target's
        # real ones replace once verified.
        cached = steps - 1 if self.mask_token_id is None and self.projection is None else 0
        return Drafts(torch.stack(ids, 1)[:, :steps].cpu(), torch.stack(probs, 1)[:, :steps] if probs else None,
                      lengths.tolist(), catch_up_seconds, cached)

    def _feature_drafting(self, cache, lens: list[int], feeds: list[list[int]], rows: list[DraftRow],
                          states: list[torch.Tensor]):
        """EAGLE's drafting: each row feeds its pending tokens, each with the target's state at the
        position before; the draft's output state at the last one is its guess of the target's
        state there, whose logits give the first draft, and which is fed back with that draft to
        guess the next one."""
        states = [row_states[len(r.feed) - len(f):] for r, f, row_states in zip(rows, feeds, states)]
        feeds = [f or [0] for f in feeds]  # a placeholder row's token (see _states)
        logits, hidden = self.runner.forward(cache, slice(0, len(rows)), lens, feeds, last_only=True, with_hidden=True,
                                             embeds=list(map(self._pair_embeds, feeds, states)))
        lens = [n + len(f) for n, f in zip(lens, feeds)]

        def next_logits(j, tokens):
            nonlocal lens, hidden
            pairs = self._pair_embeds(tokens, hidden)
            # The feeds give only the rows' lengths here: the inputs are the pairs.
            step, hidden = self.runner.forward(cache, slice(0, len(rows)), lens, [[0]] * len(rows), last_only=True,
                                               with_hidden=True, embeds=list(pairs[:, None]))
            lens = [n + 1 for n in lens]
            return step
        return logits, next_logits

    def _states(self, row: DraftRow) -> torch.Tensor:
        """A row's states, one per fed token: [len(feed), H] (zeros before position 0). A row with
        nothing to feed (a newcomer whose prompt the target has not read yet; its cap is 0) feeds a
        placeholder, one zero state, that its cache length, kept by the engine, does not count."""
        state_size = self.projection[0].size(1) - self.runner.model.config.hidden_size  # the target's
        zeros = torch.zeros(1, state_size, device=self.runner.device, dtype=self.runner.model.dtype)
        if row.features is None:
            return zeros
        states = torch.from_numpy(row.features).to(self.runner.device, self.runner.model.dtype)
        if row.cached_len == 0:  # (a one-token prompt brings an empty array of no shape)
            states = torch.cat([zeros, states.reshape(-1, state_size)])
        return states

    def _pair_embeds(self, tokens, features: torch.Tensor) -> torch.Tensor:
        """A feature draft's input for (token, the target's state at the position before it): [n, H]."""
        tokens = torch.as_tensor(tokens, device=self.runner.device)
        weight, bias = self.projection
        return torch.nn.functional.linear(torch.cat([self.runner.model.get_input_embeddings()(tokens), features], -1),
                                          weight, bias)

    def _parallel_logits(self, cache, lens: list[int], feeds: list[list[int]], k: int) -> torch.Tensor:
        """PARD's drafting: each row feeds its pending tokens and k - 1 mask tokens in one forward; the
        logits at its last pending token and at each mask are q_1..q_k, [b, k, V]. None of them depends
        on the drafts drawn before it, which is still a proposal the rejection rule is exact for."""
        padded = [f + [self.mask_token_id] * (k - 1) for f in feeds]
        logits = self.runner.forward(cache, slice(0, len(feeds)), lens, padded)
        first = torch.tensor([len(f) - 1 for f in feeds], device=logits.device)
        positions = first[:, None] + torch.arange(k, device=logits.device)
        return logits[torch.arange(len(feeds), device=logits.device)[:, None], positions]

    def _prefill_long_feeds(self, cache, rows: list[DraftRow], states: list[torch.Tensor] | None) -> list[int]:
        """Rows that just joined feed their whole context: run it as a sub-batch so that the
        common one-or-two-token feeds of everyone else carry no padding. `states`: a feature
        draft's, per row."""
        long_rows = [i for i, r in enumerate(rows) if len(r.feed) > 2]
        lens = [r.cached_len for r in rows]
        if long_rows:
            feeds = [self.vocabulary.to_draft(rows[i].feed[:-2]) for i in long_rows]
            embeds = None
            if states is not None:
                embeds = [self._pair_embeds(f, states[i][:-2]) for i, f in zip(long_rows, feeds)]
            self.runner.fill(cache, long_rows, [lens[i] for i in long_rows], feeds, embeds=embeds)
            for i in long_rows:
                lens[i] += len(rows[i].feed) - 2
        return lens


def is_feature_draft(path: str) -> bool:
    return (Path(path) / FEATURE_PROJECTION_FILE).is_file()


def build_draft_model(path: str, device: str, dtype: str, num_rows: int, capacity: int, eos_token_ids,
                      target_vocab_size: int, quantization: str = "none") -> DraftModel:
    # torch's CPU weight-only kernels have fast code for bfloat16 activations only.
    dtype = "bfloat16" if quantization != "none" and device == "cpu" else dtype
    model = quantize_linears(load_model(path, device, dtype), quantization)
    projection = None
    if is_feature_draft(path):
        weights = load_file(Path(path) / FEATURE_PROJECTION_FILE, device=str(model.device))
        projection = (weights["weight"].to(model.dtype), weights["bias"].to(model.dtype))
    return DraftModel(ModelRunner(model, num_rows, capacity), eos_token_ids,
                      DraftVocabulary.load(path, target_vocab_size), projection)


class InlineDrafter:
    """Drafts in the engine's process: on CUDA in a thread of its own, on its own stream of
    draft_device (the step thread goes on to launch the verification); on CPU in the asking thread.
    A CPU thread beside the step thread has no cores of its own to overlap on, and its OpenMP team
    competes with the step thread's spinning one: the int4 draft's forward took 48 ms there against
    32 ms in the step thread (Qwen 0.5B, 2 threads)."""

    def __init__(self, draft_model: DraftModel):
        self.draft_model = draft_model
        device = draft_model.runner.device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="minedraft-draft") if self._stream else None
        self._pending = None
        self.last_span = (0.0, 0.0)
        self.reads_features = draft_model.projection is not None

    ready = True
    keeps_cache = True  # its draft cache holds what it was fed: only new tokens are fed again

    def start(self, work: DraftWork) -> None:
        if self._executor is None:
            self._pending = Future()
            try:
                self._pending.set_result(self.draft_model.run(work))
            except Exception as exc:  # reported by finish(), as a thread's failure would be
                self._pending.set_exception(exc)
            return
        # Draft with the asking thread's count: torch's thread count is per thread, and the engine
        # sets its own per step (flex, auto) while this pool thread would keep its first one.
        self._pending = self._executor.submit(self._run, work, torch.get_num_threads())

    def _run(self, work: DraftWork, threads: int) -> Drafts:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with torch.cuda.stream(self._stream):
            drafts = self.draft_model.run(work)
        self._stream.synchronize()
        return drafts

    def finish(self) -> Drafts:
        pending, self._pending = self._pending, None
        try:
            result = pending.result()
        except Exception as exc:
            raise DrafterError(f"drafting failed: {exc}") from exc
        self.last_span = self.draft_model.last_span
        return result

    def restart(self) -> None:
        self.draft_model.caches = [self.draft_model.runner.new_cache() for _ in range(NUM_BATCH_SLOTS)]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)


class ProcessDrafter:
    """Drafts in a worker process pinned to its own cores; results come back via shared memory.

    Every piece of work carries a number and the worker echoes it, so a reply left unread by a
    step that failed halfway is recognised and skipped instead of being taken for the next one.
    A (re)started worker loads its model in the background: until it says it is ready, `ready`
    is False and the engine decodes with the target alone."""

    keeps_cache = True

    def __init__(self, path, device, dtype, num_rows, capacity, eos_token_ids, vocab_size, max_tokens, cpus,
                 reply_timeout: float = 60.0, quantization: str = "none"):
        self._spec = (path, device, dtype, num_rows, capacity, list(eos_token_ids), vocab_size, sorted(cpus),
                      quantization)
        self.reads_features = is_feature_draft(path)
        self._ids_shape = (NUM_BATCH_SLOTS, num_rows, max_tokens)
        self._probs_shape = (NUM_BATCH_SLOTS, num_rows, max_tokens, vocab_size)
        self._ids_shm = SharedMemory(create=True, size=int(np.prod(self._ids_shape)) * 8)
        self._probs_shm = SharedMemory(create=True, size=int(np.prod(self._probs_shape)) * 4)
        self.ids = torch.frombuffer(self._ids_shm.buf, dtype=torch.int64).view(self._ids_shape)
        self.probs = torch.frombuffer(self._probs_shm.buf, dtype=torch.float32).view(self._probs_shape)
        self.reply_timeout = reply_timeout
        self.process = None
        self._conn = None
        self._is_ready = False
        self._respawn_at: float | None = None  # set while a failed worker waits out its back-off
        self._backoff = RESPAWN_BACKOFF_SECONDS[0]
        self._work: DraftWork | None = None
        self._work_number = 0
        self.last_span = (0.0, 0.0)
        self._spawn()
        self._wait_ready()

    def _spawn(self) -> None:
        # A plain `python -m minedraft.drafter_worker` child rather than multiprocessing's spawn: inside
        # Triton's python stub neither sys.executable nor __main__ is something spawn can re-run.
        parent_sock, child_sock = socket.socketpair()
        spec = json.dumps({"fd": child_sock.fileno(), "ids": self._ids_shm.name, "probs": self._probs_shm.name,
                           "ids_shape": self._ids_shape, "probs_shape": self._probs_shape, "model": self._spec})
        self.process = subprocess.Popen([python_executable(), "-m", "minedraft.drafter_worker", spec],
                                        pass_fds=[child_sock.fileno()])
        child_sock.close()
        self._conn = Connection(parent_sock.detach())
        self._is_ready = False

    def _wait_ready(self) -> None:
        while not self.ready:
            time.sleep(0.05)

    @property
    def ready(self) -> bool:
        """Whether the worker has loaded its model; raises DrafterError if it failed to."""
        if self._is_ready:
            return True
        if self._respawn_at is not None:
            if time.monotonic() < self._respawn_at:
                return False
            self._respawn_at = None
            self._spawn()
        if self._conn.poll(0):
            self._expect_reply(None, "starting the drafter")
            self._is_ready = True
            self._backoff = RESPAWN_BACKOFF_SECONDS[0]
        elif self.process.poll() is not None:
            raise DrafterError(f"drafter process died while starting (exit code {self.process.returncode})")
        return self._is_ready

    def start(self, work: DraftWork) -> None:
        self._work_number += 1
        self._work = work
        try:
            self._conn.send((self._work_number, work))
        except (BrokenPipeError, OSError) as exc:
            raise DrafterError(f"drafter process is gone: {exc}") from exc

    def finish(self) -> Drafts:
        work, self._work = self._work, None
        self.last_span, lengths, catch_up_seconds, has_probs, cached = self._expect_reply(self._work_number,
                                                                                           "drafting")
        b, steps = len(work.rows), max(lengths)
        probs = self.probs[work.batch_slot, :b, :steps] if has_probs else None
        return Drafts(self.ids[work.batch_slot, :b, :steps], probs, lengths, catch_up_seconds, cached)

    def _expect_reply(self, number: int | None, what: str):
        """The reply to work `number` (None: the start-up reply); older replies are skipped."""
        deadline = time.monotonic() + self.reply_timeout
        while True:
            while not wait_readable(self._conn, 0.5):
                if self.process.poll() is not None:
                    raise DrafterError(f"drafter process died while {what} (exit code {self.process.returncode})")
                if time.monotonic() > deadline:
                    raise DrafterError(f"drafter gave no reply in {self.reply_timeout:.0f} s while {what}")
            try:
                replied_to, status, detail = self._conn.recv()
            except (EOFError, OSError) as exc:
                raise DrafterError(f"drafter process died while {what}: {exc}") from exc
            if replied_to != number:
                continue  # a reply to stale work (a step that failed before reading it), error or not
            if status != "ok":
                raise DrafterError(f"drafter failed while {what}: {detail}")
            return detail

    def restart(self) -> None:
        """Replace the worker without waiting for its model to load (see `ready`). A worker that
        failed before it was ever ready is respawned after a back-off that doubles up to a minute."""
        failed_at_start = not self._is_ready
        self._stop_process(grace=0.5)
        self._is_ready = False
        if failed_at_start:
            self._respawn_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, RESPAWN_BACKOFF_SECONDS[1])
        else:
            self._spawn()

    def _stop_process(self, grace: float = 5.0) -> None:
        try:
            self._conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._conn.close()

    def close(self) -> None:
        self._stop_process()
        del self.ids, self.probs
        for shm in (self._ids_shm, self._probs_shm):
            shm.close()
            shm.unlink()


def wait_readable(conn: Connection, timeout: float) -> bool:
    """conn.poll(timeout), busy for the first SPIN_SECONDS (yielding to any other runnable thread)."""
    deadline = time.monotonic() + SPIN_SECONDS
    while time.monotonic() < deadline:
        if conn.poll(0):
            return True
        os.sched_yield()
    return conn.poll(timeout)


def python_executable() -> str:
    name = os.path.basename(sys.executable or "")
    if name.startswith("python"):
        return sys.executable
    candidate = os.path.join(sys.exec_prefix, "bin", "python3")
    return candidate if os.path.exists(candidate) else shutil.which("python3")
