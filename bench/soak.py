"""`nmt-bench soak`: the server at a steady load for N minutes; memory and latency sampled, growth reported.

    nmt-bench soak [--bundle bundles/default] [--minutes 10] [--rate 10] [--bad-fraction 0.1]
                   [--sample-seconds 10] [--warmup-minutes 1] [--out bench/results]

One `nmt-serve` subprocess on loopback (bench.load.ServerProcess: --default-beam-size --beam) gets
--rate Translate calls per second, open loop: each is sent on schedule whether or not the earlier
ones have finished (at most --max-in-flight at once; the rest count as skipped). A call carries one
test_2016_flickr sentence; --bad-fraction of them are bad requests (no texts, an out-of-range
option, unparsable bytes) so that the error paths run for as long as the good ones. Every
--sample-seconds the server's VmRSS is read from /proc and the calls that finished in the interval
give sent/s, p50 and p99 latency and their status codes.

Growth is measured after --warmup-minutes (allocator pools, ORT arenas and caches fill first): RSS
at the end minus RSS at the first sample after the warm-up, the least-squares RSS slope over those
samples (MB per hour) and p99 latency in the last interval against the first one. At the end the
server's nmt_requests_total is scraped and compared with what the client saw. Writes soak.json and
soak.md into --out.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import os
import platform
import random
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from nmt.server.nmt_pb import translation_pb2 as pb

from . import outcome
from .flags import source_flags
from .load import LoadBenchConfig, ServerProcess, load_sentences
from .outcome import finish

BAD_REQUESTS = [
    pb.TranslateRequest(texts=[]).SerializeToString(),
    pb.TranslateRequest(texts=["A dog."], options=pb.DecodeOptions(length_penalty=1e4)).SerializeToString(),
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
]  # not a protobuf message
TRANSLATE = "/nmt.v1.TranslationService/Translate"


@dataclass(frozen=True)
class SoakConfig:
    bundle: Path = Path("bundles/default")
    data_dir: Path | None = None  # None: $NMT_DATA_DIR, else the verified download cache
    split: str = "test_2016_flickr"
    minutes: float = 10.0
    rate: float = 10.0  # calls per second
    bad_fraction: float = 0.1
    beam_size: int = 4
    sample_seconds: float = 10.0
    warmup_minutes: float = 1.0
    max_in_flight: int = 256
    threads: int = 0  # ONNX Runtime intra-op threads of the server (0 = ORT default)
    seed: int = 0
    out: Path = Path("bench/results")

    def __post_init__(self) -> None:
        if self.minutes <= 0 or self.rate <= 0 or self.sample_seconds <= 0 or self.max_in_flight < 1:
            raise ValueError("minutes, rate and sample_seconds must be > 0, max_in_flight >= 1")
        if not 0 <= self.bad_fraction <= 1 or not 0 <= self.warmup_minutes < self.minutes:
            raise ValueError("bad_fraction must be in 0..1 and warmup_minutes in 0..minutes")


@dataclass
class Interval:
    """What the client saw in one sampling interval."""

    latencies: list[float] = field(default_factory=list)  # seconds, calls that finished OK
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    skipped: int = 0  # not sent: --max-in-flight calls were still running


def sample(interval: Interval, t: float, seconds: float, server: ServerProcess) -> dict[str, Any]:
    rss, peak = server.memory_mb()
    ms = np.asarray(interval.latencies) * 1000
    return {
        "t_s": round(t, 1),
        "rss_mb": round(rss, 1),
        "peak_rss_mb": round(peak, 1),
        "ok_per_s": round(len(ms) / seconds, 2),
        "p50_ms": float(np.percentile(ms, 50)) if ms.size else None,
        "p99_ms": float(np.percentile(ms, 99)) if ms.size else None,
        "codes": dict(interval.codes),
        "skipped": interval.skipped,
    }


async def soak(server: ServerProcess, sentences: list[str], cfg: SoakConfig) -> list[dict[str, Any]]:
    """Open-loop load for cfg.minutes; a sample per interval."""
    rng, texts = random.Random(cfg.seed), itertools.cycle(sentences)
    request = pb.TranslateRequest  # good calls: one sentence each, the server's default options
    samples: list[dict[str, Any]] = []
    current, in_flight, tasks = Interval(), 0, set()

    async def call(body: bytes) -> None:
        nonlocal in_flight
        in_flight += 1
        started = time.perf_counter()
        try:
            await translate(body, timeout=60)
            current.latencies.append(time.perf_counter() - started)
            current.codes["OK"] += 1
        except grpc.aio.AioRpcError as e:
            current.codes[e.code().name] += 1
        finally:
            in_flight -= 1

    async with grpc.aio.insecure_channel(server.target) as channel:
        translate = channel.unary_unary(TRANSLATE)  # bytes in and out: bad messages are sent as they are
        start = time.perf_counter()
        end, next_sample = start + cfg.minutes * 60, start + cfg.sample_seconds
        for n in itertools.count():
            due = start + n / cfg.rate
            if due >= end:
                break
            if due >= next_sample:
                samples.append(sample(current, next_sample - start, cfg.sample_seconds, server))
                current, next_sample = Interval(), next_sample + cfg.sample_seconds
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            if in_flight >= cfg.max_in_flight:
                current.skipped += 1
                continue
            bad = rng.random() < cfg.bad_fraction
            body = rng.choice(BAD_REQUESTS) if bad else request(texts=[next(texts)]).SerializeToString()
            task = asyncio.create_task(call(body))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        last = time.perf_counter() - start
        samples.append(sample(current, last, last - (next_sample - start - cfg.sample_seconds), server))
    return samples


def growth(samples: list[dict[str, Any]], cfg: SoakConfig) -> dict[str, Any]:
    """RSS and p99 after the warm-up: first vs last sample, and the RSS slope."""
    after = [s for s in samples if s["t_s"] > cfg.warmup_minutes * 60] or samples
    t, rss = np.array([s["t_s"] for s in after]), np.array([s["rss_mb"] for s in after])
    slope = float(np.polyfit(t, rss, 1)[0]) * 3600 if len(after) >= 2 else float("nan")
    p99 = [s["p99_ms"] for s in after if s["p99_ms"] is not None]
    return {
        "from_s": after[0]["t_s"],
        "to_s": after[-1]["t_s"],
        "rss_first_mb": after[0]["rss_mb"],
        "rss_last_mb": after[-1]["rss_mb"],
        "rss_growth_mb": round(after[-1]["rss_mb"] - after[0]["rss_mb"], 1),
        "rss_slope_mb_per_hour": round(slope, 2),
        "peak_rss_mb": max(s["peak_rss_mb"] for s in samples),
        "p99_first_ms": p99[0] if p99 else None,
        "p99_last_ms": p99[-1] if p99 else None,
    }


def server_counts(server: ServerProcess) -> dict[str, float]:
    """nmt_requests_total{method="Translate"} by code, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as page:
        text = page.read().decode()
    counts: dict[str, float] = {}  # summed over the model and version labels
    for s in (s for f in text_string_to_metric_families(text) for s in f.samples):
        if s.name == "nmt_requests_total" and s.labels.get("method") == "Translate":
            counts[s.labels["code"]] = counts.get(s.labels["code"], 0.0) + s.value
    return counts


