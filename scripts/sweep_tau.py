"""FlexDraft's confidence cut (draft_confidence_threshold, τ) on the real pair, in-process: SD at k = 4
on one core with each τ, and AR on both cores beside it, measured in turn round after round so that
the machine's drift falls on each alike.

  python scripts/sweep_tau.py --taus 0 0.1 0.3 0.5 --concurrency 1 8 --rounds 2

Prints, per concurrency and τ, the median tokens/s over the rounds, its ratio to τ = 0 and to AR,
the last round's acceptance rate and drafted tokens per output token.
"""
import argparse
import statistics
from pathlib import Path

from minedraft.tools.bench_engine import chat_prompts, engine_for, load_prompts, measure

PAIR = Path(__file__).resolve().parents[1] / "model_repository" / "smollm2" / "1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--taus", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.5])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    prompts = chat_prompts(load_prompts(PAIR / "heldout_prompts.jsonl"), PAIR / "target")
    sd = engine_for("sd", max(args.concurrency), args.draft_tokens, PAIR, target_cpus="0", drafter="inline")
    ar = engine_for("ar", max(args.concurrency), 0, PAIR, target_cpus="0-1")
    rows = {}  # (concurrency, τ or "ar") -> [measure() rows]
    try:
        for engine in (sd, ar):
            measure(engine, prompts, 2, args.draft_tokens, 8, 2)  # warm-up
        for _ in range(args.rounds):
            for c in args.concurrency:
                requests = max(8, 2 * c)
                for tau in args.taus:
                    sd.drafting.confidence_threshold = tau  # read into each drafting's work
                    rows.setdefault((c, tau), []).append(
                        measure(sd, prompts, c, args.draft_tokens, args.max_tokens, requests))
                    print((c, tau), rows[(c, tau)][-1], flush=True)
                rows.setdefault((c, "ar"), []).append(measure(ar, prompts, c, 0, args.max_tokens, requests))
                print((c, "ar"), rows[(c, "ar")][-1], flush=True)
    finally:
        sd.close()
        ar.close()
    median = lambda key: round(statistics.median(r["tokens_per_s"] for r in rows[key]), 2)  # noqa: E731
    print("| c | τ | tokens/s | / τ=0 | / AR 2 threads | acceptance | drafted per output token |")
    print("|---|---|---|---|---|---|---|")
    for c in args.concurrency:
        for tau in args.taus:
            runs = rows[(c, tau)]
            drafted, accepted_rate = sum(r["drafted_tokens"] for r in runs), runs[-1]["acceptance_rate"]
            print(f"| {c} | {tau} | {median((c, tau))} | {median((c, tau)) / median((c, args.taus[0])):.3f} | "
                  f"{median((c, tau)) / median((c, 'ar')):.3f} | {accepted_rate} | "
                  f"{drafted / sum(r['output_tokens'] for r in runs):.2f} |")
        print(f"| {c} | AR | {median((c, 'ar'))} | – | 1.000 | – | – |")


if __name__ == "__main__":
    main()
