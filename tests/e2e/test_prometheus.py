"""A real Prometheus server scrapes a real nmt server, and its query API answers with what was sent.

The server runs in-process on loopback (create_server, ephemeral gRPC and metrics ports) on a tiny
exported bundle; Prometheus (the `prometheus` binary, Debian package `prometheus`) is started here
with a generated config, a 1 s scrape interval and a temporary storage directory, and killed at
the end. Skipped when the binary is absent.

Every port is bound as port 0 by the process that listens on it (nothing picks a "free" port first,
which another process could take before it is bound): Prometheus' own port is read from /proc.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from nmt.server.config import ServerConfig
from nmt.server.main import NmtServer, create_server
from nmt.server.nmt_pb import translation_pb2 as pb
from nmt.server.nmt_pb import translation_pb2_grpc as pb_grpc

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="the `prometheus` binary is not installed (Debian: apt-get install prometheus)"
)
TEXTS = ["A man rides a bike.", "Two dogs play in the snow.", "A cat.", "Children are playing in a park."]
TIMEOUT = 30.0  # seconds for Prometheus to start and to have scraped what a query needs


@pytest_asyncio.fixture
async def nmt_server(tiny_bundle: Path) -> AsyncIterator[NmtServer]:
    cfg = ServerConfig(
        model_dir=str(tiny_bundle),
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        threads=1,
        default_beam_size=1,
        max_wait_ms=2.0,
    )
    server, _ = await create_server(cfg)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)


def listening_port(pid: int) -> int | None:
    """The TCP port process `pid` listens on over IPv4 (None while it listens on none), from Linux's /proc:
    its socket inodes among the LISTEN sockets of its network namespace."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()  # sl local_address rem_address st ... inode
        if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
            return int(fields[1].rsplit(":", 1)[1], 16)
    return None


async def prometheus_url(proc: subprocess.Popen[bytes], log: Path) -> str:
    """Prometheus' address once it listens (it was told to bind 127.0.0.1:0)."""
    deadline = time.monotonic() + TIMEOUT
    while True:  # a state to wait for
        assert proc.poll() is None, f"prometheus exited with {proc.returncode}: {log.read_text()[-2000:]}"
        if (port := listening_port(proc.pid)) is not None:
            return f"http://127.0.0.1:{port}"
        assert time.monotonic() < deadline, f"prometheus not listening within {TIMEOUT} s: {log.read_text()[-2000:]}"
        await asyncio.sleep(0.1)


def start_prometheus(root: Path, metrics_port: int) -> subprocess.Popen[bytes]:
    config = root / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: nmt\n    scrape_timeout: 1s\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    assert PROMETHEUS is not None
    with (root / "prometheus.log").open("wb") as log:
        return subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={root / 'data'}",
                "--web.listen-address=127.0.0.1:0",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=2) as r:
        return json.load(r)


def query(base: str, promql: str) -> float | None:
    """The single value of an instant query, None while it has no result."""
    data = http_json(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert data["status"] == "success", data
    result = data["data"]["result"]
    assert len(result) <= 1, f"{promql} has several series: {result}"
    return float(result[0]["value"][1]) if result else None


async def wait_for(base: str, promql: str, expected: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll until the query answers `expected`; fail with the last answer and Prometheus' log."""
    deadline, last = time.monotonic() + TIMEOUT, None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"prometheus exited with {proc.returncode}: {log.read_text()[-2000:]}"
        try:
            last = await asyncio.to_thread(query, base, promql)
        except (urllib.error.URLError, ConnectionError) as e:  # not listening yet
            last = f"unreachable: {e}"
        if last == expected:
            return
        await asyncio.sleep(0.5)
    pytest.fail(f"{promql} answered {last!r}, not {expected} within {TIMEOUT} s; log: {log.read_text()[-2000:]}")


async def send_requests(port: int) -> int:
    """Translate each text in its own call at once, plus one bad call; the number of OK calls."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.TranslationServiceStub(channel)
        calls = [stub.Translate(pb.TranslateRequest(texts=[t]), timeout=20) for t in TEXTS]
        for response in await asyncio.gather(*calls):
            assert len(response.translations) == 1
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.Translate(pb.TranslateRequest(texts=[]), timeout=20)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return len(TEXTS)


@pytest.mark.asyncio
async def test_prometheus_scrapes_the_server(nmt_server: NmtServer, tmp_path: Path) -> None:
    root = tmp_path
    assert nmt_server.metrics_port is not None
    ok = await send_requests(nmt_server.port)
    proc = start_prometheus(root, nmt_server.metrics_port)
    log = root / "prometheus.log"
    try:
        base = await prometheus_url(proc, log)
        await wait_for(base, 'up{job="nmt"}', 1.0, proc, log)
        await wait_for(base, 'nmt_requests_total{method="Translate",code="OK"}', float(ok), proc, log)
        await wait_for(base, 'nmt_requests_total{method="Translate",code="INVALID_ARGUMENT"}', 1.0, proc, log)
        # Every sentence joined a batch once (the warm-up's do not count: it bypasses the scheduler);
        # nmt_batch_sentences counts decoder steps' batches under continuous batching.
        await wait_for(base, "nmt_queue_wait_seconds_count", float(len(TEXTS)), proc, log)
        await wait_for(base, 'count(nmt_model_info{precision!=""})', 1.0, proc, log)
        assert await asyncio.to_thread(query, base, "process_resident_memory_bytes") > 0
        # A second scrape sees the counter move: the series is live, not a stale first sample.
        ok += await send_requests(nmt_server.port)
        await wait_for(base, 'nmt_requests_total{method="Translate",code="OK"}', float(ok), proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
