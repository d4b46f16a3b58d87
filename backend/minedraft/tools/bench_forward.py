"""One model's forward, eager (transformers) against compiled (model/compact.py), side by side.

    python -m minedraft.tools.bench_forward [--model model_repository/minedraft/1/target] [--dtype float32]

Times a step's forward at one row (1 token: AR or a draft step; k + 1 tokens: a verification)
after a cache of `--context` tokens, and the compile at load. Prints JSON.
"""
import argparse
import json
import time

import torch

from minedraft.config import DEFAULT_MODEL_DIR, DTYPES
from minedraft.model.loading import load_model
from minedraft.model.runner import ModelRunner


def time_forward(runner: ModelRunner, cache, num_tokens: int, context: int, repeats: int) -> float:
    """Mean milliseconds of one forward of `num_tokens` at one row after `context` cached tokens."""
    feeds = [[1] * num_tokens]
    for _ in range(3):
        runner.forward(cache, slice(0, 1), [context], feeds)
    started = time.perf_counter()
    for _ in range(repeats):
        runner.forward(cache, slice(0, 1), [context], feeds)
    return (time.perf_counter() - started) / repeats * 1000


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR / "target"))
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    model = load_model(args.model, "cpu", args.dtype)
    capacity = args.context + max(args.tokens) + 1
    eager = ModelRunner(model, 1, capacity)
    started = time.monotonic()
    compiled = ModelRunner(model, 1, capacity, enforce_eager=False)
    report = {"model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(),
              "compile_s": round(time.monotonic() - started, 1), "forward_ms": []}
    eager_cache, compiled_cache = eager.new_cache(), compiled.new_cache()
    for num_tokens in args.tokens:
        eager_ms = time_forward(eager, eager_cache, num_tokens, args.context, args.repeats)
        compiled_ms = time_forward(compiled, compiled_cache, num_tokens, args.context, args.repeats)
        report["forward_ms"].append({"tokens": num_tokens, "eager": round(eager_ms, 2),
                                     "compiled": round(compiled_ms, 2), "ratio": round(compiled_ms / eager_ms, 3)})
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
