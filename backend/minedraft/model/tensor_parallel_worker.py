"""Entry point of a tensor-parallel worker (ranks 1..N-1), started by TensorParallelRunner.

It loads its shard, then runs whatever rank 0 sends down its pipe, in order, on its own shard and
caches, and acknowledges each call. It exits when rank 0 says so, when the pipe closes, when it
fails (rank 0's collective then breaks at once instead of timing out), and when its parent dies.
"""
import json
import os
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection

import torch

from minedraft.model.kv_cache import PoolSpec
from minedraft.model.runner import ModelRunner
from minedraft.model.tensor_parallel import init_process_group, load_shard, rank_device

PARENT_CHECK_SECONDS = 0.5
CACHE_MUTATIONS = ("move_row", "release_rows", "attach_prefix", "commit")


def _exit_with_parent(parent_pid: int) -> None:
    """A worker must never outlive the engine: a killed tritonserver stub closes no pipe that a
    worker busy loading or stuck in a collective would notice. Reparented means orphaned."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(1)


def _serve(conn: Connection, runner: ModelRunner) -> None:
    caches = {}

    def cache(cache_id: int):  # created the first time rank 0 names it, as rank 0's are on first use
        if cache_id not in caches:
            caches[cache_id] = runner.new_cache()
        return caches[cache_id]
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        number, method, cache_id, args, kwargs = message
        try:
            if method == "take_row_from":
                other_id, *rest = args
                cache(cache_id).take_row_from(cache(other_id), *rest)
            elif method in CACHE_MUTATIONS:
                getattr(cache(cache_id), method)(*args)
            else:  # fill or forward: rank 0 keeps the outputs, this rank only takes part in the collectives
                getattr(runner, method)(cache(cache_id), *args, **kwargs)
            conn.send((number, "ok", None))
        except Exception:
            conn.send((number, "error", traceback.format_exc()))
            return


def _worker_main(spec: dict) -> None:
    threading.Thread(target=_exit_with_parent, args=(spec["parent_pid"],), daemon=True).start()
    conn = Connection(spec["fd"])
    if spec["cpus"]:
        os.sched_setaffinity(0, spec["cpus"])
        torch.set_num_threads(len(spec["cpus"]))
    try:
        device = rank_device(spec["device"], spec["rank"])
        init_process_group(spec["init_method"], spec["rank"], spec["world_size"], device, spec["timeout"])
        runner = ModelRunner(load_shard(spec["path"], device, spec["dtype"], spec["world_size"]),
                             spec["num_rows"], spec["capacity"], pool=PoolSpec(*spec["pool"]))
        conn.send((0, "ok", None))
    except Exception:
        conn.send((0, "error", traceback.format_exc()))
        return
    _serve(conn, runner)


if __name__ == "__main__":
    _worker_main(json.loads(sys.argv[1]))
