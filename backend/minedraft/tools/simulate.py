"""`minedraft simulate`: predict throughput and latency of AR, SD, PSD and flex from step costs.

A first-order, closed-loop model for planning deployments (docs/simulator.md): `concurrency`
clients each keep one request in flight; every request decodes `max_tokens` tokens after a
prompt of `prompt_tokens`. One step's cost and yield come from cost_model.estimate; on top of
it this module adds prefill, the engine's row cap (queueing) and the latencies. It assumes:

- acceptance is geometric with one per-token rate alpha for every row and position;
- steps are deterministic (no queueing noise, no stragglers, every row always busy);
- prefill runs on the target, serialised with decoding: each request adds
  prompt_tokens * prefill_per_token of target time, which also holds up every other row;
- PSD's step is max(verify, draft) (cost_model): the drafter fully overlaps the target, as on a
  second device or core.

Pure Python (no torch), so operators can plan anywhere.
"""
import argparse
import json
import sys
from pathlib import Path

from minedraft.policy.cost_model import (
    Choice,
    StepCosts,
    estimate,
    expected_tokens,
    rank,
)

from .setups import best_by_tokens_per_s

# Benchmark set-ups that the costs file describes: the target on one core, the drafter
# (PSD) on the other. The 2-thread set-ups `ar` and `sd` run at other step costs.
SETUP_MODES = {"ar_1core": "ar", "sd_1core": "sd", "psd": "psd", "flex": "flex"}
NOT_MODELLED = ("ar", "sd")
DEFAULT_PROMPT_TOKENS = 64  # about the bench prompts' mean (63 tokens)


def predict_choice(costs: StepCosts, choice: Choice, alpha: float, concurrency: int, rows: int,
                   max_tokens: int, prompt_tokens: float, batch_capacity: int | None = None) -> dict:
    """Steady state of `concurrency` requests of which `rows` are in the engine (the rest queue).

    Every row decodes E(k) tokens per verification; a PSD row is verified every other step.
    While the rows each finish one request, the engine decodes rows * max_tokens tokens at the
    batch's rate and the target also runs rows prefills, so throughput is max_tokens per
    (max_tokens * batch seconds per token + one prefill). End-to-end latency follows from
    Little's law; it includes the wait for a row when concurrency exceeds the row cap. TTFT is
    that wait, the request's prefill and one step; ITL is decoding only (no other prefills)."""
    step = estimate(choice, rows * expected_tokens(alpha, choice.k), rows, costs, batch_capacity,
                    prompt_tokens / max_tokens)  # speculation also pays the draft's prefill of each request
    prefill = prompt_tokens * costs.prefill_per_token
    seconds_per_token = step.step_seconds / step.tokens_per_step  # batch-wide, decoding only
    tokens_per_s = max_tokens / (max_tokens * seconds_per_token + prefill)
    e2e = concurrency * max_tokens / tokens_per_s  # Little's law
    queue_wait = (concurrency - rows) * max_tokens / tokens_per_s
    steps_per_verification = 2 if choice.mode == "psd" else 1
    return {"mode": choice.mode, "k": choice.k, "choice": str(choice), "concurrency": concurrency, "rows": rows,
            "tokens_per_s": tokens_per_s, "e2e_ms": 1e3 * e2e,
            "ttft_ms": 1e3 * (queue_wait + prefill + step.step_seconds),
            "itl_ms": 1e3 * steps_per_verification * step.step_seconds / expected_tokens(alpha, choice.k),
            "step_ms": 1e3 * step.step_seconds}


