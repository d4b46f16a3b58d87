"""Tensor parallelism for the target (`tensor_parallel_size: N`): the engine's own process is
rank 0 and starts ranks 1..N-1 as worker processes (tensor_parallel_worker.py). Every rank loads
its shard through transformers' tensor-parallel plan (`DistributedConfig(tp_plan="auto")`: q/k/v
and gate/up column-wise, o/down row-wise) over torch.distributed (gloo on CPU, NCCL on CUDA).

TP is SPMD: each rank must run the same forward, whose all-reduces meet in the middle. So
`TensorParallelRunner` has ModelRunner's interface and, for every fill and forward, first sends
the call (method name and arguments, a few token lists) down each worker's pipe, then runs its own
shard; every worker runs the same call on its shard and acknowledges it. KV pools are per rank:
attention reshapes with -1 heads, so a rank's pool simply holds its own heads. Each rank keeps
the bookkeeping of its blocks itself, and all agree because every rank sees the same calls in
the same order: the forwards, and the engine's mutations of the target's caches (row moves,
releases, prefix attachments), which go through `ShardedCache` to the workers by cache id.
Logits come out whole on rank 0, where sampling and acceptance stay.

Failures: a worker that dies breaks the collective at once (gloo: "connection reset"); one that
hangs is caught by the process group's timeout and by the deadline on its acknowledgement; one
that raises says why on its pipe and exits. Each fails the call with a TensorParallelError naming
the rank, so the step fails and the serving loop ends the requests in flight. The next call
restarts every rank (a new process group, rank 0's shard reloaded); cache rows written before the
restart are refused, so no request can continue on a half-lost cache.
"""
import contextlib
import datetime
import json
import logging
import os
import signal
import socket
import subprocess
import time
from multiprocessing.connection import Connection

import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

from minedraft.model.kv_cache import BlockPool, PagedKVCache, PoolSpec
from minedraft.model.loading import TORCH_DTYPES
from minedraft.model.runner import ModelRunner
from minedraft.worker_process import free_port, python_executable, wait_readable

log = logging.getLogger("minedraft")

# How long a rank may be late for a collective or an acknowledgement before it counts as hung.
LOCKSTEP_TIMEOUT_SECONDS = 30.0
# Loading a shard reads the whole checkpoint on every rank: allow far longer than one step.
START_TIMEOUT_SECONDS = 600.0


class TensorParallelError(RuntimeError):
    """A rank died, hung or failed: the call's requests fail; the next call restarts the ranks."""


def rank_device(target_device: str, rank: int) -> str:
    """Rank r's device: the CPU, or the r-th GPU from `target_device`'s index (cuda = cuda:0)."""
    if target_device == "cpu":
        return "cpu"
    base = int(target_device.partition(":")[2] or 0)
    return f"cuda:{base + rank}"


def init_process_group(init_method: str, rank: int, world_size: int, device: str, timeout: float) -> None:
    """`timeout` bounds every collective: a rank that hangs fails its peers' calls after it."""
    dist.init_process_group("gloo" if device == "cpu" else "nccl", init_method=init_method, rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout))


def load_shard(path: str, device: str, dtype: str, world_size: int):
    """This rank's shard of the model, over the process group already initialised."""
    if device != "cpu":
        # transformers binds each rank to the GPU numbered LOCAL_RANK (its torchrun convention).
        os.environ["LOCAL_RANK"] = device.partition(":")[2]
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=TORCH_DTYPES[dtype], attn_implementation="sdpa",
        distributed_config=DistributedConfig(tp_plan="auto", tp_size=world_size))
    return model.eval()


class ShardedCache(PagedKVCache):
    """Rank 0's cache; its row mutations are mirrored on every worker's cache of the same id.

    `row_epochs` says after which restart of the ranks each row was written: a forward that
    continues a row (start > 0) written before the last restart would read keys the new workers
    never had."""

    def __init__(self, pool: BlockPool, num_rows: int, capacity: int, cache_id: int,
                 runner: "TensorParallelRunner"):
        super().__init__(pool, num_rows, capacity)
        self.cache_id = cache_id
        self._runner = runner
        self.row_epochs = [0] * num_rows

    def move_row(self, src: int, dst: int) -> None:
        super().move_row(src, dst)
        self.row_epochs[dst] = self.row_epochs[src]
        self._runner.mirror("move_row", self, src, dst)

    def take_row_from(self, other: "ShardedCache", src: int, dst: int) -> None:
        super().take_row_from(other, src, dst)
        self.row_epochs[dst] = other.row_epochs[src]
        self._runner.mirror("take_row_from", self, other.cache_id, src, dst)

    def release_rows(self, rows) -> None:
        rows = list(rows)
        super().release_rows(rows)
        self._runner.mirror("release_rows", self, rows)

    def attach_prefix(self, row: int, token_ids: list[int], max_tokens: int) -> int:
        matched = super().attach_prefix(row, token_ids, max_tokens)
        self._runner.mirror("attach_prefix", self, row, token_ids, max_tokens)
        return matched

    def commit(self, row: int, length: int) -> None:
        keyed = self.num_keyed_blocks(row)
        super().commit(row, length)
        if self.num_keyed_blocks(row) != keyed:  # every rank keys the same blocks: mirror only a change
            self._runner.mirror("commit", self, row, length)


