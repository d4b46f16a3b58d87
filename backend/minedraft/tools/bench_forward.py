"""One model's forward in several set-ups side by side: eager (transformers) or compiled
(model/compact.py), each with its weights as loaded or weight-only quantized.

    python -m minedraft.tools.bench_forward [--model model_repository/minedraft/1/target] [--dtype float32]
        [--runners eager compiled compiled:int4 static] [--rows 1 8] [--tokens 1 5] [--as-draft]

A runner is `eager`, `compiled` or `static` (compiled, with a static step graph for each rows x
tokens measured: `compile_sizes`), with `:int8` or `:int4` (or, not static, `:w8a8`) for
quantization as `target_quantization` does it (a GGUF beside the model gives its published 4-bit
blocks), or as `draft_quantization` does it with `--as-draft` (pass `--dtype bfloat16`, as the
engine does for a quantized CPU draft). Times a step's forward at each number of rows (1 token: AR
or a draft step; k + 1 tokens: a verification) after a cache of `--context` tokens a row, and each
runner's load (quantizing and compiling included). Ratios are to the first runner. Prints JSON.
"""
import argparse
import json
import time

import torch

from minedraft.config import DEFAULT_MODEL_DIR, DTYPES, QUANTIZATIONS, STATIC_STEP_QUANTIZATIONS
from minedraft.model.loading import load_model
from minedraft.model.quantization import quantize_linears, quantize_target
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


RUNNER_KINDS = ("eager", "compiled", "static")


def load_runner(spec: str, model_path: str, dtype: str, num_rows: int, capacity: int,
                static_shapes: tuple[tuple[int, int], ...] = (), as_draft: bool = False) -> ModelRunner:
    """A runner of its own model copy: the compiled one packs its model's linear layers in place;
    `static` is the compiled one with static step graphs of `static_shapes` (`compile_sizes`).
    `as_draft`: quantized as `draft_quantization` does it (from the weights, not a GGUF's blocks)."""
    kind, _, quantization = spec.partition(":")
    model = load_model(model_path, "cpu", dtype)
    if quantization:
        if as_draft:
            quantize_linears(model, quantization)
        else:
            quantize_target(model, quantization, model_path)
    return ModelRunner(model, num_rows, capacity, enforce_eager=kind == "eager",
                       static_shapes=static_shapes if kind == "static" else ())


def runner_spec(text: str) -> str:
    kind, _, quantization = text.partition(":")
    if (kind not in RUNNER_KINDS or quantization not in ("", *QUANTIZATIONS[1:])
            or (kind == "static" and quantization not in ("", *STATIC_STEP_QUANTIZATIONS))):
        raise argparse.ArgumentTypeError(f"{text!r}: want eager, compiled or static, optionally :int8 or :int4 "
                                         f"(eager and compiled: or :w8a8)")
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR / "target"))
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--rows", type=int, nargs="+", default=[1])
    parser.add_argument("--runners", type=runner_spec, nargs="+", default=["eager", "compiled"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--as-draft", action="store_true",
                        help="quantize as draft_quantization does (min-max int4/int8, no GGUF blocks)")
    args = parser.parse_args(argv)
    capacity, num_rows = args.context + max(args.tokens) + 1, max(args.rows)
    report = {"model": args.model, "dtype": args.dtype, "as_draft": args.as_draft, "threads": torch.get_num_threads(),
              "load_s": {}, "forward_ms": []}
    runners = {}
    for spec in args.runners:
        started = time.monotonic()
        runners[spec] = load_runner(spec, args.model, args.dtype, num_rows, capacity,
                                    tuple((rows, tokens) for rows in args.rows for tokens in args.tokens),
                                    args.as_draft)
        report["load_s"][spec] = round(time.monotonic() - started, 1)
    caches = {spec: runner.new_cache() for spec, runner in runners.items()}
    first = args.runners[0]
    for rows in args.rows:
        for num_tokens in args.tokens:
            ms = {spec: round(time_forward(runner, caches[spec], rows, num_tokens, args.context, args.repeats), 2)
                  for spec, runner in runners.items()}
            report["forward_ms"].append({"rows": rows, "tokens": num_tokens, **ms,
                                         "ratio_to_first": {spec: round(ms[spec] / ms[first], 3)
                                                            for spec in args.runners[1:]}})
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
