"""`nmt-bench reload`: new model versions loaded while the server is under closed-loop load.

    nmt-bench reload [--bundle bundles/default] [--clients 16] [--reloads 5] [--duration 60] [--beam 4]
                     [--out bench/results] [--force]

A temporary model repository TMP/default/1/ (the bundle, hard-linked where the filesystem allows, else
copied) is served by one `nmt-serve --model-repository TMP` subprocess on loopback (the port-file protocol of
bench.load.ServerProcess). First every test sentence is translated once, one request at a time, on version 1:
the reference answers. Then --clients closed-loop clients (half over KServe ModelInfer, whose answer names
its model_version; half over nmt.v1 Translate) send one sentence per call for --duration seconds, and every
duration/(reloads+1) seconds version N+1 is added to the repository (a complete copy, written before the
call) and RepositoryModelLoad("default") is called: the server loads it beside version N, switches new
requests to it and drains and releases version N in the background (server/control.py). Every call sent is
awaited, none is cancelled, so each one is either answered or failed.

The version copies are byte-identical (the manifest holds the sha256 of every file and of itself, so it is
not edited): they are told apart by their directory number, which is what ModelInfo.version and KServe's
model_version are in repository mode. An answer "comes from exactly one complete version" when its text is
the reference (every version gives it) and, over KServe, it names one version that was loaded between the
call's send and its answer: at least the one whose load had returned when it was sent, at most the newest
whose load had started when it came back.

After the load window, with the clients stopped, an explicit RepositoryModelUnload + RepositoryModelLoad is
checked once (an unloaded model is NOT_FOUND by design, so it is not done under load): the index says
"unloaded", a request is refused with NOT_FOUND, and after the load the newest version answers.

Targets (PASS/FAIL): 0 failed requests; every answer from exactly one complete version.
Writes reload.json and reload.md into --out (refuses to overwrite them without --force).
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
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from nmt.server.kserve_pb import grpc_predict_v2_pb2 as kpb
from nmt.server.kserve_pb import grpc_predict_v2_pb2_grpc as kpb_grpc
from nmt.server.nmt_pb import translation_pb2 as pb
from nmt.server.nmt_pb import translation_pb2_grpc as pb_grpc

from . import outcome
from .flags import run_flags, source_flags
from .load import LoadBenchConfig, ServerProcess, load_sentences
from .outcome import finish

MODEL = "default"
AFTER_LOAD_S = 2.0  # latency "around a load": calls that finished from its start to this long after it returned
CALL_TIMEOUT_S = 120.0
LENGTH_BYTES = 4  # Triton's BYTES element prefix: 4-byte little-endian length


@dataclass(frozen=True)
class ReloadBenchConfig:
    bundle: Path = Path("bundles/default")
    data_dir: Path | None = None  # None: $NMT_DATA_DIR, else the verified download cache
    split: str = "test_2016_flickr"
    sentences: int = 64  # distinct sentences the clients cycle through (each gets a reference answer)
    clients: int = 16  # half KServe ModelInfer, half nmt.v1 Translate (KServe gets the odd one)
    reloads: int = 5
    duration: float = 60.0
    beam_size: int = 4
    threads: int = 0  # ONNX Runtime intra-op threads of the server (0 = ORT default)
    out: Path = Path("bench/results")
    force: bool = False

    def __post_init__(self) -> None:
        if self.clients < 2:
            raise ValueError(f"clients must be >= 2 (half KServe, half nmt.v1), got {self.clients}")
        if self.reloads < 1 or self.beam_size < 1 or self.duration <= 0 or self.sentences < 1:
            raise ValueError("reloads, beam and sentences must be >= 1 and duration > 0")


@dataclass
class Call:
    """One request as the client saw it. Times are seconds since the load window began."""

    interface: str  # "kserve" or "nmt"
    sentence: int
    sent: float
    done: float
    code: str  # grpc.StatusCode name; "OK" when answered
    text: str = ""
    version: int = 0  # KServe's model_version (0: nmt.v1, which names none)
    floor: int = 0  # the version whose load had returned when it was sent
    ceiling: int = 0  # the newest version whose load had started when it came back


@dataclass
class Load:
    version: int
    start: float  # seconds since the load window began
    end: float
    code: str = "OK"
    message: str = ""

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class Versions:
    """What the control side has done so far: the clients read it when they send and when they get an answer."""

    returned: int = 1  # the newest version whose RepositoryModelLoad returned OK
    started: int = 1  # the newest version whose RepositoryModelLoad was called
    loads: list[Load] = field(default_factory=list)


class RepositoryServer(ServerProcess):
    """`nmt-serve --model-repository REPO` (ServerProcess passes --model-dir): the same port-file protocol,
    wait_serving, memory and close (which removes the work directory, the repository in it included)."""

    def __init__(self, cfg: ReloadBenchConfig):  # not super().__init__: that would start a --model-dir server
        self.workdir = Path(tempfile.mkdtemp(prefix="nmt-reload-"))
        self.port_file = self.workdir / "ports.json"
        self.port = self.metrics_port = 0
        self.target = ""
        self.bundle = cfg.bundle
        self.repository = self.workdir / "repo"
        self.add_version(1)
        cmd = [
            sys.executable,
            "-m",
            "nmt.server.main",
            "--model-repository",
            str(self.repository),
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
        ]
        self.proc = subprocess.Popen(cmd)

    def add_version(self, version: int) -> Path:
        """REPO/default/VERSION: the bundle, complete before this returns (written beside, then renamed in)."""
        final = self.repository / MODEL / str(version)
        partial = self.repository / MODEL / f".partial-{version}"  # not a version directory while it fills
        shutil.copytree(self.bundle, partial, copy_function=link_or_copy)
        partial.rename(final)
        return final


def link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)
    return dst


def kserve_request(text: str, beam_size: int) -> kpb.ModelInferRequest:
    data = text.encode()
    tensor = kpb.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[1])
    return kpb.ModelInferRequest(
        model_name=MODEL,
        inputs=[tensor],
        raw_input_contents=[len(data).to_bytes(LENGTH_BYTES, "little") + data],
        parameters={"beam_size": kpb.InferParameter(int64_param=beam_size)},
    )


def kserve_text(response: kpb.ModelInferResponse) -> str:
    raw = response.raw_output_contents[0]
    size = int.from_bytes(raw[:LENGTH_BYTES], "little")
    return raw[LENGTH_BYTES : LENGTH_BYTES + size].decode()


async def references(target: str, sentences: list[str], beam_size: int) -> list[str]:
    """Version 1's translation of each sentence, one request at a time (nmt.v1, as the nmt clients send it)."""
    options = pb.DecodeOptions(beam_size=beam_size)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TranslationServiceStub(channel)
        found = []
        for text in sentences:
            response = await stub.Translate(
                pb.TranslateRequest(texts=[text], options=options, model=MODEL), timeout=CALL_TIMEOUT_S
            )
            found.append(response.translations[0].hypotheses[0].text)
    return found


