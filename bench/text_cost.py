"""`nmt-bench text-cost`: what the text pipeline (engine/text.py) costs a loaded server, on against off
in one run, and how a long text's sentences batch.

    nmt-bench text-cost [--bundle bundles/default] [--clients 1,64] [--rounds 3] [--duration 8]
                        [--paragraph 64] [--repeats 5] [--adversarial-only] [--out bench/results] [--force]

First, in this process, what a hostile client's texts cost every stage before the model (the
translator's prepare: sentences, case, spans, tokenizer) per byte at 1, 4 and 16 KB
(bench/adversarial_text.py); --adversarial-only stops there.

Then one `nmt-serve` (the default static batching) on loopback. Each round runs, per client count, a
closed loop of one-sentence Translate calls with the pipeline on (the default) and then off
(split_sentences, normalize_case and protect_spans false), in alternating order per round, so
load from other processes hits both alike: p50 latency and sentences/s, pooled over the rounds.
Then --repeats times, alternating: one request whose one text holds --paragraph test sentences,
and the same sentences as that many concurrent one-sentence requests; the median wall time of each.
Last, health checks from a prober process of their own while clients send test sentences, then
hostile texts, to a server with the text pipeline in its own process and to one with it in a thread.
Writes text_cost.json and text_cost.md into --out, with the CPU model and flags.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from nmt.server.nmt_pb import translation_pb2 as pb
from nmt.server.nmt_pb import translation_pb2_grpc as pb_grpc
from nmt.training.cpu import cpu_info, cpu_summary

from . import adversarial_text, health_probe
from .load import LoadBenchConfig, ServerProcess, Window, load_sentences


@dataclass(frozen=True)
class TextCostConfig:
    load: LoadBenchConfig
    rounds: int = 3
    paragraph: int = 64  # sentences in the one long text
    repeats: int = 5
    adversarial_only: bool = False
    health_clients: int = 32
    health_seconds: float = 10.0
    force: bool = False


def options(pipeline: bool, beam: int) -> pb.DecodeOptions:
    return pb.DecodeOptions(beam_size=beam, split_sentences=pipeline, normalize_case=pipeline, protect_spans=pipeline)


async def closed_loop(
    stub: pb_grpc.TranslationServiceStub, sentences: list[str], clients: int, pipeline: bool, cfg: LoadBenchConfig
) -> tuple[list[float], int]:
    """Latencies (s) of the calls finished inside the measured window, and failed calls."""
    measured = Window.after(cfg.warmup, cfg.duration)
    request_options = options(pipeline, cfg.beam_size)

    async def client(offset: int) -> None:
        i = offset
        while time.perf_counter() < measured.end:
            await measured.call(
                stub, pb.TranslateRequest(texts=[sentences[i % len(sentences)]], options=request_options)
            )
            i += clients

    await asyncio.gather(*(client(c) for c in range(clients)))
    return measured.latencies, measured.errors


async def paragraph_against_requests(
    stub: pb_grpc.TranslationServiceStub, sentences: list[str], cfg: TextCostConfig
) -> dict[str, Any]:
    """Wall seconds: one text of N sentences in one request vs N concurrent one-sentence requests."""
    chosen = [s for s in sentences if s.rstrip().endswith((".", "!", "?"))][: cfg.paragraph]
    beam = cfg.load.beam_size
    text = " ".join(chosen)
    one, many = [], []
    for repeat in range(cfg.repeats):
        for kind in ("one", "many") if repeat % 2 == 0 else ("many", "one"):
            started = time.perf_counter()
            if kind == "one":
                reply = await stub.Translate(
                    pb.TranslateRequest(texts=[text], options=options(True, beam)), timeout=600
                )
                assert len(reply.translations) == 1
                one.append(time.perf_counter() - started)
            else:
                await asyncio.gather(
                    *(
                        stub.Translate(pb.TranslateRequest(texts=[s], options=options(True, beam)), timeout=600)
                        for s in chosen
                    )
                )
                many.append(time.perf_counter() - started)
    return {
        "sentences": len(chosen),
        "one_request_s": float(np.median(one)),
        "concurrent_requests_s": float(np.median(many)),
        "ratio": float(np.median(one) / np.median(many)),
        "runs_one": one,
        "runs_many": many,
    }


def summarize(latencies: list[float], errors: int, seconds: float) -> dict[str, float]:
    return {
        "calls": len(latencies),
        "errors": errors,
        "sentences_per_s": len(latencies) / seconds,
        "p50_ms": float(np.percentile(latencies, 50) * 1e3) if latencies else float("nan"),
        "p99_ms": float(np.percentile(latencies, 99) * 1e3) if latencies else float("nan"),
    }


async def measure(cfg: TextCostConfig, target: str, sentences: list[str]) -> dict[str, Any]:
    pooled: dict[tuple[int, bool], tuple[list[float], int]] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TranslationServiceStub(channel)
        for r in range(cfg.rounds):
            for clients in cfg.load.clients:
                for pipeline in (True, False) if r % 2 == 0 else (False, True):
                    lat, err = await closed_loop(stub, sentences, clients, pipeline, cfg.load)
                    old = pooled.get((clients, pipeline), ([], 0))
                    pooled[(clients, pipeline)] = (old[0] + lat, old[1] + err)
        paragraph = await paragraph_against_requests(stub, sentences, cfg)
    seconds = cfg.rounds * cfg.load.duration
    levels = []
    for clients in cfg.load.clients:
        on, off = (summarize(*pooled[(clients, p)], seconds) for p in (True, False))
        levels.append(
            {
                "clients": clients,
                "on": on,
                "off": off,
                "p50_ratio": on["p50_ms"] / off["p50_ms"],
                "throughput_ratio": on["sentences_per_s"] / off["sentences_per_s"],
            }
        )
    return {"levels": levels, "paragraph": paragraph}


def hostile(i: int) -> list[str]:
    shapes = list(adversarial_text.SHAPES)
    return [adversarial_text.make(shapes[i % len(shapes)], adversarial_text.SIZES[i % len(adversarial_text.SIZES)])]


async def health_while_loaded(
    cfg: TextCostConfig, target: str, sentences: list[str], pipeline: str
) -> list[dict[str, Any]]:
    """A separate process's health checks while clients send test sentences, then hostile texts."""
    rows = []
    for kind, texts in (("test sentences", lambda i: [sentences[i % len(sentences)]]), ("hostile texts", hostile)):
        latencies, codes = await health_probe.under_load(
            target, texts, cfg.health_clients, cfg.health_seconds, options(True, cfg.load.beam_size)
        )
        ms = np.array(latencies) * 1e3
        rows.append(
            {
                "text_pipeline": pipeline,
                "clients_send": kind,
                "checks": len(ms),
                "p50_ms": float(np.percentile(ms, 50)),
                "p99_ms": float(np.percentile(ms, 99)),
                "max_ms": float(ms.max()),
                "codes": codes,
            }
        )
    return rows


