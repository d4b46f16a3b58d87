"""Drafting in a worker process on its own cores (see ProcessDrafter); the worker is
worker.py. Each call sends a small control message through a pipe; draft ids and their
[b, k, V] probabilities come back through shared memory."""
import json
import socket
import subprocess
import time
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import torch

from minedraft.drafting.draft_model import is_feature_draft
from minedraft.drafting.drafter import NUM_BATCH_SLOTS, DrafterError, Drafts, DraftWork
from minedraft.model.kv_cache import PoolSpec
from minedraft.worker_process import python_executable, wait_readable

RESPAWN_BACKOFF_SECONDS = (1.0, 60.0)  # first and longest wait before respawning a worker that failed to start


class ProcessDrafter:
    """Drafts in a worker process pinned to its own cores; results come back via shared memory.

    Every piece of work carries a number and the worker echoes it, so a reply left unread by a
    step that failed halfway is recognised and skipped instead of being taken for the next one.
    A (re)started worker loads its model in the background: until it says it is ready, `ready`
    is False and the engine decodes with the target alone."""

    keeps_cache = True
    overlaps = True  # drafts on its own cores beside the target's verification

    def __init__(self, path, device, dtype, num_rows, capacity, eos_token_ids, vocab_size, max_tokens, cpus,
                 reply_timeout: float = 60.0, quantization: str = "none", enforce_eager: bool = True,
                 pool: PoolSpec | None = None, static_step_rows: tuple[int, ...] = ()):
        self._spec = (path, device, dtype, num_rows, capacity, list(eos_token_ids), vocab_size, sorted(cpus),
                      quantization, enforce_eager, pool and [pool.num_blocks, pool.block_size, pool.prefix_caching],
                      list(static_step_rows))
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
        # A plain `python -m minedraft.drafting.worker` child rather than multiprocessing's spawn: inside
        # Triton's python stub neither sys.executable nor __main__ is something spawn can re-run.
        parent_sock, child_sock = socket.socketpair()
        spec = json.dumps({"fd": child_sock.fileno(), "ids": self._ids_shm.name, "probs": self._probs_shm.name,
                           "ids_shape": self._ids_shape, "probs_shape": self._probs_shape, "model": self._spec})
        self.process = subprocess.Popen([python_executable(), "-m", "minedraft.drafting.worker", spec],
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
