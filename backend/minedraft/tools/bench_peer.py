"""The served default against llama.cpp on the same GGUF files, one client for both (issue 38's L1,
issue 39's L1 and L2).

    bash scripts/build_llama_cpp.sh        # once per machine, ~4 minutes
    python -m minedraft.tools.bench_peer [--model-dir model_repository/qwen-coder/1] [--concurrency 1 8]
        [--variants default int4_target] [--out FILE]

Ours: tritonserver serves the entry's config.pbtxt as shipped (`default`) and, with
`int4_target` and `w8a8_target`, the same plus `target_quantization`, behind the OpenAI entry of
`minedraft serve`, one server per variant in turn. llama.cpp: `llama-server` on the GGUFs `prepare_models` keeps beside the conversions
(`model.gguf`), alone (AR) and with the draft (`--spec-type draft-simple`, k as ours), with as many
slots as the concurrency, the same threads. Every server gets the same chat requests on held-out
prompts (greedy, a fixed number of tokens, ignore_eos) from `concurrency` clients; each set-up first
answers one round unmeasured. Throughput is completion tokens over the measured round's wall time.
Without a llama.cpp build its rows are skipped, with the command that builds it. Prints JSON.
"""
import argparse
import asyncio
import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Self

import aiohttp
import torch

from minedraft.policy.cost_model import STEP_MODES
from minedraft.serving.launcher import TritonServer
from minedraft.serving.openai_api import OpenAIEntry
from minedraft.serving.triton_metrics import read_metrics
from minedraft.worker_process import free_port

from .bench import machine, print_report
from .prepare_models import GGUF_NAME
from .repository import write_repository

LLAMA_CPP = Path.home() / ".cache" / "minedraft" / "llama.cpp" / "0.3.36" / "bin"
BUILD_HINT = "bash scripts/build_llama_cpp.sh"
VARIANTS = {"default": {}, "int4_target": {"target_quantization": "int4"}, "w8a8_target": {"target_quantization": "w8a8"}}


def shipped_parameters(model_dir: Path) -> dict:
    """The entry's config.pbtxt parameters, with its weights as absolute paths."""
    text = (model_dir.parent / "config.pbtxt").read_text()
    parameters = dict(re.findall(r'key: "(\w+)", value: \{ string_value: "([^"]*)" \}', text))
    for key in ("target_model", "draft_model"):
        parameters[key] = str((model_dir / parameters[key]).resolve())
    return parameters


