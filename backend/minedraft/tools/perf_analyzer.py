"""Locate and run perf_analyzer from tritonclient's manylinux wheel."""
import json
import os
import shutil
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
