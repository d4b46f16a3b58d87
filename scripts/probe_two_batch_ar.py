"""Why flex and auto lose to AR at load on the real pair: the same AR steps, timed in the AR engine and
in the two-batch engine that flex and auto run (in-process, no server).

  python scripts/probe_two_batch_ar.py ar flex_ar_2t --rounds 5   # paired: the engines take turns

Engines: ar (the AR engine, max_num_seqs 8, 2 threads); flex_ar (flex forced to AR with AR's layout,
its threads as calibrated); flex_ar_2t (... 2 threads for every step and prefill); flex_inline (... with
no worker process: an inline drafter, 2 threads). All are loaded in one process and measured in turn,
round after round, so that the machine's drift (±20 % between one-off runs here) falls on each alike.
Prints each round's tokens/s and mean verification/prefill/step times, then each engine's median.
`--profile` adds torch.profiler's table of each engine's first round, by self CPU time.
"""
import argparse
import contextlib
import statistics
from pathlib import Path

import torch

from minedraft.cost_model import Choice
from minedraft.tools.bench_engine import chat_prompts, engine_for, load_prompts, measure

PAIR = Path(__file__).resolve().parents[1] / "model_repository" / "smollm2" / "1"
ENGINES = ["ar", "flex_ar", "flex_ar_2t", "flex_inline"]


def make_engine(name: str):
    if name == "ar":
        return engine_for("ar", 8, 2, PAIR, target_cpus="0-1")
    cores = ({"target_cpus": "0-1", "drafter": "inline"} if name == "flex_inline"
             else {"target_cpus": "0", "draft_cpus": "1", "drafter": "process"})
    engine = engine_for("flex", 16, 2, PAIR, **cores)
    engine.policy.choice = Choice("ar", 0)  # AR's layout too: fill the first batch
    engine.policy.choose = lambda alphas: (Choice("ar", 0), False)
    if name in ("flex_ar_2t", "flex_inline"):
        table = engine.policy.costs.table
        table.threads_alone, table.threads_prefill = [2] * len(table.batch_sizes), 2
    return engine


def one_round(name, engine, prompts, args, profile: bool) -> dict:
    engine.step_log.clear()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile \
            else contextlib.nullcontext() as profiler:
        row = measure(engine, prompts, args.concurrency, 2, args.max_tokens, 2 * args.concurrency)
    log = list(engine.step_log)
    mean_ms = lambda values: round(1000 * sum(values) / len(log), 1)  # noqa: E731
    result = {"engine": name, "tokens_per_s": row["tokens_per_s"], "steps": len(log),
              "rows_per_step": round(sum(r.verify_size for r in log) / len(log), 2),
              "verify_ms": mean_ms(r.verify_span[1] - r.verify_span[0] for r in log),
              "prefill_ms": mean_ms(r.prefill_seconds for r in log), "step_ms": mean_ms(r.seconds for r in log)}
    print(result, flush=True)
    if profile:
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engines", nargs="+", choices=ENGINES)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    prompts = chat_prompts(load_prompts(PAIR / "heldout_prompts.jsonl"), PAIR / "target")
    engines = {name: make_engine(name) for name in args.engines}
    results = {name: [] for name in engines}
    try:
        for engine in engines.values():
            measure(engine, prompts, 2, 2, 8, 2)  # warm-up
        for round_ in range(args.rounds):
            for name, engine in engines.items():
                results[name].append(one_round(name, engine, prompts, args, args.profile and round_ == 0))
    finally:
        for engine in engines.values():
            engine.close()
    for name, rows in results.items():
        print(name, "median tokens/s", statistics.median(r["tokens_per_s"] for r in rows),
              "median verify ms", statistics.median(r["verify_ms"] for r in rows))


if __name__ == "__main__":
    main()
