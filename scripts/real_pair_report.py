"""The shipped real pair through tritonserver, in one run: a chat question streamed back, the
memory of the server with its python stub and drafter, and the dashboard panels under a
genai-perf load (docs/dashboard.png). Prints a JSON report.

  python scripts/real_pair_report.py --out docs/real-pair.json
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from transformers import AutoTokenizer

from minedraft.launcher import TritonServer, free_port
from minedraft.tools.processes import rss_kb_by_process
from minedraft.tools.repository import write_repository
from minedraft_client.grpc_stream import request_inputs, responses

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "model_repository" / "smollm2"
QUESTION = "What are three tips for writing readable Python code?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dashboard", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--requests", type=int, default=48)
    args = parser.parse_args()
    work = Path("/tmp/minedraft-real-pair")
    root = write_repository(work / "repo", {"smollm2": {"target_model": str(MODEL_DIR / "1" / "target"),
                                                        "draft_model": str(MODEL_DIR / "1" / "draft"),
                                                        "max_num_seqs": 8, "max_model_len": 2048}},
                            max_batch_size=16)
    server = TritonServer(root, *(free_port() for _ in range(3)), log_path=work / "server.log")
    server.start()
    report = {}
    try:
        server.wait_ready()
        tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR / "1" / "target")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                               add_generation_prompt=True)
        started, chunks, first = time.monotonic(), [], None
        for result in responses(server.grpc_url, "smollm2", request_inputs(prompt, {"max_tokens": 160,
                                                                                     "temperature": 0}), 300):
            chunks.append(result.as_numpy("text_output").reshape(-1)[0].decode())
            first = first or time.monotonic() - started
            drafted = int(result.as_numpy("num_draft_tokens").reshape(-1)[0])
            accepted = int(result.as_numpy("num_accepted_tokens").reshape(-1)[0])
        report["chat"] = {"question": QUESTION, "answer": "".join(chunks), "responses": len(chunks),
                          "drafted": drafted, "accepted": accepted}
        report["rss_kb_idle_after_one_request"] = rss_kb_by_process(server.process.pid)
        venv = ROOT / ".venv-genai-perf"
        cuda_runtime = glob.glob(str(venv / "lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
        env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
               "LD_LIBRARY_PATH": os.pathsep.join(cuda_runtime)}
        load = [str(venv / "bin" / "genai-perf"), "profile", "-m", "smollm2", "--backend", "vllm", "--streaming",
                "-u", server.grpc_url, "--tokenizer", str(MODEL_DIR / "1" / "target"), "--concurrency", "8",
                "--request-count", str(args.requests), "--synthetic-input-tokens-mean", "64",
                "--output-tokens-mean", "64", "--artifact-dir", str(work / "genai-perf")]
        dashboard = subprocess.run([sys.executable, "-m", "minedraft.tools.dashboard", "--metrics", server.metrics_url,
                                    "--model", "smollm2", "--seconds", "900", "--out", str(args.dashboard),
                                    "--", *load], env=env, capture_output=True, text=True)
        report["dashboard"] = {"returncode": dashboard.returncode, "png": str(args.dashboard.relative_to(ROOT))}
        if not glob.glob(str(work / "genai-perf" / "*" / "profile_export_genai_perf.csv")):
            raise RuntimeError(f"genai-perf failed:\n{dashboard.stdout[-3000:]}\n{dashboard.stderr[-3000:]}")
        report["rss_kb_after_load"] = rss_kb_by_process(server.process.pid)
        report["rss_kb_total_after_load"] = sum(report["rss_kb_after_load"].values())
        [table] = glob.glob(str(work / "genai-perf" / "*" / "profile_export_genai_perf.csv"))
        report["genai_perf"] = Path(table).read_text()
    finally:
        server.stop()
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
