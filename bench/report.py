"""decode.json, decode.md (tables with the goal ratios) and decode.png from one bench run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULT_FILES = ("decode.json", "decode.md", "decode.png")
# (label, numerator engine, denominator engine, goal): tokens/s ratios, same run.
RATIOS: tuple[tuple[str, str, str, float], ...] = (
    ("ORT fp32 fused / torch", "ort-fp32", "torch", 2.0),
    ("ORT int8 / torch", "ort-int8", "torch", 2.0),
    ("ORT fp32 / CT2 float32", "ort-fp32", "ct2-float32", 1.0),
    ("ORT int8 / CT2 int8", "ort-int8", "ct2-int8", 1.0),
    ("ORT fp32 shortlist / CT2 float32 vmap", "ort-fp32-shortlist", "ct2-float32-vmap", 1.0),
    ("ORT int8 shortlist / CT2 int8 vmap", "ort-int8-shortlist", "ct2-int8-vmap", 1.0),
    ("ORT fp32 shortlist / ORT fp32", "ort-fp32-shortlist", "ort-fp32", 1.0),
    ("ORT fp32 fused / unfused", "ort-fp32", "ort-fp32-unfused", 1.0),
    ("ORT fp32 step decoder / traced", "ort-fp32", "ort-fp32-traced", 1.0),
    ("ORT int8 step decoder / traced", "ort-int8", "ort-int8-traced", 1.0),
)
# --device cuda: ORT on CUDA (fp32 and fp16) against CTranslate2 on CUDA (float16 and float32).
CUDA_RATIOS: tuple[tuple[str, str, str, float], ...] = (
    ("ORT fp16 / CT2 float16", "ort-fp16", "ct2-float16", 1.0),
    ("ORT fp32 / CT2 float32", "ort-fp32", "ct2-float32", 1.0),
    ("ORT fp16 shortlist / CT2 float16 vmap", "ort-fp16-shortlist", "ct2-float16-vmap", 1.0),
    ("ORT fp16 / ORT fp32", "ort-fp16", "ort-fp32", 1.0),
    ("ORT fp32 fused / unfused", "ort-fp32", "ort-fp32-unfused", 1.0),
)


def _device(results: dict[str, Any]) -> str:
    return results["config"].get("device", "cpu")  # results written before --device: cpu


def _cells(results: dict[str, Any]) -> list[tuple[str, int]]:
    """(mode, batch size) columns in run order."""
    seen: list[tuple[str, int]] = []
    for row in results["decode"]:
        key = (row["mode"], row["batch_size"])
        if key not in seen:
            seen.append(key)
    return seen


def _lookup(results: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
    return {(r["engine"], r["mode"], r["batch_size"]): r for r in results["decode"]}


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every goal ratio per (mode, batch size); None where an engine is missing."""
    rows, table = [], _lookup(results)
    for label, top, bottom, goal in CUDA_RATIOS if _device(results) == "cuda" else RATIOS:
        values = {}
        for mode, size in _cells(results):
            a, b = table.get((top, mode, size)), table.get((bottom, mode, size))
            values[f"{mode} b={size}"] = round(a["tokens_per_s"] / b["tokens_per_s"], 3) if a and b else None
        rows.append({"ratio": label, "goal": goal, "values": values})
    return rows


def _identical(results: dict[str, Any], engine: str) -> str:
    parts = []
    for mode in dict.fromkeys(r["mode"] for r in results["decode"]):
        rows = [r for r in results["decode"] if r["engine"] == engine and r["mode"] == mode]
        if not rows or rows[0]["identical_to_torch"] is None:
            return "n/a (no torch run)"
        same, total = sum(r["identical_to_torch"] for r in rows), sum(r["sentences"] for r in rows)
        parts.append(f"{mode} {100 * same / total:.1f}%")
    return ", ".join(parts)


def _speed_table(results: dict[str, Any]) -> list[str]:
    cells, table = _cells(results), _lookup(results)
    lines = [
        "| engine | variant | " + " | ".join(f"{m} b={s}" for m, s in cells) + " | identical to torch |",
        "|---|---|" + "---:|" * len(cells) + "---|",
    ]
    for engine in results["engines"]:
        values = [
            f"{table[(engine, m, s)]['tokens_per_s']:.0f} ({table[(engine, m, s)]['p50_ms']:.1f})" for m, s in cells
        ]
        variant = results["variants"].get(engine, "eager")
        lines.append(f"| {engine} | {variant} | " + " | ".join(values) + f" | {_identical(results, engine)} |")
    for engine, reason in results["skipped"].items():
        lines.append(f"| {engine} | skipped: {reason} |" + " |" * (len(cells) + 1))
    return lines


def _ratio_table(results: dict[str, Any]) -> list[str]:
    cells = [f"{m} b={s}" for m, s in _cells(results)]
    lines = ["| ratio of tokens/s | goal | " + " | ".join(cells) + " |", "|---|---|" + "---:|" * len(cells)]
    for row in ratios(results):
        values = []
        for cell in cells:
            value = row["values"][cell]
            values.append("n/a" if value is None else f"{value:.2f} {'✓' if value >= row['goal'] else '✗'}")
        lines.append(f"| {row['ratio']} | ≥ {row['goal']:g} | " + " | ".join(values) + " |")
    return lines