def health_phases(cfg: TextCostConfig, sentences: list[str]) -> list[dict[str, Any]]:
    """The health phases against a server with the text pipeline in its process (the default), then one
    with it in a thread: before and after in one run."""
    rows = []
    for pipeline in ("process", "thread"):
        server = ServerProcess(cfg.load, ["--batching", "static", "--text-pipeline", pipeline])
        try:
            server.wait_serving()
            rows += asyncio.run(health_while_loaded(cfg, server.target, sentences, pipeline))
        finally:
            server.close()
    return rows


def write_report(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "text_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    cfg = result["config"]
    lines = [
        "# Text pipeline cost (`nmt-bench text-cost`)",
        "",
        f"CPU: {result['cpu_summary']}",
        "",
        "## Hostile texts",
        "",
        f"Bundle `{cfg['load']['bundle']}`: CPU time of the translator's prepare "
        "(sentences, case, protected spans, tokenizer) for one text of each shape, the least of "
        f"{result['adversarial']['rounds']} rounds.",
        "",
        *adversarial_text.markdown(result["adversarial"]),
        "",
    ]
    if "levels" in result:
        p = result["paragraph"]
        lines += [
            "## Under load",
            "",
            f"Beam {cfg['load']['beam_size']}, {cfg['rounds']} rounds of "
            f"{cfg['load']['duration']:g} s per setting (on and off alternating), static batching.",
            "",
            "| clients | p50 on (ms) | p50 off (ms) | p50 on/off | sent/s on | sent/s off | throughput on/off "
            "| errors |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for lv in result["levels"]:
            on, off = lv["on"], lv["off"]
            lines.append(
                f"| {lv['clients']} | {on['p50_ms']:.1f} | {off['p50_ms']:.1f} | {lv['p50_ratio']:.3f} | "
                f"{on['sentences_per_s']:.1f} | {off['sentences_per_s']:.1f} | {lv['throughput_ratio']:.3f} | "
                f"{on['errors'] + off['errors']} |"
            )
        lines += [
            "",
            f"One text of {p['sentences']} sentences in one request: {p['one_request_s']:.2f} s (median "
            f"of {len(p['runs_one'])}); the same sentences as {p['sentences']} concurrent requests: "
            f"{p['concurrent_requests_s']:.2f} s; ratio **{p['ratio']:.3f}** (goal: at most 1.1).",
            "",
            "## Health checks under load",
            "",
            f"{cfg['health_clients']} clients for {cfg['health_seconds']:g} s "
            "each; a health check every 10 ms from a process of its own (as a liveness probe).",
            "",
            "| text pipeline | clients send | checks | p50 (ms) | p99 (ms) | max (ms) | answers |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for h in result["health"]:
            lines.append(
                f"| {h['text_pipeline']} | {h['clients_send']} | {h['checks']} | {h['p50_ms']:.1f} | {h['p99_ms']:.1f} | "
                f"{h['max_ms']:.1f} | {', '.join(f'{k} {v}' for k, v in sorted(h['codes'].items()))} |"
            )
        lines.append("")
    (out / "text_cost.md").write_text("\n".join(lines))


def hostile_texts(bundle: Path) -> dict[str, Any]:
    from nmt.engine.prepared import prepare_texts
    from nmt.engine.text import TextOptions
    from nmt.engine.translator import Translator

    translator = Translator.from_bundle(bundle)
    return adversarial_text.measure(
        lambda text: prepare_texts(translator.tokenize, translator.info.src_lang, [text], TextOptions())
    )


def run(cfg: TextCostConfig) -> dict[str, Any]:
    config = asdict(cfg)
    config["load"] = {k: str(v) if isinstance(v, Path) else v for k, v in config["load"].items()}
    result = {
        "config": config,
        "cpu": cpu_info(),
        "cpu_summary": cpu_summary(),
        "python": platform.python_version(),
        "adversarial": hostile_texts(cfg.load.bundle),
    }
    if cfg.adversarial_only:
        return result
    sentences = load_sentences(cfg.load)
    server = ServerProcess(
        cfg.load, ["--batching", "static", "--max-sentences-per-request", str(max(256, cfg.paragraph))]
    )
    try:
        server.wait_serving()
        measured = asyncio.run(measure(cfg, server.target, sentences))
    finally:
        server.close()
    return {**result, **measured, "health": health_phases(cfg, sentences)}


def parse_args(argv: list[str] | None) -> TextCostConfig:
    d = TextCostConfig(LoadBenchConfig(clients=(1, 64), duration=8.0, warmup=2.0))
    p = argparse.ArgumentParser(prog="nmt-bench text-cost", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=d.load.bundle)
    p.add_argument("--data-dir", type=Path, help="Multi30k directory (default: $NMT_DATA_DIR, else download)")
    p.add_argument("--clients", default="1,64", help="concurrent clients (default: %(default)s)")
    p.add_argument("--beam", type=int, default=d.load.beam_size, help="beam size (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="on/off rounds (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=d.load.warmup, help="seconds before each window")
    p.add_argument("--duration", type=float, default=d.load.duration, help="measured seconds per setting and round")
    p.add_argument("--paragraph", type=int, default=d.paragraph, help="sentences in the long text (default: 64)")
    p.add_argument("--repeats", type=int, default=d.repeats, help="long-text runs of each kind (default: 5)")
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads; 0 = ORT default")
    p.add_argument("--adversarial-only", action="store_true", help="only the hostile texts' cost (no server)")
    p.add_argument("--health-clients", type=int, default=d.health_clients, help="clients while health is probed")
    p.add_argument("--health-seconds", type=float, default=d.health_seconds, help="seconds per health phase")
    p.add_argument("--out", type=Path, default=d.load.out)
    p.add_argument("--force", action="store_true", help="overwrite existing results")
    a = p.parse_args(argv)
    load = replace(
        d.load,
        bundle=a.bundle,
        data_dir=a.data_dir,
        clients=tuple(int(c) for c in a.clients.split(",")),
        beam_size=a.beam,
        warmup=a.warmup,
        duration=a.duration,
        threads=a.threads,
        out=a.out,
    )
    return TextCostConfig(
        load, a.rounds, a.paragraph, a.repeats, a.adversarial_only, a.health_clients, a.health_seconds, a.force
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    if (cfg.load.out / "text_cost.json").exists() and not cfg.force:
        raise SystemExit(f"nmt-bench text-cost: {cfg.load.out / 'text_cost.json'} exists (use --force)")
    result = run(cfg)
    write_report(result, cfg.load.out)
    print((cfg.load.out / "text_cost.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