async def load_window(
    server: RepositoryServer, sentences: list[str], cfg: ReloadBenchConfig
) -> tuple[list[Call], Versions]:
    """--clients closed loops for --duration s while the control side adds and loads a version every
    duration/(reloads+1) s. Every call sent is awaited (none cancelled)."""
    versions = Versions()
    calls: list[Call] = []
    order = itertools.cycle(range(len(sentences)))
    options = pb.DecodeOptions(beam_size=cfg.beam_size)
    t0 = time.perf_counter()
    now = lambda: time.perf_counter() - t0  # noqa: E731
    end = cfg.duration

    async def kserve_client(stub: kpb_grpc.GRPCInferenceServiceStub) -> None:
        while now() < end:
            i, floor, sent = next(order), versions.returned, now()
            try:
                response = await stub.ModelInfer(kserve_request(sentences[i], cfg.beam_size), timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as e:
                calls.append(Call("kserve", i, sent, now(), e.code().name, floor=floor, ceiling=versions.started))
                continue
            version = int(response.model_version) if response.model_version.isdigit() else -1
            calls.append(Call("kserve", i, sent, now(), "OK", kserve_text(response), version, floor, versions.started))

    async def nmt_client(stub: pb_grpc.TranslationServiceStub) -> None:
        while now() < end:
            i, floor, sent = next(order), versions.returned, now()
            try:
                response = await stub.Translate(
                    pb.TranslateRequest(texts=[sentences[i]], options=options, model=MODEL), timeout=CALL_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as e:
                calls.append(Call("nmt", i, sent, now(), e.code().name, floor=floor, ceiling=versions.started))
                continue
            calls.append(
                Call(
                    "nmt", i, sent, now(), "OK", response.translations[0].hypotheses[0].text, 0, floor, versions.started
                )
            )

    async def control(stub: kpb_grpc.GRPCInferenceServiceStub) -> None:
        every = cfg.duration / (cfg.reloads + 1)
        for k in range(1, cfg.reloads + 1):
            await asyncio.sleep(max(0.0, k * every - now()))
            version = versions.started + 1
            await asyncio.to_thread(server.add_version, version)  # complete on disk before the call
            load = Load(version, now(), 0.0)
            versions.started = version
            try:
                await stub.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name=MODEL), timeout=600)
            except grpc.aio.AioRpcError as e:
                load.code, load.message = e.code().name, e.details() or ""
            load.end = now()
            versions.loads.append(load)
            if load.code == "OK":
                versions.returned = version
            print(f"  t={load.start:6.1f} s  load version {version}: {load.code} in {load.seconds:.2f} s", flush=True)

    async with (
        grpc.aio.insecure_channel(server.target) as kserve_ch,
        grpc.aio.insecure_channel(server.target) as nmt_ch,
    ):
        kserve, nmt = kpb_grpc.GRPCInferenceServiceStub(kserve_ch), pb_grpc.TranslationServiceStub(nmt_ch)
        n_kserve = (cfg.clients + 1) // 2
        tasks = [asyncio.create_task(kserve_client(kserve)) for _ in range(n_kserve)]
        tasks += [asyncio.create_task(nmt_client(nmt)) for _ in range(cfg.clients - n_kserve)]
        await asyncio.gather(control(kserve), *tasks)
    return calls, versions


