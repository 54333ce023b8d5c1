"""`nmt-bench fairness`: is a model starved while another one is under load? And the RSS of a loaded model.

    nmt-bench fairness [--bundle bundles/default] [--clients 32] [--duration 20] [--rounds 2] [--beam 4]
                       [--engine-turns shared,exclusive,off] [--out bench/results] [--force]

A temporary model repository holds two copies of the bundle, TMP/repo/a/1 and TMP/repo/b/1 (hard-linked where
the filesystem allows), served by one `nmt-serve --model-repository` subprocess on loopback. Each model has its
own scheduler (its own queue, batches and engine thread) and its own ONNX Runtime sessions (their own
intra-op thread pools); --engine-turns shared or exclusive share the cores between their steps, small steps
first (engine/turns.py), off leaves it to the operating system. Given several settings, one server per
setting runs and their rounds alternate: a side-by-side comparison.

In one run, phases alternate --rounds times: "alone", one closed-loop client on model b; "loaded", the same
one client on b while --clients closed-loop clients load model a. Each phase measures --duration seconds
after WARMUP_S (the loaded phase's queue reaches its steady state first) and SETTLE_S after the previous phase
(a's last batches finish). Target: b's p99 while a is loaded is within 2x its p99 alone (the first
--engine-turns setting's; each setting's ratio is reported). /metrics says how
many batches each model ran (nmt_batch_sentences_count{model}): a batch never mixes models.

Memory, before the phases and with no load: a server with model a only, then the two-model server, each after
WARM_REQUESTS requests per model; the difference in VmRSS is the RSS of one loaded model. After the phases, b
is unloaded (RepositoryModelUnload) and VmRSS read again: what unloading gives back to the OS.
Writes fairness.json and fairness.md into --out (refuses to overwrite them without --force).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from nmt.server.config import ENGINE_TURNS
from nmt.server.kserve_pb import grpc_predict_v2_pb2 as kpb
from nmt.server.kserve_pb import grpc_predict_v2_pb2_grpc as kpb_grpc
from nmt.server.nmt_pb import translation_pb2 as pb
from nmt.server.nmt_pb import translation_pb2_grpc as pb_grpc

from . import outcome
from .flags import run_flags, source_flags
from .load import LoadBenchConfig, ServerProcess, Window, load_sentences
from .outcome import finish
from .reload import link_or_copy, percentiles

LOADED, PROBE = "a", "b"  # model a takes the load; model b is the one that must not starve
WARMUP_S = 2.0
SETTLE_S = 1.0
WARM_REQUESTS = 8
TARGET_RATIO = 2.0


@dataclass(frozen=True)
class FairnessBenchConfig:
    bundle: Path = Path("bundles/default")
    data_dir: Path | None = None  # None: $NMT_DATA_DIR, else the verified download cache
    split: str = "test_2016_flickr"
    sentences: int = 64
    clients: int = 32  # on model a, in the loaded phases
    duration: float = 20.0  # measured seconds per phase
    rounds: int = 2  # alone + loaded, alternating
    beam_size: int = 4
    threads: int = 0  # ONNX Runtime intra-op threads per session (0 = ORT default)
    out: Path = Path("bench/results")
    force: bool = False
    engine_turns: tuple[str, ...] = ("shared", "exclusive", "off")  # nmt-serve --engine-turns of each server

    def __post_init__(self) -> None:
        if self.clients < 1 or self.rounds < 1 or self.beam_size < 1 or self.sentences < 1 or self.duration <= 0:
            raise ValueError("clients, rounds, beam and sentences must be >= 1 and duration > 0")
        if (
            not self.engine_turns
            or not set(self.engine_turns) <= set(ENGINE_TURNS)
            or len(set(self.engine_turns)) != len(self.engine_turns)
        ):
            raise ValueError(
                f"engine_turns must be distinct values of {', '.join(ENGINE_TURNS)}, got {','.join(self.engine_turns)}"
            )


class RepositoryProcess(ServerProcess):
    """`nmt-serve --model-repository TMP/repo` holding a copy of the bundle per name in `models` (version 1)."""

    def __init__(self, cfg: FairnessBenchConfig, models: tuple[str, ...], engine_turns: str = "shared"):
        # not super().__init__: that one serves --model-dir
        self.workdir = Path(tempfile.mkdtemp(prefix="nmt-fairness-"))
        self.port_file = self.workdir / "ports.json"
        self.port = self.metrics_port = 0
        self.target = ""
        repository = self.workdir / "repo"
        for name in models:
            shutil.copytree(cfg.bundle, repository / name / "1", copy_function=link_or_copy)
        cmd = [
            sys.executable,
            "-m",
            "nmt.server.main",
            "--model-repository",
            str(repository),
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
            "--engine-turns",
            engine_turns,
        ]
        self.proc = subprocess.Popen(cmd)

    def batches_by_model(self) -> dict[str, float]:
        """nmt_batch_sentences_count by model, from /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        return {
            s.labels["model"]: s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "nmt_batch_sentences_count"
        }


