"""Issue 38's goals table from one run: every figure measured by this invocation, one benchmark
after another on an otherwise idle machine, each with the command that reproduces it.

    python -m minedraft.tools.bench_goals [--out docs/bench/goals] [--only STEP ...] [--doc docs/benchmarks.md]

Steps, in order (each tool a subprocess of its own, its raw JSON under --out):
  bandwidth  the machine's memory read rate and the Qwen target's weight bytes (P7's limit)
  demo       the demo pair, AR at c = 1 in-process, eager, compiled and compiled with
             `compile_sizes` 1 (H1)
  inprocess  the Qwen pair in-process at c = 1, AR and SD, compiled and compiled with
             `compile_sizes` 1 (P3, P7)
  served     the Qwen pair through tritonserver, AR and the served default (auto, inline int4
             draft) at c = 1 and 8, compiled against `enforce_eager` (H2, H3)
  load       a second server: the fixed set-ups (AR, SD, PSD) and auto at every c in 1..32,
             compiled (P2; P3 and P7 through the server)
  peer       the shipped entry against llama.cpp on the same GGUF files, c = 1 (L1)
After every step the table is written again (goals.md, goals.json under --out, and with --doc
the section between the goals markers of that file), so a run cut short keeps what it measured.
A step that fails is reported and the rest go on.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from .bench import machine, read_bandwidth, weight_bytes

QWEN = Path("model_repository/qwen-coder/1")
DEMO = Path("model_repository/minedraft/1")
TOOL = [sys.executable, "-m"]
BEGIN, END = "<!-- goals:begin -->", "<!-- goals:end -->"
QWEN_ENGINE = ["--model-dir", str(QWEN), "--prompts", "heldout", "--chat", "--dtype", "bfloat16",
               "--draft-quantization", "int4", "--modes", "ar", "sd", "--concurrency", "1", "--draft-lengths", "4",
               "--max-tokens", "32", "--compiled"]


def tool_steps(out: Path) -> dict[str, list[tuple[str, list[str]]]]:
    """Each step's runs: (raw JSON file name, the command that writes it)."""
    demo = ["minedraft.tools.bench_engine", "--model-dir", str(DEMO), "--modes", "ar", "--concurrency",
            "1", "--max-tokens", "64"]
    return {
        "demo": [("demo-eager.json", [*demo, "--out", str(out / "demo-eager.json")]),
                 ("demo-compiled.json", [*demo, "--compiled", "--out", str(out / "demo-compiled.json")]),
                 ("demo-static.json", [*demo, "--compiled", "--compile-sizes", "1",
                                       "--out", str(out / "demo-static.json")])],
        "inprocess": [("qwen-compiled.json", ["minedraft.tools.bench_engine", *QWEN_ENGINE,
                                              "--out", str(out / "qwen-compiled.json")]),
                      ("qwen-static.json", ["minedraft.tools.bench_engine", *QWEN_ENGINE, "--compile-sizes", "1",
                                            "--out", str(out / "qwen-static.json")])],
        "served": [("served.json", ["minedraft.tools.bench_compiled", "--model-dir", str(QWEN), "--setups", "ar",
                                    "auto_inline", "--paths", "compiled", "eager", "--concurrency", "1", "8",
                                    "--out", str(out / "served.json")])],
        "load": [("load.json", ["minedraft.tools.bench_compiled", "--model-dir", str(QWEN), "--setups", "ar", "sd",
                                "psd", "auto_inline", "--paths", "compiled", "--concurrency", "1", "2", "4", "8", "16",
                                "32", "--out", str(out / "load.json")])],
        "peer": [("peer.json", ["minedraft.tools.bench_peer", "--model-dir", str(QWEN), "--variants", "default",
                                "--concurrency", "1", "--out", str(out / "peer.json")])],
    }


STEPS = ("bandwidth", *tool_steps(Path(".")))
BANDWIDTH_FILE = "bandwidth.json"
TOOL_TIMEOUT_S = 7200  # one tool's run; the served sweep takes about half an hour here


def utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def command_text(argv: list[str]) -> str:
    return "python -m " + " ".join(argv)