async def unload_then_load(target: str, sentence: str, beam_size: int, newest: int) -> dict[str, Any]:
    """Clients stopped: RepositoryModelUnload, what a request and the index then get, RepositoryModelLoad, and
    which version answers after it."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        index = lambda: stub.RepositoryIndex(kpb.RepositoryIndexRequest())  # noqa: E731
        started = time.perf_counter()
        await stub.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name=MODEL))
        unload_s = time.perf_counter() - started
        unloaded_index = [(m.name, m.version, m.state, m.reason) for m in (await index()).models]
        try:
            await stub.ModelInfer(kserve_request(sentence, beam_size), timeout=CALL_TIMEOUT_S)
            refused = "OK"
        except grpc.aio.AioRpcError as e:
            refused = e.code().name
        started = time.perf_counter()
        await stub.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name=MODEL), timeout=600)
        load_s = time.perf_counter() - started
        answer = await stub.ModelInfer(kserve_request(sentence, beam_size), timeout=CALL_TIMEOUT_S)
        loaded_index = [(m.name, m.version, m.state, m.reason) for m in (await index()).models]
    ok = (
        refused == "NOT_FOUND"
        and unloaded_index == [(MODEL, "", "UNAVAILABLE", "unloaded")]
        and answer.model_version == str(newest)
        and loaded_index == [(MODEL, str(newest), "READY", "")]
    )
    return {
        "unload_s": unload_s,
        "index_after_unload": unloaded_index,
        "request_after_unload": refused,
        "load_s": load_s,
        "version_after_load": answer.model_version,
        "index_after_load": loaded_index,
        "ok": ok,
    }


def percentiles(latencies: list[float]) -> dict[str, float | int]:
    ms = np.asarray(latencies) * 1000 if latencies else np.asarray([np.nan])
    return {"requests": len(latencies), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def tally(calls: list[Call], versions: Versions, reference: list[str], cfg: ReloadBenchConfig) -> dict[str, Any]:
    """Counts, per-version answers, answers from no single complete version, latencies overall and around loads."""
    ok = [c for c in calls if c.code == "OK"]
    loaded = {1} | {ld.version for ld in versions.loads if ld.code == "OK"}
    wrong_text = [c for c in ok if c.text != reference[c.sentence]]
    wrong_version = [
        c for c in ok if c.interface == "kserve" and (c.version not in loaded or not c.floor <= c.version <= c.ceiling)
    ]
    by_version = Counter(str(c.version) for c in ok if c.interface == "kserve")
    around = []
    for ld in versions.loads:
        inside = [c.done - c.sent for c in ok if ld.start <= c.done <= ld.end + AFTER_LOAD_S]
        around.append(
            {
                "version": ld.version,
                "code": ld.code,
                "message": ld.message,
                "start_s": ld.start,
                "load_s": ld.seconds,
                **percentiles(inside),
            }
        )
    span = max((c.done for c in calls), default=cfg.duration)
    return {
        "requests": len(calls),
        "ok": len(ok),
        "failed": len(calls) - len(ok),
        "codes": dict(Counter(c.code for c in calls)),
        "by_interface": {
            i: {
                "requests": sum(c.interface == i for c in calls),
                "failed": sum(c.interface == i and c.code != "OK" for c in calls),
            }
            for i in ("kserve", "nmt")
        },
        "kserve_answers_by_version": dict(sorted(by_version.items(), key=lambda kv: int(kv[0]))),
        "nmt_answers_matching_reference": sum(c.interface == "nmt" for c in ok)
        - sum(c.interface == "nmt" for c in wrong_text),
        "answers_not_from_one_version": len({id(c) for c in wrong_text + wrong_version}),
        "wrong_text": len(wrong_text),
        "version_outside_window": len(wrong_version),
        "examples": [asdict(c) for c in (wrong_text + wrong_version)[:5]],
        "sentences_per_s": len(ok) / span if span > 0 else float("nan"),
        "latency": percentiles([c.done - c.sent for c in ok]),
        "loads": around,
        "failed_loads": sum(ld.code != "OK" for ld in versions.loads),
    }


def targets(t: dict[str, Any]) -> list[dict[str, Any]]:
    versions = len(t["kserve_answers_by_version"])
    return [
        {"target": "0 failed requests", "value": f"{t['failed']} of {t['requests']}", "pass": t["failed"] == 0},
        {
            "target": "every answer from exactly one complete version",
            "value": f"{t['answers_not_from_one_version']} of {t['ok']} not ({versions} versions answered)",
            "pass": t["answers_not_from_one_version"] == 0 and t["failed_loads"] == 0,
        },
    ]


def run(cfg: ReloadBenchConfig) -> dict[str, Any]:
    if not (cfg.bundle / "manifest.json").is_file():
        raise ValueError(f"no bundle at {cfg.bundle} (make bundle, or nmt-export models/default {cfg.bundle})")
    for name in ("reload.json", "reload.md"):
        if (cfg.out / name).exists() and not cfg.force:
            raise ValueError(f"{cfg.out / name} exists: --force to overwrite it")
    sentences = load_sentences(
        LoadBenchConfig(bundle=cfg.bundle, data_dir=cfg.data_dir, split=cfg.split, sentences=cfg.sentences)
    )
    server = RepositoryServer(cfg)
    try:
        server.wait_serving()
        reference = asyncio.run(references(server.target, sentences, cfg.beam_size))
        print(
            f"reference: {len(reference)} sentences on version 1; {cfg.clients} clients for {cfg.duration:g} s, "
            f"{cfg.reloads} loads",
            flush=True,
        )
        calls, versions = asyncio.run(load_window(server, sentences, cfg))
        rss, peak = server.memory_mb()
        explicit = asyncio.run(unload_then_load(server.target, sentences[0], cfg.beam_size, versions.started))
    finally:
        if (code := server.close()) != 0:
            print(f"warning: nmt-serve exited with {code} on SIGTERM", file=sys.stderr)
    from nmt.training.cpu import cpu_summary  # /proc/cpuinfo only

    t = tally(calls, versions, reference, cfg)
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
        **t,
        "server_rss_mb": rss,
        "server_peak_rss_mb": peak,
        "unload_then_load": explicit,
        "targets": targets(t),
    }


def markdown(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [
        "# Reloads under load (`nmt-bench reload`)",
        "",
        f"`nmt-bench reload --bundle {c['bundle']} --clients {c['clients']} --reloads {c['reloads']} "
        f"--duration {c['duration']:g} --beam {c['beam_size']}`; {r['sentences']} {c['split']} sentences, "
        f"one per call; CPU: {r['machine']['cpu']} ({r['machine']['cpus']} visible, load average at end "
        f"{', '.join(f'{x:.1f}' for x in r['machine']['load_average_at_end'])}).",
        "",
        "Versions are byte-identical copies of the bundle, told apart by their directory number (KServe "
        "model_version). An answer is from one complete version when its text equals the reference (version 1, "
        "one request at a time) and, over KServe, the version it names was loaded between its send and its answer.",
        "",
        "| target | value | result |",
        "|---|---|---|",
        *(f"| {g['target']} | {g['value']} | {'PASS' if g['pass'] else 'FAIL'} |" for g in r["targets"]),
        "",
        "| requests | OK | failed | codes | sentences/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
        f"| {r['requests']} | {r['ok']} | {r['failed']} | {', '.join(f'{k} {v}' for k, v in r['codes'].items())} | "
        f"{r['sentences_per_s']:.2f} | {r['latency']['p50_ms']:.1f} | {r['latency']['p99_ms']:.1f} |",
        "",
        "| interface | requests | failed |",
        "|---|---|---|",
        *(f"| {i} | {v['requests']} | {v['failed']} |" for i, v in r["by_interface"].items()),
        "",
        "KServe answers by version: "
        + ", ".join(f"v{k}: {v}" for k, v in r["kserve_answers_by_version"].items())
        + f"; nmt.v1 answers equal to the reference: {r['nmt_answers_matching_reference']}; answers from no single "
        f"complete version: {r['answers_not_from_one_version']} (text differs: {r['wrong_text']}, version outside "
        f"its window: {r['version_outside_window']}).",
        "",
        f"Each load, and the calls that finished from its start to {AFTER_LOAD_S:g} s after it returned:",
        "",
        "| version | at s | load s | result | requests | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {ld['version']} | {ld['start_s']:.1f} | {ld['load_s']:.2f} | {ld['code']} | {ld['requests']} | "
            f"{ld['p50_ms']:.1f} | {ld['p99_ms']:.1f} |"
            for ld in r["loads"]
        ),
        "",
    ]
    u = r["unload_then_load"]
    lines += [
        f"Explicit unload + load after the window (clients stopped): unload {u['unload_s']:.2f} s, then a "
        f"request got {u['request_after_unload']} and the index said {u['index_after_unload']}; load "
        f"{u['load_s']:.2f} s, then version {u['version_after_load']} answered: "
        f"{'as expected' if u['ok'] else 'NOT as expected'}.",
        "",
        f"Server RSS at the end of the window: {r['server_rss_mb']:.0f} MB (peak {r['server_peak_rss_mb']:.0f} MB).",
        "",
    ]
    return "\n".join(lines)


def write_report(results: dict[str, Any], out: Path) -> str:
    return outcome.write_report(out, "reload", results, markdown)


def parse_args(argv: list[str] | None) -> ReloadBenchConfig:
    d = ReloadBenchConfig()
    p = argparse.ArgumentParser(prog="nmt-bench reload", description=__doc__.splitlines()[0])
    source_flags(p, d.bundle, d.split)
    p.add_argument("--sentences", type=int, default=d.sentences, help="distinct sentences (default: %(default)s)")
    p.add_argument(
        "--clients",
        type=int,
        default=d.clients,
        help="closed-loop clients, half KServe, half nmt.v1 (default: %(default)s)",
    )
    p.add_argument(
        "--reloads", type=int, default=d.reloads, help="versions loaded in the window (default: %(default)s)"
    )
    p.add_argument("--duration", type=float, default=d.duration, help="seconds of load (default: %(default)s)")
    run_flags(p, d.beam_size, d.threads, d.out, "reload")
    a = p.parse_args(argv)
    try:
        return ReloadBenchConfig(
            a.bundle,
            a.data_dir,
            a.split,
            a.sentences,
            a.clients,
            a.reloads,
            a.duration,
            a.beam,
            a.threads,
            a.out,
            a.force,
        )
    except ValueError as e:
        p.error(str(e))
        raise  # unreachable


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    return finish("reload", lambda: run(cfg), lambda r: write_report(r, cfg.out), lambda r: r["targets"])


if __name__ == "__main__":
    raise SystemExit(main())
