"""Entry point of the drafter worker process started by ProcessDrafter."""
import json
import os
import sys
import traceback
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory

import torch

from minedraft.drafting.draft_model import build_draft_model
from minedraft.model.kv_cache import PoolSpec
from minedraft.worker_process import wait_readable


def _attach(name: str) -> SharedMemory:
    shm = SharedMemory(name=name)
    # The engine owns and unlinks the block; this process's resource tracker must not.
    resource_tracker.unregister(shm._name, "shared_memory")
    return shm


def _worker_main(spec: dict) -> None:
    (path, device, dtype, num_rows, capacity, eos_token_ids, vocab_size, cpus, quantization, enforce_eager,
     pool, static_step_rows) = spec["model"]
    conn = Connection(spec["fd"])
    ids_shape, probs_shape = tuple(spec["ids_shape"]), tuple(spec["probs_shape"])
    if cpus:
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(len(cpus))
    ids_shm, probs_shm = _attach(spec["ids"]), _attach(spec["probs"])
    ids = torch.frombuffer(ids_shm.buf, dtype=torch.int64).view(ids_shape)
    probs = torch.frombuffer(probs_shm.buf, dtype=torch.float32).view(probs_shape)
    try:
        draft_model = build_draft_model(path, device, dtype, num_rows, capacity, eos_token_ids, vocab_size,
                                        quantization, enforce_eager, pool and PoolSpec(*pool), tuple(static_step_rows))
        conn.send((None, "ok", None))
    except Exception:
        conn.send((None, "error", traceback.format_exc()))
        return
    while True:
        try:
            while not wait_readable(conn, None):
                pass
            work = conn.recv()
        except EOFError:
            break
        if work is None:
            break
        number, work = work
        try:
            drafts = draft_model.run(work)
            b, steps = drafts.ids.shape
            ids[work.batch_slot, :b, :steps] = drafts.ids
            if drafts.probs is not None:  # all-greedy work has none: its ids say everything
                probs[work.batch_slot, :b, :steps] = drafts.probs
            conn.send((number, "ok", (draft_model.last_span, drafts.lengths, drafts.catch_up_seconds,
                                      drafts.probs is not None, drafts.cached)))
        except Exception:
            conn.send((number, "error", traceback.format_exc()))
    del ids, probs
    ids_shm.close()
    probs_shm.close()


if __name__ == "__main__":
    _worker_main(json.loads(sys.argv[1]))
