"""Helpers for the gRPC server tests: a real server on 127.0.0.1 with an ephemeral port, a channel, and
an engine gate to hold batches while a test lines up requests (static batching: each search call;
continuous batching: each admission into the running batch). The fixtures are in conftest.py.

Import by name: `from grpc_helpers import serve, server_config` (pytest puts tests/server on sys.path).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from nmt.engine.continuous import RunningBatch
from nmt.engine.decoding import DecodeOptions, SearchResult
from nmt.engine.runtime import RuntimeConfig
from nmt.engine.translator import Translator
from nmt.server.config import ServerConfig
from nmt.server.main import NmtServer, create_server
from nmt.server.nmt_pb import translation_pb2_grpc as pb_grpc

ONE_THREAD = RuntimeConfig(device="cpu", intra_op_threads=1, inter_op_threads=1)
TEXTS = [
    "A man rides a bike.",
    "Two dogs play in the snow.",
    "A girl in a red dress is running on the beach.",
    "People.",
    "An old man with a hat sits on a bench next to a small brown dog and reads a newspaper.",
    "A woman sings.",
    "Children are playing football in a park.",
    "A cat.",
]


class Gate:
    """The real Translator; engine calls are recorded and wait while the gate is closed.

    With continuous batching a call is an admission into the running batch: one (sources, options)
    per distinct options among the sentences that join together.
    """

    def __init__(self, translator: Translator):
        self.translator = translator
        self.calls: list[tuple[list[list[int]], DecodeOptions]] = []
        self.opened, self.entered = threading.Event(), threading.Event()
        self.opened.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.translator, name)

    def search(self, sources: list[list[int]], options: DecodeOptions) -> SearchResult:
        self.calls.append(([list(s) for s in sources], options))
        self.wait()
        return self.translator.search(sources, options)

    def running_batch(self) -> GatedBatch:
        return GatedBatch(self, self.translator.running_batch())

    def wait(self) -> None:
        self.entered.set()
        if not self.opened.wait(timeout=30):
            raise TimeoutError("the test never opened the gate")

    def close(self) -> None:
        """Hold engine calls from now on; forget the calls so far (e.g. the server's warm-up)."""
        self.opened.clear()
        self.entered.clear()
        self.calls.clear()

    def open(self) -> None:
        self.opened.set()


class GatedBatch:
    """A real RunningBatch whose admissions are recorded in the gate and wait while it is closed."""

    def __init__(self, gate: Gate, batch: RunningBatch):
        self.gate, self.batch = gate, batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.batch, name)

    def __len__(self) -> int:
        return len(self.batch)

    def admit(self, entries: list[tuple[Any, list[int], DecodeOptions]]) -> None:
        if entries:
            by_options: dict[DecodeOptions, list[list[int]]] = {}
            for _, source, options in entries:
                by_options.setdefault(options, []).append(list(source))
            self.gate.calls += [(sources, options) for options, sources in by_options.items()]
            self.gate.wait()
        self.batch.admit(entries)


def server_config(bundle: Path, **overrides: Any) -> ServerConfig:
    """Loopback, ephemeral ports, no metrics HTTP server unless asked for, one ORT thread."""
    cfg = ServerConfig(
        model_dir=str(bundle),
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        threads=1,
        device="cpu",
        max_wait_ms=2.0,
        grace_seconds=5.0,
    )
    return replace(cfg, **overrides)


@contextlib.asynccontextmanager
async def serve(cfg: ServerConfig, translator: Any) -> AsyncIterator[NmtServer]:
    """A started server on its own registry; stopped (grace 1 s) on exit."""
    server, _ = await create_server(cfg, translator, CollectorRegistry())
    await server.start()
    try:
        yield server
    finally:
        await server.stop(1.0)


@contextlib.asynccontextmanager
async def channel(server: NmtServer, **kwargs: Any) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", **kwargs) as ch:
        yield ch


def stub(ch: grpc.aio.Channel) -> pb_grpc.TranslationServiceStub:
    return pb_grpc.TranslationServiceStub(ch)


def alone(translator: Translator, texts: list[str], options: DecodeOptions) -> list[list[str]]:
    """What each text translates to in a batch of its own."""
    return [[t.text for t in translator.translate([text], options)[0]] for text in texts]


async def eventually(predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll `predicate()` until it is true (the event loop keeps running meanwhile). A wait on a state,
    not on time: `timeout` only bounds how long a failing test takes to fail."""
    import asyncio

    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


SERVE_START_S = 120.0  # a failure, not a race: a loaded machine may take this long to load and warm up


def start_nmt_serve(
    bundle: Path, port_file: Path, **env: str
) -> tuple[subprocess.Popen[str], int, int | None, list[str]]:
    """nmt-serve in a subprocess on 127.0.0.1 (one CPU thread; `env` adds or overrides NMT_* variables);
    returns it once it serves, with its gRPC port, metrics port (None when off) and its log lines (still
    growing). It binds port 0 itself (and metrics port 0 when NMT_METRICS_PORT=0) and names the ports it
    bound in `port_file` once SERVING: no port is picked before the server binds it."""
    env = {
        **os.environ,
        "NMT_MODEL_DIR": str(bundle),
        "NMT_HOST": "127.0.0.1",
        "NMT_PORT": "0",
        "NMT_PORT_FILE": str(port_file),
        "NMT_THREADS": "1",
        "NMT_DEVICE": "cpu",
        **env,
    }
    port_file.unlink(missing_ok=True)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-m", "nmt.server.main"], cwd=root, env=env, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    end = time.monotonic() + SERVE_START_S
    while not port_file.exists():  # a state to wait for, checked every 50 ms: nothing depends on the timing
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise AssertionError("nmt-serve did not start:\n" + "".join(lines))
        time.sleep(0.05)
    ports = json.loads(port_file.read_text())
    assert ports["pid"] == proc.pid, ports
    return proc, ports["port"], ports["metrics_port"], lines


# ---- model repositories (tmp_path/repo/NAME/VERSION copies of a bundle) ----


def repository(tmp_path: Path, bundle: Path, *models: tuple[str, int]) -> Path:
    root = tmp_path / "repo"
    for name, version in models:
        add_version(root, bundle, name, version)
    return root


def add_version(root: Path, bundle: Path, name: str, version: int) -> Path:
    return Path(shutil.copytree(bundle, root / name / str(version)))


@contextlib.asynccontextmanager
async def serve_repo(
    root: Path, gated: bool = False, **overrides: Any
) -> AsyncIterator[tuple[NmtServer, dict[str, list[Gate]]]]:
    """A started server on `root`. gated: every loaded translator is a Gate (by model name, in load order;
    no start-up self-check then); else the real path (verify, sessions, self-check)."""
    gates: dict[str, list[Gate]] = {}

    def load(path: Path) -> Gate:
        gate = Gate(Translator.from_bundle(path, ONE_THREAD))
        gates.setdefault(path.parent.name, []).append(gate)
        return gate

    cfg = replace(server_config(Path("unused")), model_dir=None, model_repository=str(root), **overrides)
    server, _ = await create_server(cfg, registry=CollectorRegistry(), load=load if gated else None)
    await server.start()
    try:
        yield server, gates
    finally:
        for gate in (g for found in gates.values() for g in found):
            gate.open()
        await server.stop(1.0)


def loads(server: NmtServer, outcome: str) -> float:
    """nmt_model_loads_total of `outcome` (loaded, failed)."""
    return server.registry.get_sample_value("nmt_model_loads_total", {"outcome": outcome}) or 0.0
