"""Drafting in the engine's process (see InlineDrafter)."""
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from minedraft.drafting.draft_model import DraftModel
from minedraft.drafting.drafter import DrafterError, Drafts, DraftWork


class InlineDrafter:
    """Drafts in the engine's process: on CUDA in a thread of its own, on its own stream of
    draft_device (the step thread goes on to launch the verification); on CPU in the asking thread:
    a CPU thread beside the step thread has no cores of its own to overlap on, and the draft ran
    slower there (docs/qwen-coder.md)."""

    def __init__(self, draft_model: DraftModel):
        self.draft_model = draft_model
        device = draft_model.runner.device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="minedraft-draft") if self._stream else None
        self._pending = None
        self.last_span = (0.0, 0.0)
        self.reads_features = draft_model.reads_features
        self.overlaps = self._executor is not None  # drafts beside the target's verification (CUDA only)

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
        # Draft with the asking thread's count: torch's thread count is per thread, so this pool
        # thread would otherwise keep torch's default rather than the count the builder set.
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
        for cache in self.draft_model.caches:
            cache.reset()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
