"""Locate and run perf_analyzer from tritonclient's manylinux wheel."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def perf_analyzer_binary() -> str:
    found = shutil.which("perf_analyzer") or str(Path(sys.executable).parent / "perf_analyzer")
    if not os.path.exists(found):
        raise FileNotFoundError("perf_analyzer not found: pip install 'tritonclient[all]==2.51.0' (manylinux wheel)")
    return found


def perf_analyzer_env() -> dict:
    """perf_analyzer links libcudart.so.12 even on CPU; the nvidia-cuda-runtime-cu12 wheel has it."""
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime
        lib = os.path.join(list(nvidia.cuda_runtime.__path__)[0], "lib")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [lib, env.get("LD_LIBRARY_PATH")]))
    except ImportError:
        pass
    return env


def write_input_data(path: Path, prompts: list[str], sampling_parameters: dict) -> Path:
    """perf_analyzer --input-data file: one entry per prompt, each streamed."""
    params = json.dumps(sampling_parameters)
    data = [{"text_input": [p], "stream": [True], "sampling_parameters": [params]} for p in prompts]
    path.write_text(json.dumps({"data": data}))
    return path


def run_with_export(args: list[str], export: Path, attempts: int = 3, timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run perf_analyzer with `--profile-export-file export` until it exits 0 with a whole export.

    perf_analyzer 2.51 (the one in tritonclient 2.51's wheel) now and then exits 0 having written an
    empty export (seen once in CI and once under genai-perf, not reproducible in 10 runs here) or a
    truncated one (cut at 327,680 bytes, once, toy pair, c = 64, 2026-11-29); its
    response outputs were read through dangling buffers until perf_analyzer PR #153, released after
    2.51. A run is one sample, so running it again is sound. `args` may grow between attempts
    (longer windows): it is called with the attempt number when it is callable."""
    for attempt in range(attempts):
        cmd = args(attempt) if callable(args) else args
        export.unlink(missing_ok=True)
        run = subprocess.run([perf_analyzer_binary(), *cmd, "--profile-export-file", str(export)],
                             env=perf_analyzer_env(), capture_output=True, text=True, timeout=timeout)
        if run.returncode == 0 and is_whole_json(export):
            return run
    raise RuntimeError(f"perf_analyzer gave no profile export in {attempts} runs (exit {run.returncode}):\n"
                       f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}")


def is_whole_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return True