def run_tool(argv: list[str], log) -> int:
    """One tool's run, its output into the log; its exit status."""
    return subprocess.run([*TOOL, *argv], check=False, stdout=log, stderr=subprocess.STDOUT,
                          timeout=TOOL_TIMEOUT_S).returncode


def step_files(name: str, out: Path) -> list[str]:
    return [BANDWIDTH_FILE] if name == "bandwidth" else [file_name for file_name, _ in tool_steps(out)[name]]


def run_step(name: str, out: Path, threads: int, log) -> dict:
    """Runs one step; returns its record: the commands, seconds, and an error where one failed.
    The step's files from an earlier run go first, so that a failed step leaves no stale figure."""
    started = time.monotonic()
    runs = [] if name == "bandwidth" else tool_steps(out)[name]
    for file_name in step_files(name, out):
        (out / file_name).unlink(missing_ok=True)
    record = {"commands": [command_text(["minedraft.tools.bench_goals", "--only", name, "--out", str(out)])]
              if name == "bandwidth" else []}
    try:
        if name == "bandwidth":
            figures = {"read_gb_s": read_bandwidth(threads), "threads": threads,
                       "target_weight_bytes": weight_bytes(QWEN / "target")}
            (out / BANDWIDTH_FILE).write_text(json.dumps(figures, indent=2))
        for _, argv in runs:
            record["commands"].append(command_text(argv))
            print(f"[{name}] {command_text(argv)}", flush=True)
            returncode = run_tool(argv, log)
            if returncode != 0:
                record["error"] = f"exit status {returncode} (log: {log.name})"
                break
    except Exception as exc:  # noqa: BLE001 - the rest of the steps go on; the record says what failed
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["seconds"] = round(time.monotonic() - started, 1)
    record["finished"] = utc_now()
    return record


def load_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def in_process_rate(report, mode: str) -> float | None:
    """The best rate of `mode` at one request in a bench_engine report."""
    rows = [r for r in (report["results"].get(mode) or []) if r["concurrency"] == 1] if report else []
    return max((r["tokens_per_s"] for r in rows), default=None)


def served_rate(report, setup: str, concurrency: int, path: str = "compiled") -> float | None:
    rows = [r for r in (report or {}).get("rows", []) if r["setup"] == setup and r["concurrency"] == concurrency
            and r["path"] == path]
    return rows[0]["tokens_per_s"] if rows else None


def ratio(numerator, denominator) -> float | None:
    return numerator / denominator if numerator and denominator else None


def best(named: dict) -> tuple[str, float] | tuple[None, None]:
    present = {k: v for k, v in named.items() if v}
    return max(present.items(), key=lambda item: item[1]) if present else (None, None)


