"""Build model repositories from the shipped minedraft config: one model per set of parameters.

The benchmark serves minedraft_ar / _sd / _psd side by side over the same weights; the tests
serve variants of the default. All start from model_repository/minedraft/config.pbtxt.
"""
import re
from pathlib import Path

from ..launcher import DEFAULT_REPOSITORY

TEMPLATE = DEFAULT_REPOSITORY / "minedraft" / "config.pbtxt"
DEMO_VERSION_DIR = DEFAULT_REPOSITORY / "minedraft" / "1"
_PARAMETER = re.compile(r'\{ key: "(\w+)", value: \{ string_value: "([^"]*)" \} \}')


def config_text(name: str, parameters: dict, max_batch_size: int | None = None, queue_size: int | None = None) -> str:
    """The shipped config renamed, with `parameters` overriding or extending its own."""
    text = TEMPLATE.read_text()
    merged = dict(_PARAMETER.findall(text))
    merged.update({k: str(v) for k, v in parameters.items()})
    entries = ",\n".join(f'  {{ key: "{k}", value: {{ string_value: "{v}" }} }}' for k, v in merged.items())
    text = re.sub(r"parameters \[.*?\n\]", f"parameters [\n{entries}\n]", text, flags=re.S)
    text = re.sub(r'^name: ".*"$', f'name: "{name}"', text, flags=re.M)
    if max_batch_size is not None:
        text = re.sub(r"^max_batch_size: \d+$", f"max_batch_size: {max_batch_size}", text, flags=re.M)
    if queue_size is not None:
        text = re.sub(r"max_queue_size: \d+", f"max_queue_size: {queue_size}", text)
    return text


def write_repository(root: Path, models: dict[str, dict], **config_kwargs) -> Path:
    """root/<name>/config.pbtxt for each model; weights default to the demo pair's absolute paths."""
    for name, parameters in models.items():
        parameters = {"target_model": str(DEMO_VERSION_DIR / "target"),
                      "draft_model": str(DEMO_VERSION_DIR / "draft"), **parameters}
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        (root / name / "config.pbtxt").write_text(config_text(name, parameters, **config_kwargs))
    return root
