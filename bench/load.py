"""`nmt-bench load`: the gRPC server under closed-loop load, continuous vs static batching vs none, against
the engine alone.

    nmt-bench load [--bundle bundles/default] [--clients 1,4,16,64] [--beam 4] [--duration 20] [--out bench/results]

Three `nmt-serve` subprocesses run on loopback: `continuous` (`--batching continuous`: iteration-level
batching), `static` (the default config: a batch runs until its last sentence ends) and
`unbatched` (`--batching static --max-batch-size 1`). For each client count N, each server in turn
gets N asyncio clients on one
channel, each sending one test_2016_flickr sentence per Translate call and the next as soon as
the answer comes (closed loop). After --warmup seconds, the calls that finish within the next
--duration seconds count: sentences/s, p50 and p99 latency. The server's batch-size histogram is
scraped before and after that window (the mean batch that formed: per engine call for static, per
decoder step for continuous) and its VmRSS / VmHWM read from /proc. Then the engine alone
(server.translator in this process, the same bundle, threads and decode options) translates the
same sentences in batches of the continuous server's mean size,
one after the other: sentences/s and the per-batch latency. Settings and engine are interleaved
per client count, so load from other processes on a shared machine hits them alike; the clients
run on this machine too, so their CPU time competes with the server's (as on one host).
Writes load.json, load.md (tables + the goal ratios) and load.png into --out.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from nmt.server.client import request_options
from nmt.server.continuous import continuous_unsupported
from nmt.server.nmt_pb import translation_pb2 as pb
from nmt.server.nmt_pb import translation_pb2_grpc as pb_grpc

from .flags import source_flags
from .load_report import write_report
from .outcome import finish

SERVER_START_TIMEOUT = 180.0
# Extra nmt-serve flags per setting; the first one's mean batch sizes the engine-alone rows.
SETTINGS = {
    "continuous": ["--batching", "continuous"],
    "static": ["--batching", "static"],
    "unbatched": ["--batching", "static", "--max-batch-size", "1"],
}
# Settings run only when asked for (--also), for before/after: the same servers on the traced decoder,
# or with the text pipeline in a thread instead of its own process.
EXTRA_SETTINGS = {
    "continuous-traced": ["--batching", "continuous", "--step-decoder", "off"],
    "static-traced": ["--batching", "static", "--step-decoder", "off"],
    "continuous-text-thread": ["--batching", "continuous", "--text-pipeline", "thread"],
    "static-text-thread": ["--batching", "static", "--text-pipeline", "thread"],
}


@dataclass(frozen=True)
class LoadBenchConfig:
    bundle: Path = Path("bundles/default")
    data_dir: Path | None = None  # None: $NMT_DATA_DIR, else the verified download cache
    split: str = "test_2016_flickr"
    sentences: int = 0  # 0 = the whole split
    clients: tuple[int, ...] = (1, 4, 16, 64)
    beam_size: int = 4  # the server's default
    warmup: float = 3.0  # seconds of load before the measured window
    duration: float = 20.0  # measured seconds per client count
    engine_seconds: float = 8.0  # per engine batch size
    threads: int = 0  # ONNX Runtime intra-op threads, server and engine alike (0 = ORT default)
    out: Path = Path("bench/results")
    also: tuple[str, ...] = ()  # EXTRA_SETTINGS to run beside SETTINGS

    def __post_init__(self) -> None:
        unknown = [name for name in self.also if name not in EXTRA_SETTINGS]
        if unknown:
            raise ValueError(f"unknown setting {unknown[0]!r}; choose from {', '.join(EXTRA_SETTINGS)}")
        if not self.clients or min(self.clients) < 1:
            raise ValueError(f"clients must be positive counts, got {self.clients}")
        if self.beam_size < 1 or self.duration <= 0 or self.warmup < 0 or self.engine_seconds <= 0:
            raise ValueError("beam_size must be >= 1, duration and engine_seconds > 0, warmup >= 0")


@dataclass(frozen=True)
class Level:
    """One server setting at one client count: what its measured window saw."""

    setting: str
    clients: int
    requests: int
    sentences_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch: float  # sentences per engine batch (static) or decoder step (continuous) in the window
    batches: int
    errors: int
    rss_mb: float  # VmRSS after the level
    peak_rss_mb: float  # VmHWM so far


def load_sentences(cfg: LoadBenchConfig) -> list[str]:
    from nmt.training.data import multi30k_path, read_lines  # no torch: plain file reading

    lines = [s for s in read_lines(multi30k_path(cfg.split, "en", cfg.data_dir)) if s.strip()]
    return lines[: cfg.sentences] if cfg.sentences else lines


class ServerProcess:
    """`nmt-serve` on loopback in a subprocess; SIGTERM on close.

    The server binds port 0 for gRPC and for /metrics itself and names the ports in its --port-file
    once SERVING: no port is picked here first (a port found free and released can be taken, or be
    found twice, before the server binds it). `port`, `metrics_port` and `target` are set by
    wait_serving()."""

    def __init__(self, cfg: LoadBenchConfig, extra: list[str]):
        self.workdir = Path(tempfile.mkdtemp(prefix="nmt-serve-"))
        self.port_file = self.workdir / "ports.json"
        self.port = self.metrics_port = 0
        self.target = ""
        cmd = [
            sys.executable,
            "-m",
            "nmt.server.main",
            "--model-dir",
            str(cfg.bundle),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--port-file",
            str(self.port_file),
            "--threads",
            str(cfg.threads),
            "--default-beam-size",
            str(cfg.beam_size),
            "--log-level",
            "WARNING",
            *extra,
        ]
        self.proc = subprocess.Popen(cmd)

    def wait_serving(self) -> None:
        """Until the server has written its port file (it does once SERVING)."""
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not self.port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"nmt-serve exited with {self.proc.returncode} before SERVING")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nmt-serve not SERVING after {SERVER_START_TIMEOUT:.0f} s")
            time.sleep(0.1)
        ports = json.loads(self.port_file.read_text())
        self.port, self.metrics_port = int(ports["port"]), int(ports["metrics_port"])
        self.target = f"127.0.0.1:{self.port}"

    def memory_mb(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) of the server process in MB (1e6 bytes)."""
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines())
        kb = lambda name: float(fields[name].split()[0])  # noqa: E731 - "123 kB"
        return kb("VmRSS") * 1024 / 1e6, kb("VmHWM") * 1024 / 1e6

    def batch_histogram(self) -> tuple[float, float]:
        """(sum, count) of nmt_batch_sentences from /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        values = {"nmt_batch_sentences_sum": 0.0, "nmt_batch_sentences_count": 0.0}  # every model's together
        for f in text_string_to_metric_families(text):
            for s in f.samples:
                if s.name in values:
                    values[s.name] += s.value
        return values["nmt_batch_sentences_sum"], values["nmt_batch_sentences_count"]

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class Window:
    """A closed loop's measured window: latencies (s) of the calls that finished inside it; failed calls."""

    start: float
    end: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0

    @classmethod
    def after(cls, warmup: float, duration: float) -> Window:
        start = time.perf_counter() + warmup
        return cls(start, start + duration)

    async def call(self, stub: pb_grpc.TranslationServiceStub, request: pb.TranslateRequest) -> None:
        sent = time.perf_counter()
        try:
            await stub.Translate(request, timeout=120)
        except grpc.aio.AioRpcError:
            self.errors += 1
            return
        if self.start <= (done := time.perf_counter()) <= self.end:
            self.latencies.append(done - sent)


