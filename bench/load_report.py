"""load.json, load.md (tables + the goal ratios) and load.png from one `nmt-bench load` run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

RESULT_FILES = ("load.json", "load.md", "load.png")
GOALS = {
    "batching_speedup": 5.0,
    "p50_over_engine": 1.05,
    "p99_continuous_over_static": 1.0,
    "speed_continuous_over_static": 1.0,
    "grpc_over_engine": 0.85,
    "p99_over_engine": 1.2,
    "peak_rss_mb": 400.0,
}
BATCHED = ("continuous", "static")  # the batching settings compared
P99_CLIENTS = 16  # where continuous batching's p99 is compared with static batching's


def _level(results: dict[str, Any], setting: str, clients: int) -> dict[str, Any] | None:
    return next((lv for lv in results["levels"] if lv["setting"] == setting and lv["clients"] == clients), None)


def _engine(results: dict[str, Any], level: dict[str, Any]) -> dict[str, Any] | None:
    """The engine row for a level's batches: measured at the same client count, else any of that size."""
    if math.isnan(level["mean_batch"]):
        return None
    size = max(1, round(level["mean_batch"]))
    same = [e for e in results["engine"] if e["batch_size"] == size]
    return next((e for e in same if e["clients"] == level["clients"]), same[0] if same else None)