def goal_rows(out: Path) -> list[dict]:
    """The goals table from the raw JSON under `out`: (goal, what, measured, value, target, met)."""
    bandwidth, demo_eager, demo_compiled, demo_static = (
        load_json(out / f) for f in ("bandwidth.json", "demo-eager.json", "demo-compiled.json", "demo-static.json"))
    qwen_compiled, qwen_static = load_json(out / "qwen-compiled.json"), load_json(out / "qwen-static.json")
    served, load, peer = (load_json(out / f) for f in ("served.json", "load.json", "peer.json"))
    rows = []

    def add(goal, what, measured, value, target, met, source, why_missing=""):
        """`met` sees the unrounded value; the table shows it to three decimals."""
        rows.append({"goal": goal, "what": what,
                     "measured": measured if value is not None else f"not measured{why_missing}",
                     "value": None if value is None else round(value, 3), "target": target,
                     "met": None if value is None else met(value), "source": source})

    def ms_a_token(report):
        rate = in_process_rate(report, "ar")
        return f"{round(1000 / rate, 2)} ms ({rate} tok/s)" if rate else "not measured"

    _, fastest = best({path: in_process_rate(report, "ar") for path, report in
                       (("static", demo_static), ("compiled", demo_compiled), ("eager", demo_eager))})
    add("H1", "demo pair, AR at c = 1, in-process, ms a token (the fastest path)",
        f"compile_sizes 1: {ms_a_token(demo_static)}; compiled: {ms_a_token(demo_compiled)}; "
        f"eager: {ms_a_token(demo_eager)}", 1000 / fastest if fastest else None, "≤ 1.5", lambda v: v <= 1.5, "demo")
    for goal, setup, concurrency in (("H2", "ar", 1), ("H3", "auto_inline", 1), ("H3", "auto_inline", 8)):
        fast, slow = served_rate(served, setup, concurrency), served_rate(served, setup, concurrency, "eager")
        add(goal, f"served {setup} at c = {concurrency}: compiled / enforce_eager",
            f"{fast} / {slow} tok/s", ratio(fast, slow), "≥ 1.4", lambda v: v >= 1.4, "served")
    in_ar = {"AR compiled": in_process_rate(qwen_compiled, "ar"), "AR compile_sizes 1": in_process_rate(qwen_static, "ar")}
    in_sd = {"SD compiled": in_process_rate(qwen_compiled, "sd"), "SD compile_sizes 1": in_process_rate(qwen_static, "sd")}
    (ar_name, ar_rate), (sd_name, sd_rate) = best(in_ar), best(in_sd)
    add("P3", "in-process, c = 1: best speculative / best AR (shipped compiled, and with compile_sizes 1)",
        f"{sd_name} {sd_rate} / {ar_name} {ar_rate} tok/s", ratio(sd_rate, ar_rate), "≥ 2.0", lambda v: v >= 2.0,
        "inprocess")
    served_spec = {s: served_rate(load, s, 1) for s in ("sd", "psd", "auto_inline")}
    spec_name, spec_rate = best(served_spec)
    add("P3", "served, c = 1: best speculative set-up / AR, both compiled",
        f"{spec_name} {spec_rate} / ar {served_rate(load, 'ar', 1)} tok/s", ratio(spec_rate, served_rate(load, "ar", 1)),
        "≥ 2.0", lambda v: v >= 2.0, "load")
    limit = (round(bandwidth["read_gb_s"] * 1e9 / bandwidth["target_weight_bytes"], 2)
             if bandwidth and bandwidth["target_weight_bytes"] else None)
    best_ar_name, best_ar = best({**{f"in-process {k}": v for k, v in in_ar.items()},
                                  "served AR compiled": served_rate(load, "ar", 1)})
    add("P7", "best AR at c = 1 / the memory-bandwidth limit (read rate ÷ bf16 target weights)",
        f"{best_ar_name} {best_ar} / {limit} tok/s"
        + (f" ({bandwidth['read_gb_s']} GB/s ÷ {bandwidth['target_weight_bytes'] / 1e6:.0f} MB)" if bandwidth else ""),
        ratio(best_ar, limit), "≥ 0.85", lambda v: v >= 0.85, "inprocess, load, bandwidth")
    for concurrency in (1, 2, 4, 8, 16, 32):
        fixed_name, fixed = best({s: served_rate(load, s, concurrency) for s in ("ar", "sd", "psd")})
        auto = served_rate(load, "auto_inline", concurrency)
        add("P2", f"served auto / best fixed set-up (ar, sd, psd) at c = {concurrency}",
            f"{auto} / {fixed_name} {fixed} tok/s",
            ratio(auto, fixed), "≥ 0.95", lambda v: v >= 0.95, "load")
    ours = next((r["tokens_per_s"] for r in (peer or {}).get("rows", []) if r["server"] == "minedraft"), None)
    peer_name, peer_rate = best({r["setup"]: r["tokens_per_s"] for r in (peer or {}).get("rows", [])
                                 if r["server"] == "llama.cpp"})
    add("L1", "served default / llama.cpp's best on the same GGUFs, c = 1",
        f"{ours} / llama.cpp {peer_name} {peer_rate} tok/s", ratio(ours, peer_rate), "report", lambda v: True, "peer",
        f" ({peer['skipped']})" if peer and peer.get("skipped") else "")
    return rows