async def closed_loop(
    server: ServerProcess, sentences: list[str], clients: int, cfg: LoadBenchConfig
) -> tuple[list[float], int, tuple[float, float]]:
    """Latencies (s) of the calls that finished in the window, failed calls, and the batch-histogram delta."""
    texts = itertools.cycle(sentences)
    options = request_options(beam_size=cfg.beam_size)
    measured = Window.after(cfg.warmup, cfg.duration)

    async def client(stub: pb_grpc.TranslationServiceStub) -> None:
        while time.perf_counter() < measured.end:
            await measured.call(stub, pb.TranslateRequest(texts=[next(texts)], options=options))

    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.TranslationServiceStub(channel)
        tasks = [asyncio.create_task(client(stub)) for _ in range(clients)]
        await asyncio.sleep(max(0.0, measured.start - time.perf_counter()))
        before = await asyncio.to_thread(server.batch_histogram)
        await asyncio.sleep(max(0.0, measured.end - time.perf_counter()))
        after = await asyncio.to_thread(server.batch_histogram)
        for task in tasks:  # calls still running past the window do not count: cancel them
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return measured.latencies, measured.errors, (after[0] - before[0], after[1] - before[1])


def measure_level(
    name: str,
    clients: int,
    measured: tuple[list[float], int, tuple[float, float]],
    server: ServerProcess,
    duration: float,
) -> Level:
    latencies, errors, (batch_sum, batch_count) = measured
    rss, peak = server.memory_mb()
    ms = np.asarray(latencies) * 1000 if latencies else np.asarray([np.nan])
    level = Level(
        name,
        clients,
        len(latencies),
        len(latencies) / duration,
        float(np.percentile(ms, 50)),
        float(np.percentile(ms, 99)),
        batch_sum / batch_count if batch_count else float("nan"),
        int(batch_count),
        errors,
        rss,
        peak,
    )
    print(
        f"{name:>10} {clients:3d} clients: {level.sentences_per_s:7.2f} sent/s  p50 {level.p50_ms:7.1f} ms"
        f"  p99 {level.p99_ms:7.1f} ms  mean batch {level.mean_batch:5.2f}  RSS {rss:.0f} MB",
        flush=True,
    )
    return level


