"""Why flex and auto lose to AR at load on the real pair: the same AR steps, timed in the AR engine and
in the two-batch engine that flex and auto run (in-process, no server).

  python scripts/probe_two_batch_ar.py ar            # the AR engine: max_num_seqs 8, 2 threads
  python scripts/probe_two_batch_ar.py flex_ar       # flex forced to AR, its threads as calibrated
  python scripts/probe_two_batch_ar.py flex_ar_2t    # ... with 2 threads for every step and prefill
  python scripts/probe_two_batch_ar.py flex_inline   # ... with no worker process (inline drafter), 2 threads

Prints tokens/s and the mean verification, prefill and step times per step.
"""
import argparse
from pathlib import Path

import torch

from minedraft.cost_model import Choice
from minedraft.tools.bench_engine import chat_prompts, engine_for, load_prompts, measure

PAIR = Path(__file__).resolve().parents[1] / "model_repository" / "smollm2" / "1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine", choices=["ar", "flex_ar", "flex_ar_2t", "flex_inline"])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    prompts = chat_prompts(load_prompts(PAIR / "heldout_prompts.jsonl"), PAIR / "target")
    if args.engine == "ar":
        engine = engine_for("ar", 8, 2, PAIR, target_cpus="0-1")
    else:
        cores = ({"target_cpus": "0-1", "drafter": "inline"} if args.engine == "flex_inline"
                 else {"target_cpus": "0", "draft_cpus": "1", "drafter": "process"})
        engine = engine_for("flex", 16, 2, PAIR, **cores)
        engine.policy.choice = Choice("ar", 0)  # AR's layout too: fill the first batch
        engine.policy.choose = lambda alphas: (Choice("ar", 0), False)
        if args.engine == "flex_ar_2t":
            table = engine.policy.costs.table
            table.threads_alone, table.threads_prefill = [2] * len(table.batch_sizes), 2
    try:
        measure(engine, prompts, 2, 2, 8, 2)  # warm-up
        engine.step_log.clear()
        row = measure(engine, prompts, args.concurrency, 2, args.max_tokens, 2 * args.concurrency)
        log = list(engine.step_log)
    finally:
        engine.close()
    mean_ms = lambda values: round(1000 * sum(values) / len(log), 1)  # noqa: E731
    print({"engine": args.engine, "tokens_per_s": row["tokens_per_s"], "steps": len(log),
           "rows_per_step": round(sum(r.verify_size for r in log) / len(log), 2),
           "verify_ms": mean_ms(r.verify_span[1] - r.verify_span[0] for r in log),
           "prefill_ms": mean_ms(r.prefill_seconds for r in log), "step_ms": mean_ms(r.seconds for r in log),
           "threads_at_end": torch.get_num_threads()})


if __name__ == "__main__":
    main()