def markdown(rows: list[dict], records: dict, report_machine: dict, out: Path, one_run: bool = True) -> str:
    when = (f"one run, started {report_machine['started']}" if one_run else
            "steps from more than one invocation (`--only`): see when each finished, below")
    lines = [(f"Machine: {report_machine['cpu']} ({report_machine['flags']}), {report_machine['cores']} cores; "
              f"{when}. Raw JSON under `{out}`."), "",
             "| # | what | measured | ratio or figure | goal | met |", "|---|---|---|---|---|---|"]
    for row in rows:
        met = {True: "yes", False: "**no**", None: "not measured"}[row["met"]] if row["target"] != "report" else (
            "reported" if row["met"] else "not measured")
        lines.append(f"| {row['goal']} | {row['what']} | {row['measured']} | {row['value']} | {row['target']} | {met} |")
    lines.append("| G1 | the 1.5B-shaped verify step on a GPU | no GPU lent to this run | | ≤ 3 ms | not run |")
    lines += ["", "Commands (each step's; `python -m minedraft.tools.bench_goals --only STEP` reruns one):", ""]
    for name, record in records.items():
        status = (f"failed: {record['error']}" if "error" in record else f"{record['seconds']} s") + \
            f", finished {record['finished']}"
        lines.append(f"- `{name}` ({status}): " + "; ".join(f"`{c}`" for c in record["commands"]))
    return "\n".join(lines) + "\n"


def check_doc(doc: Path) -> str:
    """The doc's text, if it has a goals section to fill."""
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc} has no {BEGIN} ... {END} section to fill")
    return text


def write_doc(doc: Path, table: str) -> None:
    head, rest = check_doc(doc).split(BEGIN, 1)
    doc.write_text(f"{head}{BEGIN}\n{table}{END}{rest.split(END, 1)[1]}")


def write_outputs(out: Path, records: dict, report_machine: dict, one_run: bool, doc: Path | None) -> str:
    """The table from the JSON under `out`, into goals.md, goals.json and `doc`'s section; returns it."""
    rows = goal_rows(out)
    table = markdown(rows, records, report_machine, out, one_run)
    (out / "goals.md").write_text(table)
    (out / "goals.json").write_text(json.dumps({"machine": report_machine, "one_run": one_run, "steps": records,
                                                "goals": rows}, indent=2))
    if doc:
        write_doc(doc, table)
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/goals"))
    parser.add_argument("--only", nargs="+", choices=STEPS, help="run these steps; the table reads the rest's JSON as left")
    parser.add_argument("--threads", type=int, default=2, help="threads for the bandwidth measurement (the engine's)")
    parser.add_argument("--doc", type=Path, help="a markdown file whose goals section gets the table")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: write the table again from the JSON under --out")
    args = parser.parse_args(argv)
    if args.doc:
        check_doc(args.doc)  # before a step runs for an hour
    if args.render:
        previous = load_json(args.out / "goals.json")
        if previous is None:
            raise SystemExit(f"nothing measured under {args.out}")
        print(write_outputs(args.out, previous["steps"], previous["machine"], previous["one_run"], args.doc))
        return
    if not (QWEN / "target").is_dir():
        raise SystemExit(f"no {QWEN / 'target'} here: run from the repository root, after "
                         "`python -m minedraft.tools.prepare_models`")
    args.out.mkdir(parents=True, exist_ok=True)
    records_path = args.out / "goals.json"
    # A whole run starts afresh; --only keeps the other steps' records (the table then says so).
    records = (load_json(records_path) or {}).get("steps", {}) if args.only else {}
    for name in [] if args.only else STEPS:
        for file_name in step_files(name, args.out):
            (args.out / file_name).unlink(missing_ok=True)
    report_machine = {**machine(), "started": utc_now()}
    with open(args.out / "goals.log", "a" if args.only else "w") as log:
        for name in args.only or STEPS:
            records[name] = run_step(name, args.out, args.threads, log)
            table = write_outputs(args.out, records, report_machine, not args.only, args.doc)
            print(f"[{name}] done in {records[name]['seconds']} s" + (f": {records[name]['error']}"
                                                                       if "error" in records[name] else ""), flush=True)
    print(table)


if __name__ == "__main__":
    main()