class Engine:
    """The server's engine alone (server.translator), in this process: same bundle, threads, options."""

    def __init__(self, cfg: LoadBenchConfig, sentences: list[str]):
        from nmt.engine.decoding import DecodeOptions
        from nmt.engine.runtime import RuntimeConfig
        from nmt.engine.translator import Translator

        self.translator = Translator.from_bundle(cfg.bundle, RuntimeConfig(intra_op_threads=cfg.threads))
        self.options = DecodeOptions(beam_size=cfg.beam_size)
        self.texts = itertools.cycle(sentences)
        self.seconds = cfg.engine_seconds
        self.translator.translate(["A warm-up sentence."], self.options)

    def measure(self, clients: int, size: int) -> dict[str, Any]:
        """Batches of `size` consecutive sentences, one after the other, for engine_seconds."""
        seconds: list[float] = []
        while sum(seconds) < self.seconds:
            batch = [next(self.texts) for _ in range(size)]
            started = time.perf_counter()
            self.translator.translate(batch, self.options)
            seconds.append(time.perf_counter() - started)
        ms = np.asarray(seconds) * 1000
        row = {
            "clients": clients,
            "batch_size": size,
            "batches": len(seconds),
            "sentences_per_s": size * len(seconds) / sum(seconds),
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
            "variant": self.translator.info.precision,
            "provider": self.translator.info.provider,
        }
        print(
            f"   engine batch {size:3d}: {row['sentences_per_s']:7.2f} sent/s  p50 {row['p50_ms']:7.1f} ms"
            f"  p99 {row['p99_ms']:7.1f} ms",
            flush=True,
        )
        return row