def request(model: str, text: str, beam_size: int) -> pb.TranslateRequest:
    return pb.TranslateRequest(texts=[text], model=model, options=pb.DecodeOptions(beam_size=beam_size))


async def warm(target: str, models: tuple[str, ...], sentences: list[str], beam_size: int) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TranslationServiceStub(channel)
        for model in models:
            for text in sentences[:WARM_REQUESTS]:
                await stub.Translate(request(model, text, beam_size), timeout=120)


def idle_rss_mb(cfg: FairnessBenchConfig, models: tuple[str, ...], sentences: list[str]) -> float:
    """VmRSS (MB) of a fresh server of `models`, after WARM_REQUESTS requests to each."""
    server = RepositoryProcess(cfg, models)
    try:
        server.wait_serving()
        asyncio.run(warm(server.target, models, sentences, cfg.beam_size))
        return server.memory_mb()[0]
    finally:
        server.close()


async def phase(
    server: RepositoryProcess, sentences: list[str], cfg: FairnessBenchConfig, load_clients: int
) -> dict[str, Any]:
    """One client on b (and `load_clients` on a) for WARMUP_S + duration; b's (and a's) latencies in the window."""
    probe, loaded = Window.after(WARMUP_S, cfg.duration), Window.after(WARMUP_S, cfg.duration)
    texts = itertools.cycle(sentences)

    async def client(stub: pb_grpc.TranslationServiceStub, model: str, window: Window) -> None:
        while time.perf_counter() < window.end:
            await window.call(stub, request(model, next(texts), cfg.beam_size))

    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.TranslationServiceStub(channel)
        tasks = [asyncio.create_task(client(stub, LOADED, loaded)) for _ in range(load_clients)]
        tasks.append(asyncio.create_task(client(stub, PROBE, probe)))
        await asyncio.sleep(max(0.0, probe.end - time.perf_counter()))
        for task in tasks:  # calls still running past the window do not count
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(SETTLE_S)  # a's cancelled calls' batches finish before the next phase
    return {
        "load_clients": load_clients,
        "probe_latencies": probe.latencies,
        "probe_errors": probe.errors,
        "load_requests": len(loaded.latencies),
        "load_errors": loaded.errors,
    }


