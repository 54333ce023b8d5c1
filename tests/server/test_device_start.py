"""What nmt-serve does with the device it is given: `--device cuda` without a usable CUDA provider exits
with one line (no traceback); a variant the export could not check is checked at start (a mismatch
exits 2); /metrics says which provider and variant serve (nmt_engine_info), scraped over HTTP."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import onnxruntime as ort
import pytest
from bundle_edit import rewrite_manifest, unvalidate
from grpc_helpers import channel, server_config, stub
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from nmt.server.main import create_server
from nmt.server.nmt_pb import translation_pb2 as pb

pytestmark = pytest.mark.asyncio
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
NMT_SERVE = Path(sys.executable).with_name("nmt-serve")  # the console script of this environment


def run_nmt_serve(*argv: str) -> subprocess.CompletedProcess[str]:
    command = [str(NMT_SERVE)] if NMT_SERVE.is_file() else [sys.executable, "-m", "nmt.server.main"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NMT_")}
    return subprocess.run(
        [*command, "--port", "0", "--metrics-port", "-1", "--threads", "1", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this onnxruntime has the CUDA provider")
async def test_device_cuda_without_the_provider_exits_with_one_line(bundle_dir: Path) -> None:
    done = await asyncio.to_thread(run_nmt_serve, "--model-dir", str(bundle_dir), "--device", "cuda")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"nmt-serve: error: device 'cuda' needs onnxruntime's {CUDA}, but this onnxruntime {ort.__version__} has only "
        f"{', '.join(ort.get_available_providers())} (install onnxruntime-gpu, or use device 'cpu' or 'auto')"
    ]


async def test_a_failed_start_up_check_exits_2(bundle_dir: Path, tmp_path: Path) -> None:
    bad = rewrite_manifest(bundle_dir, tmp_path / "bad", unvalidate("fp32-cpu", tamper=True))
    done = await asyncio.to_thread(run_nmt_serve, "--model-dir", str(bad), "--device", "cpu", "--precision", "fp32")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith(
        f"nmt-serve: error: self-check failed: variant fp32-cpu on {CPU} differs from the "
        "exporter's torch reference on 1 of "
    ), done.stderr


def engine_info(port: int) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        families = {f.name: f.samples for f in text_string_to_metric_families(page.read().decode())}
    (sample,) = families["nmt_engine_info"]
    assert sample.value == 1
    return sample.labels


@pytest.mark.parametrize("validated", [True, False])
async def test_metrics_say_which_provider_and_variant_serve(bundle_dir: Path, tmp_path: Path, validated: bool) -> None:
    bundle = bundle_dir if validated else rewrite_manifest(bundle_dir, tmp_path / "b", unvalidate("fp32-cpu"))
    cfg = server_config(bundle, metrics_port=0, precision="fp32")
    server, _ = await create_server(cfg, registry=CollectorRegistry())  # loads the bundle: the real start path
    await server.start()
    try:
        labels = await asyncio.to_thread(engine_info, server.metrics_port)
        async with channel(server) as ch:
            info = await stub(ch).GetModelInfo(pb.GetModelInfoRequest())
    finally:
        await server.stop(1.0)
    assert labels == {
        "device": "cpu",
        "provider": CPU,
        "variant": "fp32-cpu",
        "onnxruntime": ort.__version__,
        "selfcheck": "validated" if validated else "passed",
        "model": info.name,
        "version": info.version,
    }  # one series per model, labelled with it
    assert (info.provider, info.precision) == (CPU, "fp32-cpu")