def run(cfg: SoakConfig) -> dict[str, Any]:
    if not (cfg.bundle / "manifest.json").is_file():
        raise ValueError(f"no bundle at {cfg.bundle} (make bundle, or nmt-export models/default {cfg.bundle})")
    load_cfg = LoadBenchConfig(
        bundle=cfg.bundle, data_dir=cfg.data_dir, split=cfg.split, beam_size=cfg.beam_size, threads=cfg.threads
    )
    sentences = load_sentences(load_cfg)
    server = ServerProcess(load_cfg, [])
    try:
        server.wait_serving()
        samples = asyncio.run(soak(server, sentences, cfg))
        counted = server_counts(server)
    finally:
        if (code := server.close()) != 0:
            print(f"warning: nmt-serve exited with {code} on SIGTERM", file=sys.stderr)
    seen = sum((collections.Counter(s["codes"]) for s in samples), collections.Counter())
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_end": os.getloadavg(),
        },
        "samples": samples,
        "growth": growth(samples, cfg),
        "client_codes": dict(seen),
        "server_codes": counted,
        "skipped": sum(s["skipped"] for s in samples),
    }


def markdown(results: dict[str, Any]) -> str:
    c, g = results["config"], results["growth"]
    fmt = lambda v, spec=".1f": "-" if v is None else format(v, spec)  # noqa: E731
    lines = [
        f"# nmt-bench soak — {c['minutes']:g} min at {c['rate']:g} calls/s (beam {c['beam_size']}, "
        f"{c['bad_fraction']:.0%} bad requests), {results['machine']['cpus']} CPUs",
        "",
        f"`nmt-bench soak --bundle {c['bundle']} --minutes {c['minutes']:g} --rate {c['rate']:g}`",
        "",
        "| after the warm-up | value |",
        "|---|---:|",
        f"| window | {g['from_s']:.0f} s - {g['to_s']:.0f} s |",
        f"| RSS first / last | {g['rss_first_mb']:.1f} / {g['rss_last_mb']:.1f} MB |",
        f"| RSS growth | {g['rss_growth_mb']:+.1f} MB |",
        f"| RSS slope (least squares) | {g['rss_slope_mb_per_hour']:+.2f} MB/hour |",
        f"| peak RSS (VmHWM) | {g['peak_rss_mb']:.1f} MB |",
        f"| p99 first / last interval | {fmt(g['p99_first_ms'])} / {fmt(g['p99_last_ms'])} ms |",
        f"| calls by code, client | {json.dumps(results['client_codes'], sort_keys=True)} |",
        f"| Translate by code, server's nmt_requests_total | {json.dumps(results['server_codes'], sort_keys=True)} |",
        f"| skipped (max in flight) | {results['skipped']} |",
        "",
        "| t s | RSS MB | OK/s | p50 ms | p99 ms | codes |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for s in results["samples"]:
        lines.append(
            f"| {s['t_s']:.0f} | {s['rss_mb']:.1f} | {s['ok_per_s']:.2f} | {fmt(s['p50_ms'])} | "
            f"{fmt(s['p99_ms'])} | {json.dumps(s['codes'], sort_keys=True)} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> SoakConfig:
    d = SoakConfig()
    p = argparse.ArgumentParser(prog="nmt-bench soak", description=__doc__.splitlines()[0])
    source_flags(p, d.bundle, d.split)
    p.add_argument("--minutes", type=float, default=d.minutes, help="how long (default: %(default)s)")
    p.add_argument("--rate", type=float, default=d.rate, help="calls per second (default: %(default)s)")
    p.add_argument(
        "--bad-fraction", type=float, default=d.bad_fraction, help="share of bad requests (default: %(default)s)"
    )
    p.add_argument("--beam", type=int, default=d.beam_size, help="the server's default beam (default: %(default)s)")
    p.add_argument(
        "--sample-seconds", type=float, default=d.sample_seconds, help="sampling interval (default: %(default)s)"
    )
    p.add_argument(
        "--warmup-minutes",
        type=float,
        default=d.warmup_minutes,
        help="not counted in the growth (default: %(default)s)",
    )
    p.add_argument(
        "--max-in-flight", type=int, default=d.max_in_flight, help="most calls at once (default: %(default)s)"
    )
    p.add_argument("--threads", type=int, default=d.threads, help="ORT intra-op threads; 0 = ORT default")
    p.add_argument("--out", type=Path, default=d.out, help="results directory (default: %(default)s)")
    a = p.parse_args(argv)
    try:
        return SoakConfig(
            a.bundle,
            a.data_dir,
            a.split,
            a.minutes,
            a.rate,
            a.bad_fraction,
            a.beam,
            a.sample_seconds,
            a.warmup_minutes,
            a.max_in_flight,
            a.threads,
            d.seed,
            a.out,
        )
    except ValueError as e:
        p.error(str(e))
        raise  # unreachable


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    return finish("soak", lambda: run(cfg), lambda r: write_report(r, cfg.out))


def write_report(results: dict[str, Any], out: Path) -> str:
    return outcome.write_report(out, "soak", results, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