async def measure(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int,
                  rounds: int) -> dict:
    """One unmeasured round of `concurrency` requests, then `rounds` per client, measured."""
    queue = list(prompts)

    async def client(session: aiohttp.ClientSession, count: int) -> int:
        tokens = 0
        for _ in range(count):
            prompt = queue.pop(0)
            queue.append(prompt)
            body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True}
            async with session.post(f"{url}/chat/completions", json=body) as response:
                answer = await response.json()
                if response.status != 200:
                    raise RuntimeError(f"{model} at {url}: {response.status} {answer}")
                tokens += answer["usage"]["completion_tokens"]
        return tokens

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        await asyncio.gather(*(client(session, 1) for _ in range(concurrency)))
        started = time.monotonic()
        tokens = sum(await asyncio.gather(*(client(session, rounds) for _ in range(concurrency))))
        seconds = time.monotonic() - started
    return {"concurrency": concurrency, "requests": rounds * concurrency, "completion_tokens": tokens,
            "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 2)}


class LlamaServer:
    """llama-server on a GGUF (and its draft), for `slots` concurrent requests."""

    def __init__(self, binary: Path, target: Path, draft: Path | None, slots: int, threads: int,
                 num_draft_tokens: int, context: int, log_path: Path):
        self.port = free_port()
        command = [str(binary), "-m", str(target), "-t", str(threads), "-tb", str(threads), "-np", str(slots),
                   "-c", str(context * slots), "--port", str(self.port), "--host", "127.0.0.1"]
        if draft is not None:
            command += ["-md", str(draft), "--spec-type", "draft-simple", "--spec-draft-n-max", str(num_draft_tokens),
                        "--spec-draft-n-min", "0", "-td", str(threads)]
        self.command, self.log_path = command, log_path

    def __enter__(self) -> Self:
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited ({self.process.returncode}); see {self.log_path}")
            if _healthy(f"http://127.0.0.1:{self.port}/health"):
                return self
            time.sleep(1)
        raise RuntimeError(f"llama-server not ready in 300 s; see {self.log_path}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def policy_counts(before: dict, after: dict) -> dict:
    """What the policy chose over a measurement (warm-up round included), and the acceptance."""
    def delta(name):
        return after.get(name, 0) - before.get(name, 0)
    drafted = delta("minedraft_draft_tokens_total")
    return {"steps_by_mode": {mode: delta(f"minedraft_policy_steps_total/{mode}") for mode in STEP_MODES},
            "acceptance_rate": round(delta("minedraft_accepted_tokens_total") / drafted, 4) if drafted else None}


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:  # not listening yet, or 503 while it loads
        return False


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path("model_repository/qwen-coder/1"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="measured requests per client")
    parser.add_argument("--prompts", default="heldout")
    parser.add_argument("--llama-cpp", type=Path, default=LLAMA_CPP, help="the folder of llama-server")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from minedraft.prompts import prompts_path
    prompts = [json.loads(line)["prompt"] for line in prompts_path(args.prompts).open()]
    parameters = shipped_parameters(args.model_dir)
    workdir = Path(tempfile.mkdtemp(prefix="minedraft-bench-peer-"))
    rows = []

    def record(server: str, setup: str, point: dict) -> None:
        rows.append({"server": server, "setup": setup, **point})
        print(f"{server} {setup} c={point['concurrency']}: {point['tokens_per_s']} tok/s", flush=True)

    entry_name = args.model_dir.resolve().parent.name
    load_s = {}  # start to ready: loading, quantizing, compiling and auto's calibration
    # One server per variant, one after the other: each has the machine's cores and memory to
    # itself, while it loads (auto's calibration times its steps then) and while it is measured.
    for variant in args.variants:
        name = f"{entry_name}-{variant}"
        repository = write_repository(workdir / variant, {name: {**parameters, **VARIANTS[variant]}},
                                      max_batch_size=2 * int(parameters["max_num_seqs"]), queue_size=256)
        started = time.monotonic()
        with TritonServer(repository, *(free_port() for _ in range(3)), log_path=workdir / f"{variant}.log",
                          ready_timeout=1800) as server:
            load_s[name] = round(time.monotonic() - started, 1)
            entry = OpenAIEntry(free_port(), server.grpc_url, repository, host="127.0.0.1").start()
            try:
                for concurrency in args.concurrency:
                    before = read_metrics(server.metrics_url, name)
                    point = asyncio.run(measure(entry.url, name, prompts, concurrency, args.max_tokens, args.rounds))
                    record("minedraft", name, {**point, **policy_counts(before, read_metrics(server.metrics_url, name))})
            finally:
                entry.stop()
    server_binary = args.llama_cpp / "llama-server"
    target_gguf = Path(parameters["target_model"]) / GGUF_NAME
    draft_gguf = Path(parameters["draft_model"]) / GGUF_NAME
    skipped = None
    if shutil.which(str(server_binary)) is None:
        skipped = f"llama.cpp is not built here ({server_binary}): {BUILD_HINT}"
    elif not target_gguf.is_file():
        skipped = f"no GGUF beside the weights ({target_gguf}): python -m minedraft.tools.prepare_models"
    if skipped:
        print(skipped, flush=True)
    else:
        threads = torch.get_num_threads()
        for concurrency in args.concurrency:
            for setup, draft in (("ar", None), ("speculative", draft_gguf)):
                with LlamaServer(server_binary, target_gguf, draft, concurrency, threads,
                                 int(parameters["num_draft_tokens"]), 4096,
                                 workdir / f"llama-{setup}-{concurrency}.log") as peer:
                    record("llama.cpp", setup, asyncio.run(measure(peer.url, "peer", prompts, concurrency,
                                                                   args.max_tokens, args.rounds)))
    report = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "skipped": skipped,
              "load_s": load_s, "rows": rows}
    print_report(report, args.out)


if __name__ == "__main__":
    main()
