"""`minedraft bench`: AR vs SD vs PSD through the real tritonserver, driven by perf_analyzer.

One server serves one model per set-up over the same pair of weights (`--model-dir`: the toy
pair by default, `model_repository/qwen-coder/1` for the served one). perf_analyzer streams held-out
prompts (fixed max_tokens, ignore_eos: equal work in every mode) at each concurrency. Throughput
is the server's generated-token counter over the span in which perf_analyzer held the
concurrency (`steady_rate`); TTFT, inter-token and end-to-end latency come from perf_analyzer's
profile export, acceptance from the server's Prometheus counters.
The in-process engine, HF's generation, PSD's ideal and the machine's memory read bandwidth are
measured in the same run. Writes the pair's section of docs/benchmarks.md, PNG plots and raw JSON
under docs/bench/<label>/.
"""
import argparse
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from minedraft.config import DEFAULT_MODEL_DIR, MODE_TRAITS
from minedraft.drafting.vocabulary import D2T_FILE
from minedraft.policy.cost_model import STEP_MODES
from minedraft.prompts import PROMPT_SETS, prompts_path
from minedraft.serving.launcher import TritonServer
from minedraft.serving.triton_metrics import read_metrics
from minedraft.worker_process import free_port

from .bench_engine import chat_prompts, engine_for, load_prompts, measure
from .bench_report import report_dir, write_report
from .perf_analyzer import run_with_export, write_input_data
from .repository import write_repository
from .setups import SD_SETUPS, SETUPS, best_by_tokens_per_s, mode_of


def build_repository(root: Path, setups: list[str], max_num_seqs: int, max_draft: int, model_dir: Path,
                     draft: Path, precision: dict) -> Path:
    """`precision`: dtype and draft_quantization, the same for every set-up."""
    weights = {"target_model": str(model_dir.resolve() / "target"), "draft_model": str(draft.resolve()), **precision}
    models = {SETUPS[s][0]: {**SETUPS[s][1], **weights, "max_num_seqs": max_num_seqs, "num_draft_tokens": max_draft}
              for s in setups}
    return write_repository(root, models, max_batch_size=2 * max_num_seqs, queue_size=1024)


def _load(server, model, data: Path, concurrency: int) -> list[str]:
    """perf_analyzer's arguments for streaming these requests to the model at this concurrency."""
    return ["-m", model, "-u", server.grpc_url, "-i", "grpc", "--streaming", "--concurrency-range", str(concurrency),
            "--input-data", str(data)]


class CounterSampler:
    """The server's counters for one model, read every `period` seconds on a thread while a load runs:
    (time, generated tokens, finished requests, steps) per reading."""

    def __init__(self, metrics_url: str, model: str, period: float = 0.2):
        self.metrics_url, self.model, self.period = metrics_url, model, period
        self.samples: list[tuple[float, float, float, float]] = []
        self.first: dict = {}
        self.last: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._read()
        self.first = self.last
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._read()

    def _run(self):
        while not self._stop.wait(self.period):
            self._read()

    def _read(self):
        now = time.perf_counter()
        self.last = read_metrics(self.metrics_url, self.model)
        self.samples.append((now, *(self.last.get(name, 0.0) for name in (
            "minedraft_generation_tokens_total", "minedraft_requests_finished_total", "minedraft_steps_total"))))


def steady_rate(samples, concurrency: int, learning_steps: int = 0) -> dict | None:
    """Tokens per second while perf_analyzer held `concurrency` requests in flight: from the first
    request's end (every slot has started; and, for a policy that learns, `learning_steps` steps run)
    to the last reading before the drain (perf_analyzer sends its last request when all but
    `concurrency` have finished, so while finished <= total - concurrency, all are in flight).

    Token-exact over the span between two readings, unlike whole requests over perf_analyzer's
    whole-second windows (docs/archive/benchmark-analysis.md, "The benchmark's resolution")."""
    t0, tokens0, finished0, steps0 = samples[0]
    total = samples[-1][2] - finished0
    held = [s for s in samples if 1 <= s[2] - finished0 <= total - concurrency and s[3] - steps0 >= learning_steps]
    if len(held) < 2 or held[-1][0] <= held[0][0]:
        return None
    (start, tokens_start, _, _), (end, tokens_end, _, _) = held[0], held[-1]
    return {"tokens_per_s": round((tokens_end - tokens_start) / (end - start), 2),
            "window_s": round(end - start, 2), "window_tokens": int(tokens_end - tokens_start)}


