"""Memory, long contexts and conversations through the server (issue 40's K1, K2, K4, K5, K7).

    python -m minedraft.tools.bench_context [--model-dir model_repository/qwen-coder/1]
        [--baseline-source DIR --baseline-max-model-len 4096] [--out FILE]

One tritonserver serves the entry's config.pbtxt as shipped behind the OpenAI entry of `minedraft
serve`, then, with `--baseline-source`, one whose backend is imported from DIR/backend (a checkout
of the build to compare with; its config as shipped then, `--baseline-max-model-len`), one after
the other. For each:

- memory: the proportional set size (PSS: shared pages split between their processes) of the
  server and every process under it, at idle after loading, and its peak while `--in-flight`
  short chat requests run at once;
- a conversation through the chat template: each turn adds about `--turn-tokens` tokens of code
  (this repository's own sources) and asks for a `--answer-tokens`-token answer (greedy,
  ignore_eos), the history re-sent whole as chat clients do; per turn the prompt's tokens, the
  time to first token, and the decode time a token after it. Then the same conversation again
  with `num_draft_tokens` 0 (target-only steps, its history now cached): its decode time a token
  is what the context costs, without the draft's acceptance, which varies with a turn's text;
- throughput: completion tokens a second at each `--concurrency` on the held-out prompts (as
  bench_peer measures it).
Prints JSON.
"""
import argparse
import asyncio
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import psutil
from transformers import AutoTokenizer

from minedraft.serving import launcher
from minedraft.serving.launcher import TritonServer
from minedraft.serving.openai_api import OpenAIEntry
from minedraft.serving.triton_metrics import read_metrics
from minedraft.worker_process import free_port

from .bench import machine, print_report
from .bench_peer import measure, shipped_parameters
from .repository import write_repository

SOURCES = Path(__file__).resolve().parents[1]  # the minedraft package: code to talk about
POOL_METRICS = ("minedraft_prefix_cache_queries_total", "minedraft_prefix_cache_hits_total",
                "minedraft_num_preemptions_total", "minedraft_kv_cache_blocks_total")


def tree_pss_mb(pid: int) -> float:
    """PSS of a process and all its descendants, in MB."""
    total = 0
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return round(total / 1e6, 1)


class PeakSampler:
    """The largest PSS of a process tree, sampled every `interval` s while active."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.pid, self.interval, self.peak = pid, interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_pss_mb(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def code_turns(tokenizer, num_turns: int, turn_tokens: int) -> list[str]:
    """`num_turns` pieces of this package's source, about `turn_tokens` tokens each."""
    text = "".join(path.read_text() for path in sorted(SOURCES.rglob("*.py")))
    ids = tokenizer(text).input_ids
    return [tokenizer.decode(ids[i * turn_tokens:(i + 1) * turn_tokens]) for i in range(num_turns)]


def policy_steps(metrics_url: str, model: str) -> float:
    metrics = read_metrics(metrics_url, model)
    return sum(value for key, value in metrics.items() if key.startswith("minedraft_policy_steps_total/"))


async def conversation(url: str, metrics_url: str, model: str, turns: list[str], answer_tokens: int,
                       num_draft_tokens: int | None = None) -> list[dict]:
    """Per turn, besides the time to first token and the decode time a token, the decode time a
    step: a step's cost is what the context changes; tokens a step follow the draft's acceptance."""
    messages, report = [], []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        for number, code in enumerate(turns, 1):
            messages.append({"role": "user", "content": f"More of our code:\n```python\n{code}\n```\n"
                                                        "What does this part do?"})
            body = {"model": model, "messages": messages, "max_tokens": answer_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            if num_draft_tokens is not None:
                body["num_draft_tokens"] = num_draft_tokens
            steps_before = policy_steps(metrics_url, model)
            started, first, last, answer, usage = time.monotonic(), None, None, "", {}
            async with session.post(f"{url}/chat/completions", json=body) as response:
                if response.status != 200:
                    raise RuntimeError(f"turn {number}: {response.status} {await response.text()}")
                async for line in response.content:
                    line = line.decode().strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[5:])
                    usage = event.get("usage") or usage
                    for choice in event.get("choices", []):
                        if choice.get("delta", {}).get("content"):
                            now = time.monotonic()
                            first = first or now
                            last = now
                            answer += choice["delta"]["content"]
            messages.append({"role": "assistant", "content": answer})
            tokens = usage.get("completion_tokens", answer_tokens)
            steps = policy_steps(metrics_url, model) - steps_before  # the first step brought the first token
            report.append({"turn": number, "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": tokens,
                           "ttft_s": round(first - started, 3),
                           "decode_ms_per_token": round((last - first) * 1000 / max(1, tokens - 1), 1),
                           "steps": steps, "decode_ms_per_step": round((last - first) * 1000 / max(1, steps - 1), 1)})
            print(f"{model} turn {number}: {report[-1]}", flush=True)
    return report