def _ratio(goal: str, value: float, target_key: str, higher_is_better: bool) -> dict[str, Any]:
    return {"goal": goal, "value": value, "target": GOALS[target_key], "higher_is_better": higher_is_better}


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal: what was measured, the goal, and whether it was met (same run, same machine)."""
    clients = sorted({lv["clients"] for lv in results["levels"]})
    top, one = clients[-1], clients[0]
    unbatched = _level(results, "unbatched", top)
    rows: list[dict[str, Any]] = []
    for setting in BATCHED:
        batched = _level(results, setting, top)
        if batched and unbatched:
            rows.append(
                _ratio(
                    f"{setting} / unbatched sentences/s at {top} clients",
                    batched["sentences_per_s"] / unbatched["sentences_per_s"],
                    "batching_speedup",
                    True,
                )
            )
    for setting in BATCHED:
        first = _level(results, setting, one)
        if first and (engine := _engine(results, first)) and engine["batch_size"] == 1:
            rows.append(
                _ratio(
                    f"{setting} p50 latency at {one} client / engine p50 (batch 1)",
                    first["p50_ms"] / engine["p50_ms"],
                    "p50_over_engine",
                    False,
                )
            )
            rows.append(
                _ratio(
                    f"{setting} p99 latency at {one} client / engine p99 (batch 1)",
                    first["p99_ms"] / engine["p99_ms"],
                    "p99_over_engine",
                    False,
                )
            )
    cont, static = _level(results, "continuous", P99_CLIENTS), _level(results, "static", P99_CLIENTS)
    if cont and static:
        rows.append(
            _ratio(
                f"continuous / static p99 latency at {P99_CLIENTS} clients",
                cont["p99_ms"] / static["p99_ms"],
                "p99_continuous_over_static",
                False,
            )
        )
        rows.append(
            _ratio(
                f"continuous / static sentences/s at {P99_CLIENTS} clients",
                cont["sentences_per_s"] / static["sentences_per_s"],
                "speed_continuous_over_static",
                True,
            )
        )
    batched = _level(results, BATCHED[0], top)
    if batched and (engine := _engine(results, batched)):
        rows.append(
            _ratio(
                f"gRPC ({BATCHED[0]}) / engine sentences/s at {top} clients (engine on batches of "
                f"{engine['batch_size']})",
                batched["sentences_per_s"] / engine["sentences_per_s"],
                "grpc_over_engine",
                True,
            )
        )
    peak = max(lv["peak_rss_mb"] for lv in results["levels"] if lv["setting"] in BATCHED)
    rows.append(_ratio("server peak RSS (VmHWM), MB", peak, "peak_rss_mb", False))
    for row in rows:
        row["met"] = row["value"] >= row["target"] if row["higher_is_better"] else row["value"] <= row["target"]
    return rows


def _level_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| server | clients | sentences/s | p50 ms | p99 ms | mean batch | engine sentences/s (same batch) "
        "| gRPC / engine | RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in results["levels"]:
        engine = _engine(results, lv)
        eng = f"{engine['sentences_per_s']:.2f} (b={engine['batch_size']})" if engine else "-"
        ratio = f"{lv['sentences_per_s'] / engine['sentences_per_s']:.2f}" if engine else "-"
        errors = f" ({lv['errors']} errors)" if lv["errors"] else ""
        lines.append(
            f"| {lv['setting']} | {lv['clients']} | {lv['sentences_per_s']:.2f}{errors} | {lv['p50_ms']:.0f} "
            f"| {lv['p99_ms']:.0f} | {lv['mean_batch']:.2f} | {eng} | {ratio} | {lv['rss_mb']:.0f} |"
        )
    return lines


def _engine_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| measured with clients | engine batch | sentences/s | p50 ms per batch | p99 ms per batch |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {e['clients']} | {e['batch_size']} | {e['sentences_per_s']:.2f} | {e['p50_ms']:.0f} | {e['p99_ms']:.0f} |"
        for e in results["engine"]
    ]
    return lines


def markdown(results: dict[str, Any]) -> str:
    cfg, machine = results["config"], results["machine"]
    engine = results["engine"][0] if results["engine"] else {}
    lines = [
        "# Load benchmark: `nmt-bench load`",
        "",
        f"Bundle `{cfg['bundle']}` ({engine.get('variant', '?')} on {engine.get('provider', '?')}), beam {cfg['beam_size']}, "
        f"{results['sentences']} {cfg['split']} sentences, one per Translate call, closed loop; {cfg['warmup']:g} s "
        f"warm-up then {cfg['duration']:g} s measured per client count; ORT threads {cfg['threads'] or 'default'}. "
        f"Machine: {machine['cpus']} CPUs, {machine['platform']}, shared with the load generator "
        f"(load average at the end: {', '.join(f'{x:.1f}' for x in machine['load_average_at_end'])}).",
        "",
        "`continuous`: `--batching continuous` (iteration-level batching: requests join and leave the running "
        "batch between decoder steps); `static`: the server's default config (a batch runs until its last sentence "
        "ends; it forms as soon as the engine is free, --max-wait-ms 0); `unbatched`: `--max-batch-size 1`. Mean batch: sentences per engine batch (static) or per "
        "decoder step (continuous) in the measured window (the server's histogram). "
        "Engine: `nmt.engine.translator.Translator.translate` alone, in-process, on consecutive batches of the "
        "continuous server's mean size, measured right after the servers at that client count (the unbatched rows "
        "compare with the engine at batch 1).",
        "",
        "## Server under load",
        "",
        *_level_table(results),
        "",
        "## Engine alone",
        "",
        *_engine_table(results),
        "",
        "## Goals",
        "",
        "| goal | measured | target | met |",
        "|---|---:|---:|---|",
    ]
    for g in goals(results):
        sign = ">=" if g["higher_is_better"] else "<="
        lines.append(f"| {g['goal']} | {g['value']:.2f} | {sign} {g['target']:g} | {'yes' if g['met'] else 'no'} |")
    if ceiling := _batching_ceiling(results):
        size, ratio = ceiling
        lines += [
            "",
            f"The engine alone (its static search) gains {ratio:.2f}x from batches of {size} over batches "
            "of 1 here, with these decode options (a static batch shrinks as its sentences end; a continuous "
            "one is refilled).",
        ]
    return "\n".join(lines) + "\n"


def _batching_ceiling(results: dict[str, Any]) -> tuple[int, float] | None:
    """(largest engine batch, its sentences/s over batch 1's) in this run."""
    one = [e["sentences_per_s"] for e in results["engine"] if e["batch_size"] == 1]
    largest = max(results["engine"], key=lambda e: e["batch_size"], default=None)
    if not one or largest is None or largest["batch_size"] == 1:
        return None
    return largest["batch_size"], largest["sentences_per_s"] / (sum(one) / len(one))


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, (speed, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    for setting, marker, color in (
        ("continuous", "o", "tab:blue"),
        ("static", "D", "tab:green"),
        ("unbatched", "s", "tab:orange"),
    ):
        levels = [lv for lv in results["levels"] if lv["setting"] == setting]
        clients = [lv["clients"] for lv in levels]
        style = {"marker": marker, "color": color}
        speed.plot(clients, [lv["sentences_per_s"] for lv in levels], label=f"gRPC, {setting}", **style)
        latency.plot(clients, [lv["p50_ms"] for lv in levels], label=f"p50, {setting}", **style)
        latency.plot(clients, [lv["p99_ms"] for lv in levels], linestyle="--", label=f"p99, {setting}", **style)
    batched = [lv for lv in results["levels"] if lv["setting"] == BATCHED[0]]
    engine = [(lv["clients"], e["sentences_per_s"]) for lv in batched if (e := _engine(results, lv))]
    speed.plot(*zip(*engine), marker="^", linestyle=":", color="gray", label="engine alone, same batch size")
    ticks = sorted({lv["clients"] for lv in results["levels"]})
    for axis, ylabel in ((speed, "sentences / s"), (latency, "latency, ms")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xticks(ticks, [str(t) for t in ticks])
        axis.yaxis.set_major_formatter(ScalarFormatter())
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    speed.yaxis.set_minor_formatter(ScalarFormatter())  # the few sentences/s decades need labels in between
    speed.set_title("Throughput")
    latency.set_title("Latency per call")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict[str, Any], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(json.dumps({**results, "goals": goals(results)}, indent=2) + "\n")
    text = markdown(results)
    (out / "load.md").write_text(text)
    plot(results, out / "load.png")
    return text
