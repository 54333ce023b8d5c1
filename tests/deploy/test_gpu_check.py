"""scripts/gpu_check.sh: every step on the CPU provider (GPU_CHECK_DEVICE=cpu, this venv, small
settings), its loud failures, the venv's requirements, and shellcheck where it is installed. The real
GPU run (a fresh venv with onnxruntime-gpu) needs a GPU machine: `scripts/gpu_check.sh OUT_DIR`
there; test_gpu_run_in_this_venv runs the cuda path where this onnxruntime has CUDA."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
HELPER = ROOT / "scripts" / "gpu_check.py"
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def gpu_check(out: Path, data_dir: Path | None = None, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """The script in this venv (no installs), without the caller's NMT_* variables."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NMT_", "GPU_CHECK_"))}
    base.update(GPU_CHECK_VENV=sys.prefix, GPU_CHECK_INSTALL="0", **env)
    if data_dir is not None:
        base["NMT_DATA_DIR"] = str(data_dir)
    return subprocess.run([str(SCRIPT), str(out)], capture_output=True, text=True, timeout=timeout, env=base, cwd=ROOT)


def helper(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HELPER), *argv], capture_output=True, text=True, timeout=120)


def summary_lines(out: Path) -> list[str]:
    return (out / "summary.txt").read_text().splitlines()


def test_the_venv_gets_onnxruntime_gpu_with_its_cuda_wheels_and_never_onnxruntime() -> None:
    pinned = next(
        line
        for line in (ROOT / "deploy/constraints/cuda.txt").read_text().splitlines()
        if line.startswith("onnxruntime-gpu==")
    )
    lines = helper("requirements").stdout.splitlines()
    names = [re.split(r"[\[<>=!~; ]", line, maxsplit=1)[0] for line in lines]
    assert "onnxruntime" not in names and "nmt-service" not in names, lines  # it would replace onnxruntime-gpu's module
    assert pinned.replace("onnxruntime-gpu", "onnxruntime-gpu[cuda,cudnn]") in lines
    assert {
        "nvidia-cublas",
        "nvidia-cudnn-cu13",
        "nvidia-cuda-runtime",
        "nvidia-curand",
        "torch",
        "ctranslate2",
        "onnx",
        "grpcio",
    } <= set(names)
    assert all("==" in line for line in lines if line.startswith("nvidia-"))
    unpinned = helper("requirements", "--no-cuda-pins").stdout.splitlines()
    assert [line for line in unpinned if line.startswith("nvidia-")] == []  # CUDA torch pins its own


def test_german_check(tmp_path: Path) -> None:
    texts = helper("texts").stdout.splitlines()
    good = tmp_path / "good.txt"
    good.write_text("Ein Mann fährt Fahrrad.\nZwei Hunde spielen im Schnee.\nEine Frau sitzt auf einer Bank.\n")
    assert helper("german", str(good)).returncode == 0
    for bad in (texts, ["Ein Mann.", "", "Eine Frau."], ["Ein Mann."]):
        (tmp_path / "bad.txt").write_text("\n".join(bad) + "\n")
        done = helper("german", str(tmp_path / "bad.txt"))
        assert done.returncode != 0 and done.stderr.strip(), bad


@pytest.mark.slow
def test_cpu_dry_run_runs_every_step_and_says_ok(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = gpu_check(out, data_dir, GPU_CHECK_DEVICE="cpu")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = summary_lines(out)
    assert lines[-1].startswith("gpu_check: OK"), lines
    assert [line.split(":")[0] for line in lines if line.startswith("step ")] == [
        "step 1 install",
        "step 2 export",
        "step 3 serve",
        "step 4 decode-bench",
    ]
    assert "FAILED" not in done.stdout + done.stderr
    for name in (
        "env.json",
        "parity.json",
        "selfcheck.json",
        "bundle/manifest.json",
        "serve/translations.txt",
        "serve/info.txt",
        "serve/engine_info.json",
        "decode/decode.json",
        "decode/decode.md",
        "logs/2-export.log",
        "logs/3-serve.log",
        "logs/4-decode.log",
    ):
        assert (out / name).is_file(), name
    assert json.loads((out / "selfcheck.json").read_text())["passed"] is True
    assert json.loads((out / "parity.json").read_text())["verdict"]["greedy_identical"] >= 0.99
    engine = json.loads((out / "serve/engine_info.json").read_text())
    assert (engine["provider"], engine["variant"]) == ("CPUExecutionProvider", "fp32-cpu")
    assert (out / "serve/health.txt").read_text().strip() == "SERVING"
    assert len((out / "serve/translations.txt").read_text().splitlines()) == 3
    decode = json.loads((out / "decode/decode.json").read_text())
    assert decode["engines"] == ["torch", "ort-fp32", "ct2-float32"] and not decode["skipped"]
    assert "exporting" not in (out / "logs/4-decode.log").read_text()  # the bench reused step 2's bundle


def test_a_failing_step_exits_nonzero_with_the_failed_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = gpu_check(out, GPU_CHECK_DEVICE="cpu", GPU_CHECK_MODEL=str(tmp_path / "no-such-model"), timeout=60)
    assert done.returncode == 1
    line = f"FAILED: step 1 (install): no checkpoint at {tmp_path / 'no-such-model'} (GPU_CHECK_MODEL)"
    assert line in done.stderr.splitlines()
    assert summary_lines(out)[-2] == line and summary_lines(out)[-1].startswith("gpu_check: FAILED")


@pytest.mark.slow
def test_a_failing_command_names_its_step_its_error_and_its_log(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = gpu_check(out, data_dir, GPU_CHECK_DEVICE="cpu", GPU_CHECK_PARITY_LIMIT="0", timeout=120)
    assert done.returncode == 1
    failed = [line for line in done.stderr.splitlines() if line.startswith("FAILED:")]
    assert failed == [
        f"FAILED: step 2 (export): export exited 2: error: parity_limit must be at least 1, got 0 "
        f"(log: {out}/logs/2-export.log)"
    ], done.stderr
    assert summary_lines(out)[1].startswith("step 1 install: OK")


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has the CUDA provider")
def test_the_cuda_path_stops_at_step_1_without_the_cuda_provider(data_dir: Path, tmp_path: Path) -> None:
    done = gpu_check(tmp_path / "out", data_dir, timeout=120)
    assert done.returncode == 1
    assert "FAILED: step 1 (install): env exited 1: onnxruntime" in done.stderr
    assert "has no CUDAExecutionProvider" in done.stderr


def test_it_refuses_a_non_empty_out_dir_and_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep")
    done = gpu_check(tmp_path, GPU_CHECK_DEVICE="cpu", timeout=30)
    assert done.returncode == 2 and "is not empty" in done.stderr and (tmp_path / "mine.txt").exists()
    assert gpu_check(tmp_path / "x", GPU_CHECK_DEVICE="tpu", timeout=30).returncode == 2
    usage = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and usage.stderr.startswith("usage:")


def test_shellcheck_is_clean() -> None:
    binary = shutil.which("shellcheck")
    if binary is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    done = subprocess.run([binary, "--severity=style", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime's CUDAExecutionProvider")
def test_gpu_run_in_this_venv(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = gpu_check(out, data_dir, timeout=600, GPU_CHECK_PARITY_LIMIT="100", GPU_CHECK_BENCH_SENTENCES="8")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    engine = json.loads((out / "serve/engine_info.json").read_text())
    assert (engine["provider"], engine["variant"]) == ("CUDAExecutionProvider", "fp16-cuda")