class RankProcesses:
    """Workers for ranks 1..N-1: started, told what to run, acknowledged, checked, stopped."""

    def __init__(self, spec: dict, world_size: int):
        self.processes: list[subprocess.Popen] = []
        self.conns: list[Connection] = []
        self.pending = [0] * (world_size - 1)  # calls sent to each worker and not yet acknowledged
        self._number = 0
        for rank in range(1, world_size):
            parent_sock, child_sock = socket.socketpair()
            rank_spec = json.dumps({**spec, "rank": rank, "fd": child_sock.fileno(), "parent_pid": os.getpid()})
            # A plain `python -m` child, as the drafter's: inside Triton's stub, multiprocessing's spawn
            # cannot re-run the stub's __main__.
            self.processes.append(subprocess.Popen([python_executable(), "-m", "minedraft.model.tensor_parallel_worker",
                                                    rank_spec], pass_fds=[child_sock.fileno()]))
            child_sock.close()
            self.conns.append(Connection(parent_sock.detach()))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    @property
    def num_alive(self) -> int:
        return sum(p.poll() is None for p in self.processes)

    def send(self, message: tuple) -> None:
        self._number += 1
        for worker, conn in enumerate(self.conns):
            try:
                conn.send((self._number, *message))
            except OSError as exc:
                raise TensorParallelError(f"{self._describe(worker)} is gone: {exc}") from exc
            self.pending[worker] += 1

    def wait_acknowledged(self, what: str, timeout: float | None = None) -> None:
        """Every call sent so far has been run by every worker (within `timeout`, by default the
        lockstep's); else a TensorParallelError."""
        timeout = LOCKSTEP_TIMEOUT_SECONDS if timeout is None else timeout
        deadline = time.monotonic() + timeout
        for worker, conn in enumerate(self.conns):
            while self.pending[worker]:
                while not wait_readable(conn, 0.2):
                    if self.processes[worker].poll() is not None:
                        raise TensorParallelError(f"{self._describe(worker)} died during {what}")
                    if time.monotonic() > deadline:
                        raise TensorParallelError(f"{self._describe(worker)} gave no answer in {timeout:.0f} s "
                                                  f"during {what} (hung?)")
                try:
                    status, detail = conn.recv()[1:]
                except (EOFError, OSError):
                    # A dying process's pipe closes a moment before its exit status can be read:
                    # wait for it, so that the error names the signal or exit code.
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.processes[worker].wait(timeout=1.0)
                    raise TensorParallelError(f"{self._describe(worker)} died during {what}") from None
                if status != "ok":
                    raise TensorParallelError(f"{self._describe(worker)} failed during {what}: {detail}")
                self.pending[worker] -= 1

    def describe_failure(self, what: str) -> str:
        """Which worker broke a collective, once its exit or its error reply can be seen."""
        try:
            self.wait_acknowledged(what, timeout=2.0)
        except TensorParallelError as exc:
            return str(exc)
        return f"a collective failed during {what} with every worker answering"

    def _describe(self, worker: int) -> str:
        process = self.processes[worker]
        code = process.poll()
        if code is None:
            return f"tensor-parallel rank {worker + 1} (pid {process.pid})"
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        return f"tensor-parallel rank {worker + 1} (pid {process.pid}, {how})"

    def stop(self, grace: float = 5.0) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for process in self.processes:
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for conn in self.conns:
            conn.close()