def rate_for_rerun(expected_tokens_per_s: float, steady: dict | None, samples, window_s: float) -> float:
    """The rate to size a rerun by when a run's steady span came out short because the rate was not
    known yet: the steady rate that run measured, with half again as margin (a short span's rate is
    rough). Not scaled by the shortfall: a first guess far too low made the span far too short, and
    scaling by that sized a 12 s window at 408 s (the Qwen pair's AR at c = 8). A run too short to
    hold any steady span (a handful of requests at a guessed rate) still says how fast it went: its
    tokens over its whole length, start-up and drain included, a rate no higher than the steady
    one, times 4."""
    if steady:
        return max(expected_tokens_per_s, steady["tokens_per_s"]) * 1.5 + 10
    (t0, tokens0, *_), (t1, tokens1, *_) = samples[0], samples[-1]
    whole_run = (tokens1 - tokens0) / (t1 - t0) if t1 > t0 else 0.0
    return max(expected_tokens_per_s, whole_run) * 4 + 10


def summarise_profile(export: Path) -> dict:
    """Per-request latencies from perf_analyzer's profile export."""
    experiment = json.loads(export.read_text())["experiments"][0]
    ttft, itl, e2e = [], [], []
    for request in experiment["requests"]:
        stamps, outputs = request["response_timestamps"], request["response_outputs"]
        # num_output_tokens is each response's new tokens (vllm_backend's meaning).
        total = sum(o.get("num_output_tokens", 0) for o in outputs)
        if not stamps or total < 1:
            continue
        ttft.append((stamps[0] - request["timestamp"]) / 1e9)
        e2e.append((stamps[-1] - request["timestamp"]) / 1e9)
        if total > 1:
            itl.append((stamps[-1] - stamps[0]) / 1e9 / (total - 1))
    return {"requests": len(experiment["requests"]),
            "ttft_p50_ms": _ms(_pct(ttft, 50)), "ttft_p99_ms": _ms(_pct(ttft, 99)),
            "itl_p50_ms": _ms(_pct(itl, 50)), "itl_p99_ms": _ms(_pct(itl, 99)),
            "e2e_p50_ms": _ms(_pct(e2e, 50)), "e2e_p99_ms": _ms(_pct(e2e, 99))}


def _pct(values, q):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _ms(seconds):
    return round(seconds * 1000, 2)


def load_requests(concurrency: int, max_tokens: int, window_s: float, expected_tokens_per_s: float,
                  learning_requests: int) -> int:
    """Requests for one perf_analyzer run: the ramp (one), a steady span of about window_s at the
    expected rate (at least 4 requests), the learning (if any), and the drain (concurrency)."""
    steady = max(4, math.ceil(expected_tokens_per_s * window_s / max_tokens))
    return 1 + steady + learning_requests + concurrency