def predict(costs: StepCosts, alpha: float, concurrency: int, max_tokens: int, prompt_tokens: float,
            k_values, max_num_seqs: int | None = None) -> list[dict]:
    """AR, SD(k) and PSD(k) for each k, then flex: the best candidate by cost_model.rank.

    max_num_seqs caps the rows per internal batch as the engine does (None: no cap); PSD holds
    two batches, and so does flex (it must be able to switch to PSD), so both get twice the cap.
    At concurrency 1 there is no second request to overlap with: PSD runs as sequential SD,
    and its entries repeat SD's with a note saying so."""
    k_values = sorted(set(k_values))
    if k_values and (k_values[0] < 1 or k_values[-1] > costs.max_k):
        # StepCosts clamps k to its table, which would silently under-cost longer drafts.
        raise ValueError(f"draft lengths must be in 1..{costs.max_k} (the costs' verify table)")
    if costs.verify_seconds(1, 0) <= 0:
        raise ValueError("step costs: verify times must be positive")
    one, two = _rows(concurrency, max_num_seqs, 1), _rows(concurrency, max_num_seqs, 2)

    def run(choice, rows):
        return predict_choice(costs, choice, alpha, concurrency, rows, max_tokens, prompt_tokens, max_num_seqs)

    results = [run(Choice("ar", 0), one)] + [run(Choice("sd", k), one) for k in k_values]
    for k in k_values:
        if concurrency >= 2:
            results.append(run(Choice("psd", k), two))
        else:
            results.append({**run(Choice("sd", k), one), "mode": "psd", "choice": str(Choice("psd", k)),
                            "note": "concurrency 1: PSD runs as sequential SD"})
    if k_values:
        goodputs = rank([alpha] * two, costs, k_values[-1], max_num_seqs, prompt_per_output=prompt_tokens / max_tokens)
        pick = max(goodputs, key=goodputs.get)
        results.append({**run(pick, two), "mode": "flex", "choice": str(pick)})
    return results


def _rows(concurrency: int, max_num_seqs: int | None, batches: int) -> int:
    return concurrency if max_num_seqs is None else min(concurrency, batches * max_num_seqs)


def best(results: list[dict], mode: str) -> dict | None:
    return best_by_tokens_per_s([r for r in results if r["mode"] == mode])


# --- prediction error against a benchmark's raw.json -------------------------------------

def acceptance_rate(alpha: float, k: int) -> float:
    """The engine's acceptance rate (accepted / drafted) under geometric acceptance:
    a verification accepts E(k) - 1 of the k drafts on average (E counts the target's own token)."""
    return (expected_tokens(alpha, k) - 1) / k


def fit_alpha(rate: float, k: int) -> float:
    """Invert acceptance_rate by bisection (it rises monotonically from 0 to 1 in alpha)."""
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if acceptance_rate(mid, k) < rate else (low, mid)
    return (low + high) / 2


def compare(costs: StepCosts, raw: dict, prompt_tokens: float) -> dict:
    """Predicted vs measured tokens/s (and e2e latency) for each benchmark row the costs describe.

    Each SD/PSD row gets the alpha that reproduces its measured acceptance at its k; a flex row
    (k = the longest draft allowed; flex picks its own k) gets the alpha fitted at that k and
    the flex prediction over k = 1..k. The engine's row cap comes from the bench's max_num_seqs."""
    args = raw.get("args", {})
    rows = []
    for row in raw["rows"]:
        mode = SETUP_MODES.get(row["setup"])
        # A point without a measured rate (no steady span) has nothing to compare against.
        if mode is None or (mode != "ar" and row.get("acceptance_rate") is None) or not row["tokens_per_s"]:
            continue
        k = row["num_draft_tokens"]
        alpha = 0.0 if mode == "ar" else fit_alpha(row["acceptance_rate"], k)
        k_values = range(1, k + 1) if mode == "flex" else [k] if k else []
        results = predict(costs, alpha, row["concurrency"], args.get("max_tokens", 48), prompt_tokens, k_values,
                          args.get("max_num_seqs"))
        predicted = next(r for r in results if r["mode"] == mode and (mode == "flex" or r["k"] == k))
        measured = row["tokens_per_s"]
        rows.append({"setup": row["setup"], "mode": mode, "k": k, "concurrency": row["concurrency"],
                     "alpha": None if mode == "ar" else round(alpha, 4), "choice": predicted["choice"],
                     "predicted_tokens_per_s": round(predicted["tokens_per_s"], 2), "measured_tokens_per_s": measured,
                     "error": round((predicted["tokens_per_s"] - measured) / measured, 4),
                     "predicted_e2e_ms": round(predicted["e2e_ms"], 1), "measured_e2e_p50_ms": row.get("e2e_p50_ms")})
    errors = {}
    for r in rows:
        errors.setdefault(r["mode"], []).append(abs(r["error"]))
    return {"prompt_tokens": round(prompt_tokens, 2), "rows": rows,
            "mean_abs_error": {mode: round(sum(e) / len(e), 4) for mode, e in errors.items()},
            "not_modelled": sorted({r["setup"] for r in raw["rows"] if r["setup"] in NOT_MODELLED})}


# --- CLI ----------------------------------------------------------------------------------

