"""Where the engine's steps run: the one owner, while serving, of the step thread's cores (the
builder sets cores and torch's thread count only for loading and the start-up calibration)."""
import os
import threading


class Placement:
    def __init__(self, step_cpus: set[int]):
        self.step_cpus = step_cpus  # target_cpus, if configured: where the step thread runs
        self._pinned_thread: int | None = None  # the thread that pin_step_thread pinned

    def pin_step_thread(self) -> None:
        """`target_cpus` binds the thread that runs steps, not the process: the server's own threads
        (requests in, responses out) stay free to run on another core, which served faster
        (docs/archive/benchmark-analysis.md)."""
        if self.step_cpus and self._pinned_thread != threading.get_ident():
            os.sched_setaffinity(0, self.step_cpus)
            self._pinned_thread = threading.get_ident()
