"""Turn a `minedraft bench` result into docs/benchmarks.md, PNG plots and raw JSON."""
import json
from pathlib import Path

from .setups import FIXED_SETUPS, SETUPS, best_by_tokens_per_s

GOALS = {"P1": 1.5, "P1b": 1.75, "P2": 0.95, "P3": 2.0, "P4": 0.9, "P5": 0.8, "P6": 1.0}
SETUP_ORDER = (*FIXED_SETUPS, "flex", "flex_tau")


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    figures = out / "bench"
    figures.mkdir(exist_ok=True)
    (figures / "raw.json").write_text(json.dumps(results, indent=2))
    table = per_concurrency(results)
    goals = goal_table(results, table)
    plot(table, figures)
    text = markdown(results, table, goals)
    if (figures / "costs.json").exists():
        text += simulator_check(results, figures / "costs.json")
    (out / "benchmarks.md").write_text(text)


def simulator_check(results: dict, costs_path: Path) -> str:
    """`minedraft simulate --compare` on this run: the cost model's predictions against the rows."""
    from ..cost_model import StepCosts
    from .simulate import compare, mean_prompt_tokens
    args = results["args"]
    costs = StepCosts.load(costs_path)
    prompt_tokens = mean_prompt_tokens(Path(args["model_dir"]), args["num_prompts"])
    check = compare(costs, results, prompt_tokens)
    # The costs are the engine's own: its in-process runs show the model without the server's share.
    engine = compare(costs, {"args": args, "rows": results.get("engine", [])}, prompt_tokens)
    lines = ["", "## The simulator against this run", "",
             f"`minedraft simulate --costs {costs_path.parent.name}/costs.json --compare "
             f"{costs_path.parent.name}/raw.json`: the step costs the flex engine measured (start-up calibration, "
             "per-row overhead learnt in its in-process run) fed to the cost model, with each row's alpha fitted to "
             f"its measured acceptance; prompts {check['prompt_tokens']} tokens on average. Error = "
             "(predicted − measured) / measured.", ""]
    lines += _comparison("Mean absolute error per mode", check, "measured tok/s")
    lines += [""] + _comparison("Against the same run's in-process engine measurements (no server on the cores): "
                                "mean absolute error", engine, "measured tok/s (in-process)")
    return "\n".join(lines) + "\n"


def _comparison(title: str, check: dict, measured: str) -> list[str]:
    """One simulate.compare result: its mean errors, then a row per measurement."""
    errors = ", ".join(f"{mode} {100 * e:.1f} %" for mode, e in check["mean_abs_error"].items())
    return [f"{title}: {errors}.", "",
            f"| set-up | k | c | predicted as | predicted tok/s | {measured} | error |", "|---|---|---|---|---|---|---|",
            *(f"| {r['setup']} | {r['k']} | {r['concurrency']} | {r['choice']} | {r['predicted_tokens_per_s']} | "
              f"{r['measured_tokens_per_s']} | {100 * r['error']:+.1f} % |" for r in check["rows"])]


def per_concurrency(results: dict) -> list[dict]:
    rows = results["rows"]
    table = []
    for c in sorted({r["concurrency"] for r in rows}):
        entry = {"concurrency": c}
        for setup in SETUP_ORDER:
            entry[setup] = best_by_tokens_per_s([r for r in rows if r["setup"] == setup and r["concurrency"] == c])
        # Best-tuned on the 2 cores: each mode at its better thread setting (1 or 2 threads).
        entry["ar_best"] = _faster(entry["ar"], entry["ar_1core"])
        entry["sd_best"] = _faster(entry["sd"], entry["sd_1core"])
        entry["fixed_best"] = _faster(*(entry[s] for s in FIXED_SETUPS))
        table.append(entry)
    return table


def _faster(*rows):
    return best_by_tokens_per_s(rows)


def _ratio(a, b):
    return round(a["tokens_per_s"] / b["tokens_per_s"], 3) if a and b and b["tokens_per_s"] else None