def measure_server(server, setup, k, concurrency, prompts, args, workdir: Path, expected_tokens_per_s: float,
                   model: str | None = None) -> dict:
    """One point: perf_analyzer streams a fixed number of requests at this concurrency while the
    server's counters are read; throughput is their steady rate (`steady_rate`), latencies come from
    the export. A run whose steady span came out under half of --window-seconds (the rate was not
    known yet) is run again, sized by the rate it measured. `model`: the served name, when it is
    not the set-up's own."""
    model = model or SETUPS[setup][0]
    params = {"max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
    if not setup.startswith("ar"):
        params["num_draft_tokens"] = k
    data = write_input_data(workdir / f"input_k{k}.json", prompts, params)
    export = workdir / f"{model}_k{k}_c{concurrency}.json"
    # Flex learns at a new load (times each of its arms); measuring that would measure a start-up.
    learning_steps = args.learning_steps if mode_of(setup) == "flex" else 0
    learning_requests = math.ceil(learning_steps * min(concurrency, args.max_num_seqs) / args.max_tokens)
    for attempt in range(3):
        requests = load_requests(concurrency, args.max_tokens, args.window_seconds, expected_tokens_per_s,
                                 learning_requests)
        with CounterSampler(server.metrics_url, model) as counters:
            run_with_export([*_load(server, model, data, concurrency), "--request-count", str(requests)], export)
        steady = steady_rate(counters.samples, concurrency, learning_steps)
        if steady and steady["window_s"] >= args.window_seconds / 2:
            break
        expected_tokens_per_s = rate_for_rerun(expected_tokens_per_s, steady, counters.samples, args.window_seconds)
        learning_requests *= 2  # learning may have taken more requests than assumed (its steps hold fewer tokens)
        print(f"{model} at c = {concurrency}: a steady span of {steady['window_s'] if steady else 0} s in {requests} "
              f"requests" + (f"; again, sized for {expected_tokens_per_s:.0f} tok/s" if attempt < 2 else ""))
    if steady is None:
        raise RuntimeError(f"{model} at c = {concurrency}: no steady span in {requests} requests")

    def delta(name):
        return counters.last.get(name, 0) - counters.first.get(name, 0)

    drafted, accepted = delta("minedraft_draft_tokens_total"), delta("minedraft_accepted_tokens_total")
    steps = {mode: delta(f"minedraft_policy_steps_total/{mode}") for mode in STEP_MODES}
    return {"setup": setup, "model": model, "num_draft_tokens": k, "concurrency": concurrency, **steady,
            **summarise_profile(export), "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
            "steps_by_mode": steps}


def hf_assisted_generation(model_dir: Path, draft_dir: Path, prompts, max_tokens: int, num_prompts: int,
                           dtype: str = "float32", quantization: str = "none") -> dict:
    """The peer baseline: transformers' generation at batch 1, same prompts, same dtype, at its
    better thread count (1 or 2), after a warm-up call. With our draft as `assistant_model` where
    HF accepts it (also with our quantized draft's layers, which HF runs as it is); a draft with a
    reduced vocabulary (d2t.json) it does not, so then HF's best is the better of the target alone
    and prompt-lookup decoding (its draft-free speculation)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minedraft.model.quantization import quantize_linears
    tokenizer = AutoTokenizer.from_pretrained(model_dir / "target")
    target = AutoModelForCausalLM.from_pretrained(model_dir / "target", dtype=getattr(torch, dtype)).eval()
    if (draft_dir / D2T_FILE).exists():
        ways = {"target alone": {}, "prompt lookup": {"prompt_lookup_num_tokens": 4}}
    else:
        draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=getattr(torch, dtype)).eval()
        ways = {"assisted generation": {"assistant_model": draft}}
        if quantization != "none":
            quantized = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.bfloat16).eval()
            ways[f"assisted generation, {quantization} draft"] = {
                "assistant_model": quantize_linears(quantized, quantization)}

    def generate(prompt, how):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = target.generate(ids, do_sample=False, max_new_tokens=max_tokens, min_new_tokens=max_tokens, **how)
        return out.size(1) - ids.size(1)

    runs = []
    for way, how in ways.items():
        for threads in (1, 2):
            torch.set_num_threads(threads)
            generate(prompts[0], how)
            started = time.perf_counter()
            tokens = sum(generate(p, how) for p in prompts[:num_prompts])
            runs.append({"way": way, "threads": threads, "prompts": num_prompts, "output_tokens": tokens,
                         "tokens_per_s": round(tokens / (time.perf_counter() - started), 2)})
    return {**best_by_tokens_per_s(runs), "runs": runs}


def read_bandwidth(threads: int, gib: float = 1.0) -> float:
    """The machine's memory read bandwidth in GB/s with `threads` threads: the best of five sums over
    a buffer far larger than the caches. A batch-1 forward must read every weight once, so
    bandwidth / weight bytes bounds AR's tokens/s (P7)."""
    import torch
    torch.set_num_threads(threads)
    buffer = torch.ones(int(gib * 2**30) // 4)
    buffer.sum()
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - started)
    return round(buffer.numel() * 4 / best / 1e9, 2)


def weight_bytes(model_dir: Path) -> int:
    """Bytes of the target's weights as stored (float32 here), from the safetensors headers."""
    from safetensors import safe_open
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                total += math.prod(piece.get_shape()) * _DTYPE_BYTES[piece.get_dtype()]
    return total


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "I8": 1}


def bench_prompts(args) -> list[str]:
    """The first num_prompts of --prompts, through the target's chat template with --chat, as a
    chat client sends them."""
    prompts = load_prompts(prompts_path(args.prompts), args.num_prompts)
    return chat_prompts(prompts, args.model_dir / "target") if args.chat else prompts


