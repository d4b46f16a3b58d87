"""Where flex and auto lose to a fixed mode: the same steps, timed in the fixed mode's engine and in the
two-batch engine that flex and auto run, forced to that mode (in-process, no server).

  python scripts/probe_forced_flex.py fixed forced --rounds 5                         # real pair, AR
  python scripts/probe_forced_flex.py fixed forced --pair toy --mode psd --k 4 --concurrency 4

Engines: fixed (the mode's own engine: AR and SD on `--fixed-cpus`, SD inline; PSD with its drafter
process on core 1); forced (flex forced to the mode and k, its layout and threads as
calibrated); forced_2t (... 2 threads for every step alone and prefill); forced_inline (... with no
worker process: an inline drafter, 2 threads). All are loaded in one process and measured in turn,
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

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"
PAIRS = {"real": (REPOSITORY / "smollm2" / "1", 8, "heldout_prompts.jsonl"),  # model dir, max_num_seqs, prompts
         "toy": (REPOSITORY / "minedraft" / "1", 32, "prompts.jsonl")}
ENGINES = ["fixed", "forced", "forced_2t", "forced_inline"]


def make_engine(name: str, pair: Path, per_batch: int, choice: Choice, fixed_cpus: str):
    if name == "fixed":
        cores = ({"target_cpus": "0", "draft_cpus": "1", "drafter": "process"} if choice.mode == "psd"
                 else {"target_cpus": fixed_cpus, "drafter": "inline"})
        in_flight = 2 * per_batch if choice.mode == "psd" else per_batch
        return engine_for(choice.mode, in_flight, max(choice.k, 1), pair, **cores)
    cores = ({"target_cpus": "0-1", "drafter": "inline"} if name == "forced_inline"
             else {"target_cpus": "0", "draft_cpus": "1", "drafter": "process"})
    engine = engine_for("flex", 2 * per_batch, max(choice.k, 1), pair, **cores)
    engine.policy.choice = choice  # the mode's layout too
    engine.policy.choose = lambda alphas: engine.policy.arm
    if name in ("forced_2t", "forced_inline"):
        table = engine.policy.costs.table
        table.threads_alone, table.threads_prefill = [2] * len(table.batch_sizes), 2
    return engine


def one_round(name, engine, prompts, args, profile: bool) -> dict:
    engine.step_log.clear()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile \
            else contextlib.nullcontext() as profiler:
        row = measure(engine, prompts, args.concurrency, args.k, args.max_tokens, 2 * args.concurrency)
    log = list(engine.step_log)
    mean_ms = lambda values: round(1000 * sum(values) / len(log), 1)  # noqa: E731
    result = {"engine": name, "tokens_per_s": row["tokens_per_s"], "steps": len(log),
              "rows_per_step": round(sum(r.verify_size for r in log) / len(log), 2),
              "verify_ms": mean_ms(r.verify_span[1] - r.verify_span[0] for r in log),
              "prefill_ms": mean_ms(r.prefill_seconds for r in log), "step_ms": mean_ms(r.seconds for r in log),
              "catch_up_ms": mean_ms(r.catch_up_seconds for r in log),
              "draft_ms": mean_ms(sum(run[2] for run in r.draft_runs) for r in log),
              "sequential_drafts": sum(not run[3] for r in log for run in r.draft_runs)}
    print(result, flush=True)
    if profile:
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engines", nargs="+", choices=ENGINES)
    parser.add_argument("--pair", choices=list(PAIRS), default="real")
    parser.add_argument("--mode", choices=["ar", "sd", "psd"], default="ar")
    parser.add_argument("--k", type=int, default=0, help="draft length (SD, PSD)")
    parser.add_argument("--fixed-cpus", default="0-1", help="the fixed AR or SD engine's cores")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    pair, per_batch, prompt_file = PAIRS[args.pair]
    prompts = load_prompts(pair / prompt_file)
    if args.pair == "real":
        prompts = chat_prompts(prompts, pair / "target")
    choice = Choice(args.mode, args.k if args.mode != "ar" else 0)
    engines = {name: make_engine(name, pair, per_batch, choice, args.fixed_cpus) for name in args.engines}
    results = {name: [] for name in engines}
    try:
        for engine in engines.values():
            measure(engine, prompts, 2, args.k, 8, 2)  # warm-up
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