class TensorParallelRunner:
    """ModelRunner's interface over N ranks of the target; rank 0's shard runs in this process."""

    def __init__(self, path: str, target_device: str, dtype: str, world_size: int, num_rows: int, capacity: int,
                 cpus: set[int], pool: PoolSpec):
        if dist.is_initialized():
            raise TensorParallelError("this process already belongs to a process group: one tensor-parallel "
                                      "engine per process")
        self.world_size = world_size
        self.num_rows = num_rows
        self.capacity = capacity
        self.pool_spec = pool
        self.pool = BlockPool(pool)
        self._spec = {"path": path, "device": target_device, "dtype": dtype, "world_size": world_size,
                      "num_rows": num_rows, "capacity": capacity, "cpus": sorted(cpus),
                      "pool": [pool.num_blocks, pool.block_size, pool.prefix_caching]}
        self._caches: list[ShardedCache] = []
        self.epoch = 0  # restarts of the ranks so far
        self.num_failures = 0
        self.ranks: RankProcesses | None = None
        self.local: ModelRunner | None = None
        self._start_ranks()

    # -- ModelRunner's interface ----------------------------------------------------------------
    @property
    def model(self):
        return self.local.model

    @property
    def device(self):
        return self.local.device

    @property
    def vocab_size(self) -> int:
        return self.local.vocab_size

    def new_cache(self) -> ShardedCache:
        # Workers create a cache the first time a call names its id.
        self._caches.append(ShardedCache(self.pool, self.num_rows, self.capacity, len(self._caches), self))
        return self._caches[-1]

    def fill(self, cache: ShardedCache, rows, start_lens: list[int], feeds: list[list[int]], **kwargs):
        return self._in_lockstep("fill", cache, rows, start_lens, feeds, **kwargs)

    def forward(self, cache: ShardedCache, rows, start_lens: list[int], feeds: list[list[int]], **kwargs):
        return self._in_lockstep("forward", cache, rows, start_lens, feeds, **kwargs)

    def close(self, grace: float = 5.0) -> None:
        """Stop the workers (a worker left behind would keep tritonserver from exiting)."""
        if self.ranks is not None:
            self.ranks.stop(grace)
            self.ranks = None
        if dist.is_initialized():
            dist.destroy_process_group()
        self.local = None

    # -- health, for metrics and tests --------------------------------------------------------------
    @property
    def num_workers_alive(self) -> int:
        return self.ranks.num_alive if self.ranks is not None else 0

    @property
    def worker_pids(self) -> list[int]:
        return self.ranks.pids if self.ranks is not None else []

    # -- inside ---------------------------------------------------------------------------------
    def mirror(self, method: str, cache: ShardedCache, *args) -> None:
        """A cache mutation on the workers; acknowledged with the next lockstep call. While the
        ranks are down there is nothing to mirror: the restarted workers start with empty caches."""
        if self.ranks is None:
            return
        try:
            self.ranks.send((method, cache.cache_id, args, {}))
        except TensorParallelError as exc:
            self._fail(exc)

    def _in_lockstep(self, method: str, cache: ShardedCache, rows, start_lens, feeds, **kwargs):
        if self.ranks is None:
            self._restart()
        row_ids = list(range(rows.start, rows.stop)) if isinstance(rows, slice) else [int(r) for r in rows]
        stale = [row for row, start in zip(row_ids, start_lens) if start > 0 and cache.row_epochs[row] != self.epoch]
        if stale:
            raise TensorParallelError(f"cache rows {stale} were written before the tensor-parallel ranks restarted; "
                                      "their requests must start over")
        try:
            self.ranks.send((method, cache.cache_id, (rows, start_lens, feeds), kwargs))
            result = getattr(self.local, method)(cache, rows, start_lens, feeds, **kwargs)
            self.ranks.wait_acknowledged(method)
        except TensorParallelError as exc:
            self._fail(exc)
        except RuntimeError as exc:  # the collective broke (gloo: connection reset; timeout): find out who
            self._fail(TensorParallelError(f"{self.ranks.describe_failure(method)} ({exc})"))
        except Exception as exc:  # rank 0's own shard failed: the workers wait in a collective it never joins
            self._fail(TensorParallelError(f"tensor-parallel rank 0 failed during {method}: "
                                           f"{type(exc).__name__}: {exc}"))
        for row in row_ids:
            cache.row_epochs[row] = self.epoch
        return result

    def _fail(self, exc: TensorParallelError):
        self.num_failures += 1
        log.error("tensor-parallel failure %d: %s; the ranks restart at the next call", self.num_failures, exc)
        self.close(grace=1.0)  # survivors of a broken collective may be stuck in it: little grace
        raise exc

    def _start_ranks(self) -> None:
        init_method = f"tcp://127.0.0.1:{free_port()}"  # rank 0 hosts the process group's store there
        spec = {**self._spec, "init_method": init_method, "timeout": LOCKSTEP_TIMEOUT_SECONDS}
        self.ranks = RankProcesses(spec, self.world_size)
        try:
            device = rank_device(self._spec["device"], 0)
            init_process_group(init_method, 0, self.world_size, device, LOCKSTEP_TIMEOUT_SECONDS)
            self.local = ModelRunner(load_shard(self._spec["path"], device, self._spec["dtype"], self.world_size),
                                     self.num_rows, self.capacity, pool=self.pool_spec)
            self.ranks.pending = [1] * (self.world_size - 1)  # each worker says when its shard is loaded
            self.ranks.wait_acknowledged("start-up", START_TIMEOUT_SECONDS)
        except Exception as exc:
            self.close()
            raise TensorParallelError(f"tensor-parallel ranks did not start: {exc}") from exc

    def _restart(self) -> None:
        """New ranks start with empty pools: so does rank 0's bookkeeping (its rows' requests fail)."""
        self.pool = BlockPool(self.pool_spec)
        for cache in self._caches:
            cache.reset(self.pool)
        self.epoch += 1
        log.info("restarting %d tensor-parallel ranks (restart %d)", self.world_size, self.epoch)
        self._start_ranks()