def goal_table(results: dict, table: list[dict]) -> list[dict]:
    goals = []
    psd_rows = [t for t in table if t["psd"]]
    if psd_rows:
        peak = max(psd_rows, key=lambda t: t["psd"]["tokens_per_s"])
        goals.append(("P1", f"PSD / best-tuned SD (better of 1 and 2 threads) at PSD's best concurrency "
                            f"(c={peak['concurrency']}), same 2 cores", _ratio(peak["psd"], peak["sd_best"])))
        goals.append(("P1", f"PSD / SD with 2 threads at c={peak['concurrency']}", _ratio(peak["psd"], peak["sd"])))
        if peak["sd_1core"]:
            goals.append(("P1b", f"PSD (2 cores) / SD (target and draft on 1 core) at c={peak['concurrency']}",
                          _ratio(peak["psd"], peak["sd_1core"])))
    for t in table:
        if t["flex"] and t["fixed_best"]:
            goals.append(("P2", f"flex / best fixed set-up ({t['fixed_best']['setup']}) at c={t['concurrency']}",
                          _ratio(t["flex"], t["fixed_best"])))
    first = table[0] if table and table[0]["concurrency"] == 1 else None
    if first and first["ar_best"]:
        best_mode = _faster(first["sd_best"], first["psd"])
        goals.append(("P3", "best speculative set-up / best-tuned AR at concurrency 1", _ratio(best_mode, first["ar_best"])))
        if results.get("hf_assisted") and best_mode:
            goals.append(("P6", "best set-up at concurrency 1 (server) / HF assisted generation (batch 1, its better thread count)",
                          _ratio(best_mode, results["hf_assisted"])))
    for engine_row in results.get("engine", []):
        served = next((t[engine_row["setup"]] for t in table if t["concurrency"] == engine_row["concurrency"]), None)
        goals.append(("P4", f"Triton {engine_row['setup']} / in-process engine at c={engine_row['concurrency']}",
                      _ratio(served, engine_row)))
        if engine_row["setup"] == "psd" and engine_row.get("ideal_tokens_per_s"):
            goals.append(("P5", f"PSD / its ideal (target busy all the time: drafting fully hidden), in-process, "
                                f"c={engine_row['concurrency']}",
                          round(engine_row["tokens_per_s"] / engine_row["ideal_tokens_per_s"], 3)))
    return [{"goal": g, "what": what, "measured": value, "target": GOALS[g],
             "met": value is not None and value >= GOALS[g]} for g, what, value in goals]