async def unload(target: str, model: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        await kpb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(
            kpb.RepositoryModelUnloadRequest(model_name=model), timeout=60
        )


def run(cfg: FairnessBenchConfig) -> dict[str, Any]:
    if not (cfg.bundle / "manifest.json").is_file():
        raise ValueError(f"no bundle at {cfg.bundle} (make bundle, or nmt-export models/default {cfg.bundle})")
    for name in ("fairness.json", "fairness.md"):
        if (cfg.out / name).exists() and not cfg.force:
            raise ValueError(f"{cfg.out / name} exists: --force to overwrite it")
    sentences = load_sentences(
        LoadBenchConfig(bundle=cfg.bundle, data_dir=cfg.data_dir, split=cfg.split, sentences=cfg.sentences)
    )
    rss_one = idle_rss_mb(cfg, (LOADED,), sentences)
    servers: dict[str, RepositoryProcess] = {}
    phases: list[dict[str, Any]] = []
    try:
        for turns in cfg.engine_turns:
            servers[turns] = RepositoryProcess(cfg, (LOADED, PROBE), turns)
            servers[turns].wait_serving()
            asyncio.run(warm(servers[turns].target, (LOADED, PROBE), sentences, cfg.beam_size))
        server = servers[cfg.engine_turns[0]]  # memory and batches: the first setting's server
        rss_two = server.memory_mb()[0]
        batches_before = server.batches_by_model()
        for round_ in range(cfg.rounds):
            for turns, name, clients in (
                (t, n, c) for t in cfg.engine_turns for n, c in (("alone", 0), ("loaded", cfg.clients))
            ):
                print(
                    f"round {round_ + 1}/{cfg.rounds}, engine turns {turns}: {name} ({clients} clients on {LOADED})",
                    flush=True,
                )
                phases.append(
                    {
                        "round": round_ + 1,
                        "turns": turns,
                        "phase": name,
                        **asyncio.run(phase(servers[turns], sentences, cfg, clients)),
                    }
                )
        batches_after = server.batches_by_model()
        rss_loaded, peak = server.memory_mb()
        asyncio.run(unload(server.target, PROBE))
        time.sleep(SETTLE_S)  # the unloaded model drains and is released in the background
        rss_unloaded = server.memory_mb()[0]
    finally:
        for turns, started in servers.items():
            if (code := started.close()) != 0:
                print(f"warning: nmt-serve (engine turns {turns}) exited with {code} on SIGTERM", file=sys.stderr)
    from nmt.training.cpu import cpu_summary  # /proc/cpuinfo only

    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "machine": {
            "cpu": cpu_summary(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_end": os.getloadavg(),
        },
        "sentences": len(sentences),
        **tally([p for p in phases if p["turns"] == cfg.engine_turns[0]], cfg),
        "by_engine_turns": {t: tally([p for p in phases if p["turns"] == t], cfg) for t in cfg.engine_turns},
        "phases": [
            {k: v for k, v in p.items() if k != "probe_latencies"} | percentiles(p["probe_latencies"]) for p in phases
        ],
        "batches_by_model": {m: batches_after.get(m, 0.0) - batches_before.get(m, 0.0) for m in sorted(batches_after)},
        "memory_mb": {
            "one_model_idle": rss_one,
            "two_models_idle": rss_two,
            "per_loaded_model": rss_two - rss_one,
            "two_models_after_load": rss_loaded,
            "peak": peak,
            "after_unloading_b": rss_unloaded,
        },
    }


def tally(phases: list[dict[str, Any]], cfg: FairnessBenchConfig) -> dict[str, Any]:
    """b's latency alone and under load (all rounds together), their p99 ratio and the target."""

    def of(name: str) -> list[float]:
        return [x for p in phases if p["phase"] == name for x in p["probe_latencies"]]

    alone, loaded = percentiles(of("alone")), percentiles(of("loaded"))
    ratio = loaded["p99_ms"] / alone["p99_ms"] if alone["requests"] and loaded["requests"] else float("nan")
    load_s = cfg.duration * sum(p["phase"] == "loaded" for p in phases)
    return {
        "probe_alone": alone,
        "probe_loaded": loaded,
        "p99_ratio": ratio,
        "p50_ratio": loaded["p50_ms"] / alone["p50_ms"] if alone["requests"] and loaded["requests"] else float("nan"),
        "load_requests_per_s": sum(p["load_requests"] for p in phases) / load_s if load_s else 0.0,
        "errors": sum(p["probe_errors"] + p["load_errors"] for p in phases),
        "target": {
            "target": f"b's p99 with {cfg.clients} clients on a <= {TARGET_RATIO:g}x its p99 alone",
            "value": f"{ratio:.2f}x",
            "pass": bool(ratio <= TARGET_RATIO),
        },
    }


def markdown(r: dict[str, Any]) -> str:
    c, m, g = r["config"], r["memory_mb"], r["target"]
    return "\n".join(
        [
            "# Two models, one under load (`nmt-bench fairness`)",
            "",
            f"`nmt-bench fairness --bundle {c['bundle']} --clients {c['clients']} --duration {c['duration']:g} "
            f"--rounds {c['rounds']} --beam {c['beam_size']} --threads {c['threads']} --engine-turns "
            f"{','.join(c['engine_turns'])}`; {r['sentences']} {c['split']} "
            f"sentences, one per call; CPU: {r['machine']['cpu']} ({r['machine']['cpus']} visible, load average at end "
            f"{', '.join(f'{x:.1f}' for x in r['machine']['load_average_at_end'])}).",
            "",
            "One server per engine-turns setting, two copies of the bundle (models a and b); phases alternate: one "
            f"client on b alone, then the same client on b while {c['clients']} clients load a.",
            "",
            "| target (engine turns " + c["engine_turns"][0] + ") | value | result |",
            "|---|---|---|",
            f"| {g['target']} | {g['value']} | {'PASS' if g['pass'] else 'FAIL'} |",
            "",
            "| engine turns | model b | requests | p50 ms | p99 ms | p99 ratio | a requests/s |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {turns} | {name} | {p['requests']} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | "
                + (f"{t['p99_ratio']:.2f}x | {t['load_requests_per_s']:.1f} |" if name != "alone" else " | |")
                for turns, t in r["by_engine_turns"].items()
                for name, p in (("alone", t["probe_alone"]), (f"{c['clients']} clients on a", t["probe_loaded"]))
            ),
            "",
            "| round | engine turns | phase | b requests | b p50 ms | b p99 ms | a requests | errors |",
            "|---|---|---|---|---|---|---|---|",
            *(
                f"| {p['round']} | {p['turns']} | {p['phase']} | {p['requests']} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | "
                f"{p['load_requests']} | {p['probe_errors'] + p['load_errors']} |"
                for p in r["phases"]
            ),
            "",
            f"Model a under load (engine turns {c['engine_turns'][0]}): {r['load_requests_per_s']:.1f} requests/s. "
            "Batches per model in the phases "
            f"(nmt_batch_sentences_count{{model}}): "
            + ", ".join(f"{k}: {v:.0f}" for k, v in r["batches_by_model"].items())
            + ".",
            "",
            "| server VmRSS | MB |",
            "|---|---|",
            f"| model a only, idle | {m['one_model_idle']:.0f} |",
            f"| models a and b, idle | {m['two_models_idle']:.0f} |",
            f"| **per loaded model** (difference) | **{m['per_loaded_model']:.0f}** |",
            f"| a and b, after the phases (peak) | {m['two_models_after_load']:.0f} ({m['peak']:.0f}) |",
            f"| after unloading b | {m['after_unloading_b']:.0f} |",
            "",
        ]
    )