def mean_prompt_tokens(prompts: list[str], target: Path) -> float:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(target)
    return round(sum(len(tokenizer(p).input_ids) for p in prompts) / len(prompts), 2)


def in_process(setup, k, concurrency, prompts, max_tokens, model_dir, draft, max_num_seqs, precision: dict,
               costs_path=None) -> dict:
    """The engine without Triton, same cores and parameters; for PSD also its ideal. For flex,
    its step costs (start-up calibration, per-row overhead as learnt in the run) are saved to
    costs_path for `minedraft simulate`."""
    params = dict(SETUPS[setup][1])
    mode = params.pop("mode")
    engine = engine_for(mode, 2 * max_num_seqs if MODE_TRAITS[mode].two_batches else max_num_seqs, max(k, 1), model_dir,
                        draft_model=str(draft), **params, **precision)
    try:
        measure(engine, prompts, 2, k, 8, 2)  # warm-up
        engine.step_log.clear()
        row = measure(engine, prompts, concurrency, k, max_tokens, max(2 * concurrency, 8))
        target_seconds = sum(r.verify_span[1] - r.verify_span[0] + r.prefill_seconds for r in engine.step_log)
        # Ideal: the run costs only the target's own work, verification and prefill (drafting fully hidden).
        row["ideal_tokens_per_s"] = round(row["output_tokens"] / target_seconds, 2) if target_seconds else None
        if mode == "flex" and costs_path is not None:
            costs = engine.policy.costs
            Path(costs_path).write_text(replace(costs.table, overhead_per_row=costs.overhead_per_row).to_json())
    finally:
        engine.close()
    return row


def draft_sweep(setup: str, args) -> list[int]:
    if setup.startswith("ar"):
        return [0]
    if MODE_TRAITS[mode_of(setup)].chooses_each_step:
        return [max(args.draft_lengths)]  # a cap: flex and auto pick k (and AR, SD or PSD) themselves
    return args.sd_draft_lengths or args.draft_lengths if setup in SD_SETUPS else args.draft_lengths


def best(rows, setup, concurrency):
    return best_by_tokens_per_s([r for r in rows if r["setup"] == setup and r["concurrency"] == concurrency])


def expected_rate(rows: list[dict], setup: str, k: int, concurrency: int) -> float:
    """What a point's run is sized by: the set-up's own rate at the load before, else the fastest
    at this load, else 0. Where the rate rose with the load the span comes out shorter than asked
    (the same requests finish sooner); under half of it, the point is run again (measure_server)."""
    before = [r for r in rows if (r["setup"], r["num_draft_tokens"]) == (setup, k) and r["concurrency"] < concurrency]
    seen = before[-1:] or [r for r in rows if r["concurrency"] == concurrency]
    return best_by_tokens_per_s(seen)["tokens_per_s"] if seen else 0.0