async def measure_all(
    servers: dict[str, ServerProcess], engine: Engine, sentences: list[str], cfg: LoadBenchConfig
) -> tuple[list[Level], list[dict[str, Any]]]:
    """Client count by client count: every server setting, then the engine on the batches that formed.

    Interleaved (not one setting after the other) so that load from other processes on a shared
    machine hits every column of a row alike. One event loop: grpc.aio channels belong to a loop.
    """
    levels: list[Level] = []
    rows: list[dict[str, Any]] = []
    for clients in cfg.clients:
        for name, server in servers.items():
            measured = await closed_loop(server, sentences, clients, cfg)
            levels.append(measure_level(name, clients, measured, server, cfg.duration))
        batched = levels[-len(servers)]  # the first setting's (continuous)
        size = max(1, round(batched.mean_batch)) if batched.mean_batch == batched.mean_batch else 1  # NaN: 1
        rows.append(engine.measure(clients, size))
    return levels, rows


def run(cfg: LoadBenchConfig) -> dict[str, Any]:
    if not (cfg.bundle / "manifest.json").is_file():
        raise ValueError(f"no bundle at {cfg.bundle} (make bundle, or nmt-export models/default {cfg.bundle})")
    sentences = load_sentences(cfg)
    engine = Engine(cfg, sentences)
    if (reason := continuous_unsupported(engine.translator)) is not None:  # the server would batch statically
        raise ValueError(f"{cfg.bundle} cannot be served with continuous batching: {reason}")
    servers: dict[str, ServerProcess] = {}
    try:
        for name, flags in {**SETTINGS, **{name: EXTRA_SETTINGS[name] for name in cfg.also}}.items():
            servers[name] = ServerProcess(cfg, flags)
        for server in servers.values():
            server.wait_serving()
        levels, rows = asyncio.run(measure_all(servers, engine, sentences, cfg))
    finally:
        for name, server in servers.items():
            if (code := server.close()) != 0:
                print(f"warning: nmt-serve ({name}) exited with {code} on SIGTERM", file=sys.stderr)
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_end": os.getloadavg(),
        },
        "sentences": len(sentences),
        "levels": [asdict(lv) for lv in levels],
        "engine": rows,
    }


def parse_args(argv: list[str] | None) -> LoadBenchConfig:
    d = LoadBenchConfig()
    p = argparse.ArgumentParser(prog="nmt-bench load", description=__doc__.splitlines()[0])
    source_flags(p, d.bundle, d.split)
    p.add_argument("--sentences", type=int, default=d.sentences, help="use the first N (default: all)")
    p.add_argument("--clients", default=",".join(map(str, d.clients)), help="concurrent clients (default: %(default)s)")
    p.add_argument("--beam", type=int, default=d.beam_size, help="beam size, 1 = greedy (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=d.warmup, help="unmeasured seconds per level (default: %(default)s)")
    p.add_argument(
        "--duration", type=float, default=d.duration, help="measured seconds per level (default: %(default)s)"
    )
    p.add_argument(
        "--engine-seconds",
        type=float,
        default=d.engine_seconds,
        help="engine-alone seconds per batch size (default: %(default)s)",
    )
    p.add_argument("--threads", type=int, default=d.threads, help="ORT intra-op threads; 0 = ORT default")
    p.add_argument("--out", type=Path, default=d.out, help="results directory (default: %(default)s)")
    p.add_argument(
        "--also",
        default="",
        help=f"extra settings, comma-separated: {', '.join(EXTRA_SETTINGS)} (the servers on the traced decoder, "
        "or with the text pipeline in a thread)",
    )
    a = p.parse_args(argv)
    try:
        clients = tuple(int(c) for c in a.clients.split(","))
        return LoadBenchConfig(
            a.bundle,
            a.data_dir,
            a.split,
            a.sentences,
            clients,
            a.beam,
            a.warmup,
            a.duration,
            a.engine_seconds,
            a.threads,
            a.out,
            tuple(n for n in a.also.split(",") if n),
        )
    except ValueError as e:
        p.error(str(e))
        raise  # unreachable


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    return finish("load", lambda: run(cfg), lambda r: write_report(r, cfg.out))


if __name__ == "__main__":
    raise SystemExit(main())