def write_report(results: dict[str, Any], out: Path) -> str:
    return outcome.write_report(out, "fairness", results, markdown)


def parse_args(argv: list[str] | None) -> FairnessBenchConfig:
    d = FairnessBenchConfig()
    p = argparse.ArgumentParser(prog="nmt-bench fairness", description=__doc__.splitlines()[0])
    source_flags(p, d.bundle, d.split)
    p.add_argument("--sentences", type=int, default=d.sentences, help="distinct sentences (default: %(default)s)")
    p.add_argument(
        "--clients",
        type=int,
        default=d.clients,
        help="closed-loop clients on model a in the loaded phases (default: %(default)s)",
    )
    p.add_argument(
        "--duration", type=float, default=d.duration, help="measured seconds per phase (default: %(default)s)"
    )
    p.add_argument("--rounds", type=int, default=d.rounds, help="alone/loaded phase pairs (default: %(default)s)")
    p.add_argument(
        "--engine-turns",
        default=",".join(d.engine_turns),
        help="nmt-serve --engine-turns: off, "
        "shared, exclusive, or several, comma-separated (one server each, rounds alternating; the first "
        "one's ratio is the target's) "
        "(default: %(default)s)",
    )
    run_flags(p, d.beam_size, d.threads, d.out, "fairness")
    a = p.parse_args(argv)
    try:
        return FairnessBenchConfig(
            a.bundle,
            a.data_dir,
            a.split,
            a.sentences,
            a.clients,
            a.duration,
            a.rounds,
            a.beam,
            a.threads,
            a.out,
            a.force,
            tuple(a.engine_turns.split(",")),
        )
    except ValueError as e:
        p.error(str(e))
        raise  # unreachable


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    return finish("fairness", lambda: run(cfg), lambda r: write_report(r, cfg.out), lambda r: [r["target"]])


if __name__ == "__main__":
    raise SystemExit(main())
