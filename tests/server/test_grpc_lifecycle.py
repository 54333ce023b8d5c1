"""Health, reflection, /metrics over HTTP, configuration, a bad bundle, and SIGTERM under load."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import TEXTS, channel, serve, server_config, start_nmt_serve, stub
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from nmt.engine.bundle import manifest_variants
from nmt.server.config import FLAGS, ServerConfig, env_var, from_args, parser
from nmt.server.main import main
from nmt.server.nmt_pb import translation_pb2 as pb

pytestmark = pytest.mark.asyncio


def scrape(port: int) -> dict[str, list]:
    """{family name: samples} from the /metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


async def test_health_reports_serving_then_not_serving(grpc_bundle, grpc_translator) -> None:
    async with serve(server_config(grpc_bundle), grpc_translator) as server:
        async with channel(server) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", "nmt.v1.TranslationService"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            await server.health.enter_graceful_shutdown()  # what stop() does first
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_reflection_lists_the_services(default_server) -> None:
    def services() -> tuple[list[str], list[str]]:
        with grpc.insecure_channel(f"127.0.0.1:{default_server.port}") as ch:
            db = ProtoReflectionDescriptorDatabase(ch)
            names = sorted(db.get_services())
            proto = db.FindFileContainingSymbol("nmt.v1.TranslationService")
            return names, [m.name for m in proto.service[0].method]

    names, methods = await asyncio.to_thread(services)
    assert names == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "nmt.v1.TranslationService",
    ]
    assert methods == ["Translate", "TranslateStream", "GetModelInfo", "ListModels"]


async def test_metrics_served_over_http(grpc_bundle, grpc_translator) -> None:
    cfg = server_config(grpc_bundle, metrics_port=0)
    async with serve(cfg, grpc_translator) as server, channel(server) as ch:
        await stub(ch).Translate(pb.TranslateRequest(texts=["A dog.", "A cat on a mat."]))
        families = await asyncio.to_thread(scrape, server.metrics_port)
    by_labels = {(s.name, tuple(sorted(s.labels.items()))): s.value for samples in families.values() for s in samples}
    model = (("model", grpc_translator.info.name), ("version", grpc_translator.info.version))  # every per-model series
    assert by_labels[("nmt_requests_total", (("code", "OK"), ("method", "Translate"), *model))] == 1
    # Continuous batching observes each decoder step's batch: both sentences ran together at least once.
    assert by_labels[("nmt_batch_sentences_sum", model)] >= 2
    assert (
        by_labels[("nmt_batch_sentences_bucket", (("le", "1.0"), *model))]
        < by_labels[("nmt_batch_sentences_count", model)]
    )
    assert by_labels[("nmt_input_tokens_total", model)] > 0 and by_labels[("nmt_generated_tokens_total", model)] > 0
    assert by_labels[("nmt_queue_sentences", model)] == 0
    assert by_labels[("nmt_requests_in_flight", (("method", "Translate"), *model))] == 0
    info = families["nmt_model_info"][0]  # an Info metric: a gauge of value 1 with labels
    assert info.labels["precision"] == grpc_translator.info.precision and info.labels["src_lang"] == "en"
    assert (info.labels["model"], info.labels["version"]) == (grpc_translator.info.name, grpc_translator.info.version)
    for family in (
        "nmt_request_duration_seconds",
        "nmt_queue_wait_seconds",
        "nmt_batch_tokens",
        "nmt_encode_duration_seconds",
        "nmt_decode_duration_seconds",
        "nmt_requests_in_flight",
        "process_resident_memory_bytes",
        "python_info",
    ):
        assert family in families, family


async def test_help_documents_every_flag_and_env_var() -> None:
    text = parser({}).format_help()
    for flag, field, _, _ in FLAGS:
        assert flag in text and env_var(field) in text
    assert {field for _, field, _, _ in FLAGS} == set(ServerConfig.__dataclass_fields__)


