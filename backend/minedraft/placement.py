"""Where the engine's steps run: the one owner, while serving, of the step thread's cores and of
torch's thread count (the builder sets them only for loading and the start-up calibration)."""
import os
import threading

import torch


class Placement:
    def __init__(self, step_cpus: set[int], thread_cpus: dict[int, set[int]] | None, policy):
        self.step_cpus = step_cpus  # target_cpus, if configured: where the step thread runs
        self.thread_cpus = thread_cpus  # per thread count, the cores a step at that count may use (flex per step)
        self.policy = policy  # says each step's count (None: as configured at start-up)
        self._pinned_thread: int | None = None  # the thread that pin_step_thread pinned
        self._threads: int | None = None  # the count set_threads last applied (calibration leaves its own)

    def pin_step_thread(self) -> None:
        """`target_cpus` binds the thread that runs steps, not the process: the server's own threads
        (requests in, responses out) stay free to run on another core. Pinned beside the target,
        they held flex per step to 43.4 tokens/s at 8 requests on the real pair; free, 50.1 (one
        run each, docs/archive/benchmark-analysis.md)."""
        if self.step_cpus and self._pinned_thread != threading.get_ident():
            os.sched_setaffinity(0, self.step_cpus)
            self._pinned_thread, self._threads = threading.get_ident(), None

    def set_threads(self, plan, prefill: bool = False) -> None:
        threads = self.policy.threads(plan, prefill)
        if threads is None or threads == self._threads:
            return
        if self.thread_cpus:
            # The count alone is not enough: a one-thread step beside the drafter would still be
            # free to run on the drafter's core. Cores before count, so that a pool widened now
            # starts its worker threads with every core allowed.
            os.sched_setaffinity(0, self.thread_cpus[threads])
        torch.set_num_threads(threads)
        self._threads = threads