def run(args) -> dict:
    from rich.progress import Progress
    machine_info = machine()  # before any engine pins this thread to its cores
    memory = {"read_gb_s": {threads: read_bandwidth(threads) for threads in (1, 2)},
              "target_weight_bytes": weight_bytes(args.model_dir / "target")}
    prompts = bench_prompts(args)
    workdir = Path(tempfile.mkdtemp(prefix="minedraft-bench-"))
    print(f"server-side rows are saved as they come to {workdir / 'rows.json'}")
    setups = args.setups
    precision = {"dtype": args.dtype, "draft_quantization": args.draft_quantization}
    build_repository(workdir / "repo", setups, args.max_num_seqs, max(args.draft_lengths), args.model_dir, args.draft,
                     precision)
    # Concurrency by concurrency, every set-up in turn: the set-ups compared at one load are measured
    # minutes apart, not an hour (a point drifts by +-10 % over a run on this machine).
    plan = [(s, k, c) for c in args.concurrency for s in setups for k in draft_sweep(s, args)]
    rows, extras = [], {}
    ports = [free_port() for _ in range(3)]
    with Progress() as progress, TritonServer(workdir / "repo", *ports, log_path=workdir / "server.log",
                                                  ready_timeout=1800) as server:
        task = progress.add_task("perf_analyzer", total=len(plan))
        for setup, k, c in plan:
            progress.update(task, description=f"{SETUPS[setup][0]} k={k} c={c}")
            rows.append(measure_server(server, setup, k, c, prompts, args, workdir, expected_rate(rows, setup, k, c)))
            (workdir / "rows.json").write_text(json.dumps(rows))  # what a failed run still measured
            progress.advance(task)
    server.stop()
    with Progress() as progress:
        # Flex runs in-process in any case: its start-up calibration and learnt per-row overhead are
        # the step costs the simulator is checked with.
        checks = [(s, c) for s in ("sd_1core", "psd") if s in setups for c in args.engine_concurrency]
        checks += [("flex", c) for c in (args.engine_concurrency if "flex" in setups else args.engine_concurrency[-1:])]
        task = progress.add_task("in-process engine", total=len(checks) + 1)
        engine_rows = []
        figures = report_dir(args.out, args.label)
        figures.mkdir(parents=True, exist_ok=True)
        for setup, c in checks:
            k = best(rows, setup, c)["num_draft_tokens"] if best(rows, setup, c) else max(args.draft_lengths)
            costs_path = figures / "costs.json" if setup == "flex" else None
            engine_rows.append({"setup": setup, **in_process(setup, k, c, prompts, args.max_tokens, args.model_dir,
                                                             args.draft, args.max_num_seqs, precision, costs_path)})
            progress.advance(task)
        extras["engine"] = engine_rows
        progress.update(task, description="HF assisted generation")
        extras["hf_assisted"] = hf_assisted_generation(args.model_dir, args.draft, prompts, args.max_tokens,
                                                       args.hf_prompts, args.dtype, args.draft_quantization)
        progress.advance(task)
    return {"machine": machine_info, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                           if k != "run"},
            "prompt_tokens": mean_prompt_tokens(prompts, args.model_dir / "target"), "memory": memory,
            "rows": rows, **extras}


def print_report(report: dict, out: Path | None) -> None:
    """A tool's JSON report, to stdout and to `out` when given."""
    text = json.dumps(report, indent=2)
    if out:
        out.write_text(text)
    print(text)


# The instruction sets that decide which CPU kernels run (bf16 and int8 matmuls): a figure names them.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")


def machine() -> dict:
    with open("/proc/cpuinfo") as cpuinfo:  # the first processor's fields: every core has the same
        fields = {}
        for key, _, value in (line.partition(":") for line in cpuinfo):
            fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name", platform.machine())
    flags = fields.get("flags", "").split()
    return {"cpu": model, "flags": ", ".join(f for f in CPU_FLAGS if f in flags) or "none of " + "/".join(CPU_FLAGS),
            "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "platform": platform.platform()}


def main_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--draft-lengths", type=int, nargs="+", default=[2, 4, 6, 8])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--sd-draft-lengths", type=int, nargs="+",
                        help="draft lengths swept for the SD set-ups (default: --draft-lengths)")
    parser.add_argument("--engine-concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--window-seconds", type=float, default=20.0,
                        help="the steady span each point's throughput is measured over")
    parser.add_argument("--learning-steps", type=int, default=600,
                        help="steps flex runs at each load before its span starts: enough to time each of its arms "
                             "(AR, and SD and PSD at draft lengths 1, 2, 4, ... up to k and k: 7 arms at k = 4) "
                             "for 32 settled steps in a batch-size bucket")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--hf-prompts", type=int, default=8)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--prompts", default="demo_pair",
                        help=f"a prompt set ({', '.join(PROMPT_SETS)}) or a JSONL of {{\"prompt\": ...}} (default: demo_pair)")
    parser.add_argument("--chat", action="store_true", help="send the prompts through the target's chat template")
    parser.add_argument("--draft", type=Path, help="another draft for the pair's target (default: the model dir's)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--draft-quantization", default="none", choices=("none", "int8", "int4"))
    parser.add_argument("--label", help="the pair's name in the report (default: the model's name in the repository)")
    parser.add_argument("--out", type=Path, default=Path("docs"))


def bench(args) -> int:
    args.label = args.label or args.model_dir.resolve().parent.name
    args.draft = args.draft or args.model_dir / "draft"
    results = run(args)
    results["command"] = " ".join(["minedraft", *sys.argv[1:]]) if sys.argv[0].endswith("minedraft") else "minedraft bench"
    write_report(results, args.out)
    print(f"wrote {report_dir(args.out, args.label)} and {args.out / 'benchmarks.md'}")
    return 0