async def test_environment_defaults_and_flags() -> None:
    env = {"NMT_MODEL_DIR": "/b", "NMT_PORT": "6000", "NMT_MAX_WAIT_MS": "2.5", "NMT_AUTH_TOKEN": "t"}
    cfg = from_args(["--max-batch-size", "8"], env)
    assert (cfg.model_dir, cfg.port, cfg.max_wait_ms, cfg.auth_token, cfg.max_batch_size) == ("/b", 6000, 2.5, "t", 8)
    assert from_args(["--port", "7000"], env).port == 7000  # a flag beats the environment
    assert from_args([], {"NMT_MODEL_DIR": "/b"}).port == 50051
    for argv, env in (
        [[], {}],
        [["--model-dir", "/b", "--port", "x"], {}],
        [[], {"NMT_MODEL_DIR": "/b", "NMT_WORKERS": "0"}],
        [["--model-dir", "/b", "--tls-cert", "c.pem"], {}],
    ):
        with pytest.raises(SystemExit) as e:
            from_args(argv, env)
        assert e.value.code == 2


async def test_bad_bundle_is_one_line_naming_the_file(grpc_bundle, tmp_path: Path, capsys) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(grpc_bundle, bundle)
    variant = manifest_variants(json.loads((bundle / "manifest.json").read_text()))["fp32-cpu"]["decoder"]
    with open(bundle / variant, "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage")
    argv = ["--model-dir", str(bundle), "--port", "0", "--metrics-port", "-1", "--device", "cpu"]
    assert await asyncio.to_thread(main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nmt-serve: error: ") and variant in err[0], err
    assert await asyncio.to_thread(main, ["--model-dir", str(tmp_path / "none"), "--metrics-port", "-1"]) == 2
    assert "manifest.json" in capsys.readouterr().err


async def test_sigterm_under_load_loses_no_accepted_request(grpc_bundle, tmp_path: Path) -> None:
    port_file = tmp_path / "ports.json"
    proc, port, metrics_port, log = await asyncio.to_thread(
        start_nmt_serve, grpc_bundle, port_file, NMT_METRICS_PORT="0", NMT_MAX_BATCH_SIZE="1"
    )
    assert metrics_port is not None and metrics_port != port  # both bound by the server itself (port 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            options = pb.DecodeOptions(beam_size=4, max_len_extra=40)
            n = 12
            calls = [stub(ch).Translate(pb.TranslateRequest(texts=TEXTS, options=options)) for _ in range(n)]

            def accepted() -> tuple[float, float]:
                families = scrape(metrics_port)
                in_flight = sum(s.value for s in families["nmt_requests_in_flight"])
                done = sum(s.value for s in families.get("nmt_requests", []) if s.name == "nmt_requests_total")
                return in_flight, done

            tasks = [asyncio.ensure_future(c) for c in calls]
            end = time.monotonic() + 60  # bounds a failure only
            while sum(seen := await asyncio.to_thread(accepted)) < n:  # a state to wait for
                assert time.monotonic() < end, f"the server accepted {sum(seen)} of {n} calls"
                await asyncio.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            in_flight, _ = seen  # 96 beam searches one at a time take seconds; the scrape took milliseconds
            responses = await asyncio.gather(*tasks)
            assert in_flight > 0, "SIGTERM came after every request was done: the test proves nothing"
            assert all(len(r.translations) == len(TEXTS) for r in responses)
            with pytest.raises(grpc.aio.AioRpcError) as e:  # no new calls once draining (or gone)
                await stub(ch).Translate(pb.TranslateRequest(texts=["A dog."]), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await asyncio.to_thread(proc.wait, 30) == 0, "".join(log)
        assert not port_file.exists()  # removed at exit: the ports it named are closed
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_an_unwritable_port_file_is_one_line(grpc_bundle, tmp_path: Path) -> None:
    port_file = tmp_path / "missing" / "ports.json"
    argv = [
        "--model-dir",
        str(grpc_bundle),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "-1",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--port-file",
        str(port_file),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NMT_")}
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "nmt.server.main", *argv],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(errors) == 1 and errors[0].startswith(f"nmt-serve: error: cannot write the port file {port_file}: ")
