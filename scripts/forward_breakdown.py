"""Where a batch-1 forward of the target spends its time on this CPU, and what a compiled forward
would change. Three measurements, in one run:

1. the forward's operator profile (torch.profiler): the share of aten::mm (the weight reads);
2. a GEMV against a plain streaming read of the same weight matrix (the LM head's shape): how
   close the BLAS's matrix-vector product comes to the machine's read bandwidth;
3. with --compile: torch.compile (inductor, dynamic shapes) of the forward against eager at a few
   (rows, new tokens) shapes, with each shape's first call (the compile) timed.

  python scripts/forward_breakdown.py [--target DIR] [--threads 1] [--compile]
"""
import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from minedraft.model_runner import ModelRunner, load_model

TARGET = Path(__file__).resolve().parents[1] / "model_repository" / "smollm2" / "1" / "target"
CONTEXT = 64
SHAPES = ((1, 1), (1, 3), (4, 1), (4, 3), (8, 2))


def operator_shares(runner: ModelRunner) -> dict:
    cache = runner.new_cache()
    runner.fill(cache, [0], [0], [[1] * CONTEXT])
    for _ in range(3):
        runner.forward(cache, [0], [CONTEXT], [[5]])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            runner.forward(cache, [0], [CONTEXT], [[5]])
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:5]
    return {"forward_ms": round(total / 10 / 1e3, 2),
            "shares": {e.key: round(e.self_cpu_time_total / total, 3) for e in top}}


def gemv_against_streaming(rows: int, cols: int) -> dict:
    weights, x = torch.randn(rows, cols), torch.randn(1, cols)

    def best(fn):
        fn()
        return min(_timed(fn) for _ in range(20))
    gemv, read = best(lambda: torch.nn.functional.linear(x, weights)), best(lambda: weights.sum())
    size = weights.numel() * 4
    return {"matrix": [rows, cols], "gemv_gb_s": round(size / gemv / 1e9, 1), "read_gb_s": round(size / read / 1e9, 1)}


def shape_costs(runner: ModelRunner) -> dict:
    cache = runner.new_cache()
    runner.fill(cache, slice(0, 8), [0] * 8, [[1] * CONTEXT] * 8)
    costs = {}
    for rows, new in SHAPES:
        def step():
            runner.forward(cache, slice(0, rows), [CONTEXT] * rows, [[5] * new] * rows)
        first = _timed(step)
        costs[f"{rows}x{new}"] = {"first_s": round(first, 2),
                                  "median_ms": round(statistics.median(_timed(step) for _ in range(7)) * 1e3, 1)}
    return costs


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, default=TARGET)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes per shape here)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(str(args.target), "cpu", "float32")
    runner = ModelRunner(model, 8, CONTEXT + 8)
    print("operator profile, batch 1, one new token:", operator_shares(runner))
    print("GEMV vs streaming read, LM head shape:", gemv_against_streaming(model.config.vocab_size, model.config.hidden_size))
    if args.compile:
        eager = shape_costs(runner)
        runner.model = torch.compile(model, dynamic=True)
        compiled = shape_costs(runner)
        for shape in eager:
            print(f"{shape}: eager {eager[shape]['median_ms']} ms, compiled {compiled[shape]['median_ms']} ms "
                  f"(x{compiled[shape]['median_ms'] / eager[shape]['median_ms']:.3f}), "
                  f"first compiled call {compiled[shape]['first_s']} s")


if __name__ == "__main__":
    main()
