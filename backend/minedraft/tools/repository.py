"""Build model repositories from the shipped minedraft config: one model per set of parameters.

The benchmark serves minedraft_ar / _sd / _psd side by side over the same weights; the tests
serve variants of the default. All start from model_repository/minedraft/config.pbtxt.
"""
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from minedraft.serving.launcher import DEFAULT_REPOSITORY

TEMPLATE = DEFAULT_REPOSITORY / "minedraft" / "config.pbtxt"
DEMO_VERSION_DIR = DEFAULT_REPOSITORY / "minedraft" / "1"


def read_config(path: Path) -> model_config_pb2.ModelConfig:
    """A config.pbtxt as Triton's own ModelConfig message (tritonclient ships its protobuf)."""
    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


def parameters(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def config_text(name: str, parameters: dict, max_batch_size: int | None = None, queue_size: int | None = None) -> str:
    """The shipped config renamed, with `parameters` overriding or extending its own."""
    config = read_config(TEMPLATE)
    config.name = name
    for key, value in parameters.items():
        config.parameters[key].string_value = str(value)
    if max_batch_size is not None:
        config.max_batch_size = max_batch_size
    if queue_size is not None:
        config.dynamic_batching.default_queue_policy.max_queue_size = queue_size
    return text_format.MessageToString(config)


def write_repository(root: Path, models: dict[str, dict], **config_kwargs) -> Path:
    """root/<name>/config.pbtxt for each model; weights default to the demo pair's absolute paths."""
    for name, parameters in models.items():
        parameters = {"target_model": str(DEMO_VERSION_DIR / "target"),
                      "draft_model": str(DEMO_VERSION_DIR / "draft"), **parameters}
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        (root / name / "config.pbtxt").write_text(config_text(name, parameters, **config_kwargs))
    return root
