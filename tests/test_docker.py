"""Static checks of docker/Dockerfile (no Docker engine here): it parses, its COPY sources exist,
and its base image is the NGC release of the Triton the tests run."""
from pathlib import Path

import dockerfile
from conftest import TESTED_TRITON_VERSION

REPO = Path(__file__).resolve().parents[1]
# NGC's tritonserver YY.MM release for each server version.
NGC_RELEASE = {"2.51.0": "24.10"}


def commands():
    return dockerfile.parse_file(str(REPO / "docker" / "Dockerfile"))


def test_dockerfile_parses_and_serves_the_model_repository():
    cmds = commands()
    assert cmds[0].cmd == "FROM"
    assert any(c.cmd == "CMD" and any("--model-repository" in v for v in c.value) for c in cmds)
    assert any("/opt/tritonserver/backends/minedraft/model.py" in c.original for c in cmds)


def test_every_copied_path_exists():
    for c in commands():
        if c.cmd == "COPY":
            for source in c.value[:-1]:
                assert (REPO / source).exists(), source


def test_base_image_matches_the_tested_triton():
    """test_server checks that the server the tests run reports TESTED_TRITON_VERSION."""
    image = commands()[0].value[0]
    assert image == f"nvcr.io/nvidia/tritonserver:{NGC_RELEASE[TESTED_TRITON_VERSION]}-py3"
