"""genai-perf 0.0.16, NVIDIA's LLM benchmark for Triton, run unmodified against a minedraft model
(`--backend vllm`: it sends numbers as strings, which vllm_backend's contract accepts). It lives in
its own virtualenv (.venv-genai-perf, made by scripts/setup.sh test): it pins numpy 2 and pandas,
which the serving environment's tritonclient does not accept."""
import csv
import glob
import os
import subprocess

import pytest
from conftest import REPO
from minedraft.serving.launcher import TritonServer
from minedraft.tools.repository import DEMO_VERSION_DIR, write_repository
from minedraft.worker_process import free_port

pytestmark = pytest.mark.server
VENV = REPO / ".venv-genai-perf"


def test_genai_perf_profiles_a_minedraft_model(demo_pair, tmp_path):
    if not (VENV / "bin" / "genai-perf").exists():
        if os.environ.get("CI"):
            pytest.fail("scripts/setup.sh test makes .venv-genai-perf")
        pytest.skip("no .venv-genai-perf (bash scripts/setup.sh test makes it)")
    root = write_repository(tmp_path / "repo", {"minedraft": {"max_num_seqs": 4}}, max_batch_size=8)
    server = TritonServer(root, *(free_port() for _ in range(3)), log_path=tmp_path / "server.log")
    server.start()
    try:
        server.wait_ready()
        cuda_runtime = glob.glob(str(VENV / "lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
        env = {**os.environ, "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
               "LD_LIBRARY_PATH": os.pathsep.join(cuda_runtime)}
        run = subprocess.run([str(VENV / "bin" / "genai-perf"), "profile", "-m", "minedraft", "--backend", "vllm",
                              "--streaming", "-u", server.grpc_url, "--tokenizer", str(DEMO_VERSION_DIR / "target"),
                              "--concurrency", "2", "--request-count", "12", "--synthetic-input-tokens-mean", "32",
                              "--output-tokens-mean", "24", "--artifact-dir", str(tmp_path / "artifacts")],
                             env=env, capture_output=True, text=True, timeout=600)
    finally:
        server.stop()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "had error" not in run.stdout + run.stderr
    [table] = glob.glob(str(tmp_path / "artifacts" / "*" / "profile_export_genai_perf.csv"))
    rows = {row[0]: row for row in csv.reader(open(table)) if row}

    def number(name: str) -> float:  # genai-perf writes thousands with a comma ("2,086.23")
        return float(rows[name][1].replace(",", ""))
    assert number("Time To First Token (ms)") > 0
    assert number("Request Count (count)") == 12
    # genai-perf counts output tokens by tokenizing the text again, so the count can move by a token or so.
    assert 20 <= number("Output Sequence Length (tokens)") <= 28
