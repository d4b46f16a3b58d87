"""One model's forward, eager (transformers) against compiled (model/compact.py), side by side.

    python -m minedraft.tools.bench_forward [--model model_repository/minedraft/1/target] [--dtype float32]
        [--quantization int4] [--rows 1 8] [--tokens 1 5]

Times a step's forward at each number of rows (1 token: AR or a draft step; k + 1 tokens: a
verification) after a cache of `--context` tokens a row, and the compile at load. Prints JSON.
"""
import argparse
import json
import time

import torch

from minedraft.config import DEFAULT_MODEL_DIR, DTYPES, QUANTIZATIONS
from minedraft.model.loading import load_model
from minedraft.model.quantization import quantize_linears
from minedraft.model.runner import ModelRunner


def time_forward(runner: ModelRunner, cache, num_rows: int, num_tokens: int, context: int, repeats: int) -> float:
    """Mean milliseconds of one forward of `num_tokens` a row after `context` cached tokens."""
    feeds = [[1] * num_tokens] * num_rows
    for _ in range(3):
        runner.forward(cache, slice(0, num_rows), [context] * num_rows, feeds)
    started = time.perf_counter()
    for _ in range(repeats):
        runner.forward(cache, slice(0, num_rows), [context] * num_rows, feeds)
    return (time.perf_counter() - started) / repeats * 1000


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR / "target"))
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--rows", type=int, nargs="+", default=[1])
    parser.add_argument("--quantization", default="none", choices=QUANTIZATIONS)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    capacity, num_rows = args.context + max(args.tokens) + 1, max(args.rows)

    def load():  # a copy for each runner: the compiled one packs its model's linear layers in place
        return quantize_linears(load_model(args.model, "cpu", args.dtype), args.quantization)

    eager = ModelRunner(load(), num_rows, capacity)
    started = time.monotonic()
    compiled = ModelRunner(load(), num_rows, capacity, enforce_eager=False)
    report = {"model": args.model, "dtype": args.dtype, "quantization": args.quantization,
              "threads": torch.get_num_threads(), "compile_s": round(time.monotonic() - started, 1), "forward_ms": []}
    eager_cache, compiled_cache = eager.new_cache(), compiled.new_cache()
    for rows in args.rows:
        for num_tokens in args.tokens:
            eager_ms = time_forward(eager, eager_cache, rows, num_tokens, args.context, args.repeats)
            compiled_ms = time_forward(compiled, compiled_cache, rows, num_tokens, args.context, args.repeats)
            report["forward_ms"].append({"rows": rows, "tokens": num_tokens, "eager": round(eager_ms, 2),
                                         "compiled": round(compiled_ms, 2),
                                         "ratio": round(compiled_ms / eager_ms, 3)})
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