async def in_flight(url: str, model: str, prompts: list[str], count: int, max_tokens: int) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        async def one(prompt):
            body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True}
            async with session.post(f"{url}/chat/completions", json=body) as response:
                await response.read()
        await asyncio.gather(*(one(prompts[i % len(prompts)]) for i in range(count)))


def measure_build(name: str, parameters: dict, workdir: Path, args, prompts: list[str], turns: list[str],
                  pythonpath: str | None) -> dict:
    repository = write_repository(workdir / name, {name: parameters},
                                  max_batch_size=2 * int(parameters["max_num_seqs"]), queue_size=256)
    saved = os.environ.get("PYTHONPATH"), launcher.ADAPTER
    if pythonpath:
        # This build's minedraft, in worker processes (PYTHONPATH) and in the python backend's stub,
        # which does not read PYTHONPATH: an adapter that puts the build first on sys.path.
        os.environ["PYTHONPATH"] = pythonpath
        launcher.ADAPTER = workdir / f"{name}_adapter.py"
        launcher.ADAPTER.write_text(f"import sys\nsys.path.insert(0, {pythonpath!r})\n"
                                    "from minedraft.serving.triton_model import TritonPythonModel  # noqa: F401\n")
    try:
        started = time.monotonic()
        with TritonServer(repository, *(free_port() for _ in range(3)), log_path=workdir / f"{name}.log",
                          ready_timeout=1800) as server:
            result = {"build": name, "pythonpath": pythonpath, "max_model_len": int(parameters["max_model_len"]),
                      "load_s": round(time.monotonic() - started, 1)}
            time.sleep(5)
            result["idle_pss_mb"] = tree_pss_mb(server.process.pid)
            entry = OpenAIEntry(free_port(), server.grpc_url, repository, host="127.0.0.1").start()
            try:
                with PeakSampler(server.process.pid) as sampler:
                    asyncio.run(in_flight(entry.url, name, prompts, args.in_flight, args.in_flight_tokens))
                result["in_flight_peak_pss_mb"] = sampler.peak
                result["after_pss_mb"] = tree_pss_mb(server.process.pid)
                before = read_metrics(server.metrics_url, name)
                result["conversation"] = asyncio.run(conversation(entry.url, server.metrics_url, name, turns,
                                                                  args.answer_tokens))
                after = read_metrics(server.metrics_url, name)
                result["conversation_target_only"] = asyncio.run(conversation(
                    entry.url, server.metrics_url, name, turns, args.answer_tokens, num_draft_tokens=0))
                result["pool_metrics"] = {key: after.get(key, 0) - (0 if key.endswith("blocks_total")
                                                                    else before.get(key, 0))
                                          for key in POOL_METRICS if key in after}
                result["throughput"] = [asyncio.run(measure(entry.url, name, prompts, concurrency, args.max_tokens,
                                                            args.rounds)) for concurrency in args.concurrency]
                result["peak_pss_mb"] = tree_pss_mb(server.process.pid)
            finally:
                entry.stop()
    finally:
        launcher.ADAPTER = saved[1]
        if saved[0] is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved[0]
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("conversation")}), flush=True)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path("model_repository/qwen-coder/1"))
    parser.add_argument("--baseline-source", type=Path, help="a checkout of the build to compare with")
    parser.add_argument("--baseline-max-model-len", type=int, default=4096)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--in-flight-tokens", type=int, default=32)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--turn-tokens", type=int, default=500)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="measured requests per client")
    parser.add_argument("--prompts", default="heldout")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from minedraft.prompts import prompts_path
    prompts = [json.loads(line)["prompt"] for line in prompts_path(args.prompts).open()]
    parameters = shipped_parameters(args.model_dir)
    turns = code_turns(AutoTokenizer.from_pretrained(parameters["target_model"]), args.turns, args.turn_tokens)
    workdir = Path(tempfile.mkdtemp(prefix="minedraft-bench-context-"))
    entry_name = args.model_dir.resolve().parent.name
    builds = [measure_build(f"{entry_name}-paged", parameters, workdir, args, prompts, turns, None)]
    if args.baseline_source:
        baseline = {key: value for key, value in parameters.items()
                    if key not in ("block_size", "kv_cache_memory_bytes", "enable_prefix_caching")}
        baseline["max_model_len"] = str(args.baseline_max_model_len)
        builds.append(measure_build(f"{entry_name}-baseline", baseline, workdir, args, prompts, turns,
                                    str(args.baseline_source.resolve() / "backend")))
    report = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "builds": builds}
    print_report(report, args.out)


if __name__ == "__main__":
    main()