def parse_draft_lengths(values: list[str]) -> list[int]:
    """`1..8` (inclusive range) or plain numbers, mixable: `1..4 6 8`."""
    lengths = set()
    for value in values:
        low, _, high = value.partition("..")
        lengths.update(range(int(low), int(high or low) + 1))
    return sorted(lengths)


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def prediction_table(results: list[dict]) -> str:
    """Per concurrency: AR, the best SD and PSD over the draft lengths, and flex's pick."""
    rows = []
    for c in sorted({r["concurrency"] for r in results}):
        at_c = [r for r in results if r["concurrency"] == c]
        ar, sd, psd, flex = (best(at_c, mode) for mode in ("ar", "sd", "psd", "flex"))
        row = [c, ar["tokens_per_s"], ar["e2e_ms"]]
        for top, label in ((sd, "k"), (psd, "k"), (flex, "choice")):
            row += [top["tokens_per_s"], top["e2e_ms"], top[label]] if top else [None] * 3
        rows.append(row)
    return table(["c", "AR tok/s", "e2e ms", "SD tok/s", "e2e ms", "k", "PSD tok/s", "e2e ms", "k",
                  "flex tok/s", "e2e ms", "choice"], rows)


def comparison_table(result: dict) -> str:
    rows = [[r["setup"], r["k"], r["concurrency"], r["alpha"] and f"{r['alpha']:.3f}", r["choice"],
             r["predicted_tokens_per_s"], r["measured_tokens_per_s"], f"{100 * r['error']:+.1f}%",
             r["predicted_e2e_ms"], r["measured_e2e_p50_ms"]] for r in result["rows"]]
    text = table(["setup", "k", "c", "alpha", "predicted as", "pred tok/s", "meas tok/s", "error",
                  "pred e2e ms", "meas e2e p50"], rows)
    summary = ", ".join(f"{mode} {100 * e:.1f}%" for mode, e in result["mean_abs_error"].items())
    text += f"\n\nmean absolute relative error (tokens/s): {summary}"
    if result["not_modelled"]:
        text += (f"\nnot modelled: {', '.join(result['not_modelled'])} (two threads on the target; the costs "
                 "describe the target on one core and the drafter on the other)")
    return text


def main_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--costs", type=Path, required=True,
                        help="StepCosts JSON (e.g. docs/archive/bench/smollm2-flex-5/costs.json)")
    parser.add_argument("--alpha", type=float, default=0.6, help="per-token acceptance rate of the draft")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--prompt-tokens", type=float,
                        help=f"mean prompt length (default {DEFAULT_PROMPT_TOKENS}; with --compare: "
                             "the bench's own prompts, counted)")
    parser.add_argument("--draft-lengths", nargs="+", default=["1..8"], help="e.g. 1..8 or 2 4 6 8")
    parser.add_argument("--max-num-seqs", type=int, help="the engine's rows per internal batch (default: no cap)")
    parser.add_argument("--compare", type=Path, metavar="RAW.json",
                        help="report the prediction error against a `minedraft bench` raw.json instead")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def simulate(args) -> int:
    try:
        return _simulate(args)
    except ValueError as exc:  # a malformed costs file, or draft lengths it does not cover
        print(f"minedraft simulate: {exc}", file=sys.stderr)
        return 2


def _simulate(args) -> int:
    costs = StepCosts.load(args.costs)
    if args.compare:
        raw = json.loads(args.compare.read_text())
        prompt_tokens = args.prompt_tokens or raw.get("prompt_tokens")  # the bench records its prompts' mean
        if prompt_tokens is None:
            print(f"minedraft simulate: {args.compare} records no prompt_tokens; pass --prompt-tokens", file=sys.stderr)
            return 2
        result = compare(costs, raw, prompt_tokens)
        print(json.dumps(result, indent=2) if args.json else comparison_table(result))
        return 0
    prompt_tokens = DEFAULT_PROMPT_TOKENS if args.prompt_tokens is None else args.prompt_tokens
    k_values = parse_draft_lengths(args.draft_lengths)
    results = [r for c in args.concurrency
               for r in predict(costs, args.alpha, c, args.max_tokens, prompt_tokens, k_values, args.max_num_seqs)]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"alpha {args.alpha}, {args.max_tokens} output tokens after {prompt_tokens:g} prompt tokens, "
              f"k in {k_values}, costs {args.costs}")
        print(prediction_table(results))
    return 0