def _encoder_table(results: dict[str, Any]) -> list[str]:
    sizes = list(dict.fromkeys(r["batch_size"] for r in results["encoder"]))
    table = {(r["engine"], r["batch_size"]): r for r in results["encoder"]}
    lines = ["| engine | " + " | ".join(f"b={s}" for s in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for engine in results["engines"]:
        values = [
            f"{row['gflops_per_s']:.1f}"
            + ("" if row["fraction_of_peak"] is None else f" ({100 * row['fraction_of_peak']:.0f}%)")
            for row in (table[(engine, s)] for s in sizes)
        ]
        star = " *" if table[(engine, sizes[0])]["includes_first_decoder_step"] else ""
        lines.append(f"| {engine}{star} | " + " | ".join(values) + " |")
    return lines


DISTURBED_CORES = 0.2  # other processes' average load above which the run is flagged


def _warning(machine: dict[str, Any]) -> list[str]:
    other = machine.get("other_processes_cores")
    if other is None or other <= DISTURBED_CORES:
        return []
    return [
        f"**Disturbed run: other processes kept {other} of {machine['logical_cpus']} cores busy on average. "
        "Every engine runs 2 threads that meet at a barrier after each operator, so a busy core slows the "
        "engines with many small operators the most; compare with care.**",
        "",
    ]


def _encoder_intro(results: dict[str, Any]) -> str:
    cfg, machine, peaks = results["config"], results["machine"], results["sgemm_gflops"]
    ct2 = (
        "* CTranslate2's Python API has no encoder-only call: its time includes one greedy decoder step, "
        "whose FLOPs are counted too."
    )
    if peaks is None:
        return (
            f"On {_device(results)} ({machine.get('gpu') or 'GPU unknown'}): no matmul peak (the CPU's fp32 "
            f"sgemm is no yardstick for a GPU), so GFLOP/s alone. {ct2}"
        )
    return (
        f"Peak at {machine['threads']} threads, {cfg['sgemm_size']}×{cfg['sgemm_size']} fp32 on the "
        f"{peaks.get('device', 'cpu').upper()} (best of a measurement before and after the decoding grid): "
        f"torch.mm {peaks['torch_mm']} GFLOP/s, ONNX Runtime MatMul {peaks['ort_matmul']} GFLOP/s. The int8 "
        f"engines are held against the same fp32 peak, so they can exceed 100%. {ct2}"
    )


def markdown(results: dict[str, Any]) -> str:
    cfg, machine = results["config"], results["machine"]
    settings = cfg["settings"]
    device = f"Device: cuda, GPU {machine.get('gpu') or 'unknown'} (host " if _device(results) == "cuda" else ""
    head = [
        "# Decoding benchmark (`nmt-bench decode`)",
        "",
        *_warning(machine),
        f"{results['sentences']} sentences of {cfg['split']} (evenly spaced out of {results['split_sentences']}; "
        f"{results['source_tokens']} source tokens), checkpoint `{cfg['checkpoint']}`. "
        f"Greedy and beam {settings['beam_size']} (GNMT length penalty {settings['length_penalty']}, at most "
        f"len(source) + {settings['max_len_extra']} tokens). {machine['threads']} threads for every engine; "
        f"{device}CPU: {machine['cpu']} ({machine['logical_cpus']} logical CPUs; "
        f"{', '.join(machine.get('cpu_flags') or ['flags unknown'])}){')' if device else ''}, load average "
        f"{machine['load_average_start'][0]} at the start, {machine['load_average_end'][0]} at the end, other "
        f"processes kept {machine.get('other_processes_cores')} cores busy on average while it ran; "
        f"{', '.join(f'{k} {v}' for k, v in machine['versions'].items())}. Whole grid: {results['seconds']:.0f} s.",
        "",
        "## Target tokens per second (p50 batch latency, ms)",
        "",
        "Tokens of the best hypothesis without EOS, over the summed batch latencies. Batches go through the "
        "engines in turn.",
        "",
    ]
    ratio = ["", "## Goals (ratios of tokens per second, same run)", ""]
    of_peak = "" if results["sgemm_gflops"] is None else " (% of the measured fp32 matmul peak)"
    encoder = ["", f"## Encoder: achieved GFLOP/s of its matrix products{of_peak}", "", _encoder_intro(results), ""]
    return (
        "\n".join(head + _speed_table(results) + ratio + _ratio_table(results) + encoder + _encoder_table(results))
        + "\n"
    )


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in results["decode"]))
    table = _lookup(results)
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    engines = results["engines"]
    width = 0.8 / len(engines)
    for ax, mode in zip(axes[0], modes):
        sizes = [s for m, s in _cells(results) if m == mode]
        for i, engine in enumerate(engines):
            values = [table[(engine, mode, s)]["tokens_per_s"] for s in sizes]
            ax.bar([x + i * width for x in range(len(sizes))], values, width, label=engine)
        ax.set_xticks([x + width * (len(engines) - 1) / 2 for x in range(len(sizes))], [f"batch {s}" for s in sizes])
        ax.set_yscale("log")
        on = results["machine"].get("gpu") if _device(results) == "cuda" else None
        ax.set_title(f"{mode}, " + (f"cuda ({on})" if on else f"{results['machine']['threads']} threads"))
        ax.set_ylabel("target tokens / s")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{results['config']['split']}, {results['sentences']} sentences")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict[str, Any], out: Path) -> str:
    """Write the three result files into `out`; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    results = {**results, "ratios": ratios(results)}
    (out / "decode.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    text = markdown(results)
    (out / "decode.md").write_text(text)
    plot(results, out / "decode.png")
    return text