def plot(table: list[dict], figures: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = {"ar": "AR (2 threads)", "ar_1core": "AR (1 thread)", "sd": "SD (best k, 2 threads)",
              "sd_1core": "SD (best k, 1 core)", "psd": "PSD (best k, 1+1 cores)", "flex": "flex (1+1 cores)"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for setup, label in labels.items():
        points = [(t["concurrency"], t[setup]["tokens_per_s"]) for t in table if t[setup]]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set(xscale="log", xlabel="concurrency (requests in flight)", ylabel="output tokens/s",
           title="Throughput through tritonserver (perf_analyzer, streaming)")
    ax.set_xticks([t["concurrency"] for t in table], [str(t["concurrency"]) for t in table])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(figures / "throughput.png", dpi=110)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (metric, title) in zip(axes, [("ttft_p50_ms", "TTFT p50"), ("itl_p50_ms", "inter-token p50"),
                                          ("e2e_p99_ms", "end-to-end p99")]):
        for setup, label in labels.items():
            points = [(t["concurrency"], t[setup][metric]) for t in table if t[setup]]
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="ms", title=title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figures / "latency.png", dpi=110)
    plt.close("all")


def _cell(row, key="tokens_per_s"):
    return "–" if not row or row.get(key) is None else f"{row[key]}"


def markdown(results: dict, table: list[dict], goals: list[dict]) -> str:
    args = results["args"]
    lines = [
        "# Benchmarks: AR vs SD vs MineDraft PSD through tritonserver",
        "",
        "Generated by `minedraft bench` from the committed code; numbers are from **one run** on the machine",
        "below. Absolute times on this shared 2-core CPU are noisy; read the **ratios**, measured side by side.",
        "",
        f"- Machine: {results['machine']}",
        f"- Command: `{results.get('command', 'minedraft bench')}`",
        f"- Work per request: a held-out prompt ({args['num_prompts']} prompts cycled), `max_tokens` = "
        f"{args['max_tokens']}, `ignore_eos`, greedy: equal work in every mode.",
        f"- `max_num_seqs` = {args['max_num_seqs']} per internal batch: **PSD holds 2× as many requests in "
        "flight** as SD and AR (as in the paper); beyond that, requests wait in Triton's queue.",
        "- Cores: AR and SD run once with 2 threads on cores 0-1 and once with 1 thread on core 0 (for these "
        "tiny models one thread is often faster: see the analysis); PSD puts the target on core 0 and the drafter "
        "process on core 1, the same 2 cores (iso-hardware). SD on core 0 alone is also P1b's SD (the paper's "
        "set-up: PSD gets the extra core). tritonserver's frontend and perf_analyzer share the same 2 cores in "
        "every case.",
        f"- Best `num_draft_tokens` at each concurrency: PSD from {args['draft_lengths']}, SD from "
        f"{args.get('sd_draft_lengths') or args['draft_lengths']}.",
        "- Throughput: output tokens whose responses fall inside perf_analyzer's measurement windows, divided "
        "by the windows' span (from `--profile-export-file`). Acceptance: the server's "
        "`minedraft_accepted_tokens_total / minedraft_draft_tokens_total` over the run.",
        "",
        "## Goals",
        "",
        "| Goal | What | Measured | Target | Met |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {g['goal']} | {g['what']} | {g['measured']} | ≥ {g['target']} | {'yes' if g['met'] else '**no**'} |"
              for g in goals]
    lines += ["", "## Output-token throughput (tokens/s) and ratios", "",
              "Best k per set-up and concurrency; *best* = the better of 1 and 2 threads.", "",
              "| c | AR 2t | AR 1t | SD 2t (k) | SD 1t (k) | PSD (k) | PSD/best SD | PSD/SD 2t | PSD/best AR | "
              "best SD/best AR |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['concurrency']} | {_cell(t['ar'])} | {_cell(t['ar_1core'])} | {_cell(t['sd'])} "
                     f"({_cell(t['sd'], 'num_draft_tokens')}) | {_cell(t['sd_1core'])} "
                     f"({_cell(t['sd_1core'], 'num_draft_tokens')}) | {_cell(t['psd'])} "
                     f"({_cell(t['psd'], 'num_draft_tokens')}) | {_ratio(t['psd'], t['sd_best'])} | "
                     f"{_ratio(t['psd'], t['sd'])} | {_ratio(t['psd'], t['ar_best'])} | "
                     f"{_ratio(t['sd_best'], t['ar_best'])} |")
    tau = SETUPS["flex_tau"][1]["draft_confidence_threshold"]
    lines += ["", "## Flex against the fixed modes", "",
              "Flex serves on PSD's cores and picks AR, SD(k) or PSD(k) every step (k <= "
              f"{max(args['draft_lengths'])}). Steps by mode are the server's `minedraft_policy_steps_total`. "
              f"*flex τ* adds FlexDraft's confidence cut at draft_confidence_threshold = {tau}.", "",
              "| c | flex | best fixed (set-up, k) | flex / best fixed (P2) | flex / PSD | flex steps ar/sd/psd | "
              "flex τ | flex τ / best fixed |", "|---|---|---|---|---|---|---|---|"]
    for t in table:
        if t["flex"]:
            steps = t["flex"].get("steps_by_mode") or {}
            lines.append(f"| {t['concurrency']} | {_cell(t['flex'])} | {_cell(t['fixed_best'])} "
                         f"({t['fixed_best']['setup']}, {t['fixed_best']['num_draft_tokens']}) | "
                         f"{_ratio(t['flex'], t['fixed_best'])} | {_ratio(t['flex'], t['psd'])} | "
                         f"{'/'.join(str(int(steps.get(m, 0))) for m in ('ar', 'sd', 'psd'))} | "
                         f"{_cell(t['flex_tau'])} | {_ratio(t['flex_tau'], t['fixed_best'])} |")
    lines += ["", "## Latency (ms) and acceptance at each set-up's best k", "",
              "| c | set-up | k | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | e2e p50 | e2e p99 | acceptance |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        for setup in SETUP_ORDER:
            r = t[setup]
            if r:
                lines.append(f"| {t['concurrency']} | {setup} | {r['num_draft_tokens']} | {r['ttft_p50_ms']} | "
                             f"{r['ttft_p99_ms']} | {r['itl_p50_ms']} | {r['itl_p99_ms']} | {r['e2e_p50_ms']} | "
                             f"{r['e2e_p99_ms']} | {r['acceptance_rate']} |")
    lines += ["", "## Every measurement (draft-length sweep included)", "",
              "| set-up | k | c | tokens/s | acceptance | e2e p50 ms |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['setup']} | {r['num_draft_tokens']} | {r['concurrency']} | {r['tokens_per_s']} | "
              f"{r['acceptance_rate']} | {r['e2e_p50_ms']} |" for r in results["rows"]]
    lines += ["", "## Same run, without the server", ""]
    for r in results.get("engine", []):
        lines.append(f"- In-process engine, {r['setup']}, c={r['concurrency']}, k={r['num_draft_tokens']}: "
                     f"{r['tokens_per_s']} tokens/s" + (f"; ideal (drafting hidden) {r['ideal_tokens_per_s']}"
                                                         if r.get("ideal_tokens_per_s") else ""))
    if results.get("hf_assisted"):
        h = results["hf_assisted"]
        lines.append(f"- HF transformers assisted generation (`generate(assistant_model=draft)`, batch 1, "
                     f"{h['prompts']} prompts, {h['threads']} thread(s)): {h['tokens_per_s']} tokens/s")
    lines += ["", "![throughput](bench/throughput.png)", "", "![latency](bench/latency.png)", "",
              "Raw results: [bench/raw.json](bench/raw.json). Where the goals stand and why: "
              "[benchmark-analysis.md](benchmark-analysis.md).", ""]
    return "\n".join(lines)
