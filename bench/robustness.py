"""`nmt-bench robustness`: real text in, faithful text out; the same test sentences in other shapes.

    nmt-bench robustness [--split test_2016_flickr] [--bundle bundles/default] [--out bench/results]
                         [--limit N] [--seed 0] [--src en --tgt de] [--batch-size 32] [--force]

Conditions from the same sentences (bench/robustness_sets.py): plain, paragraphs (2-5 sentences per
text; reference: theirs joined with a space), ALL CAPS, Title Case, no final punctuation, protected
spans (URLs, e-mails, @handles, numbers, paths; primary metric: spans found verbatim); then ~200 odd
inputs, only checked by `degenerate()`. Every text goes through `Translator.translate` with the
bundle's default options, as a user calls it (batches of --batch-size, sorted by length): the bench
builds inputs and measures, and whatever text pipeline the translator has is what gets measured.
Per condition: sacreBLEU cased and lowercased, chrF, sys_len/ref_len, BLEU against plain, degenerate
outputs; targets printed PASS/FAIL. Writes robustness-SPLIT.{json,md,png} into --out (--force to replace).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import robustness_sets as sets

CHAR_REPEAT = re.compile(r"(\S{2,}?)\1{3,}")  # a unit of >= 2 characters 4+ times in a row inside a word-run
MIN_RUN = 4  # a word n-gram this many times in a row is degenerate
MAX_NGRAM = 4
MAX_EXAMPLES = 30  # per condition in the JSON: degenerate outputs and missed spans
PARAGRAPH_BLEU_DROP = 0.5  # targets
PARAGRAPH_LEN_RATIO = 0.02
CASE_SHARE = 0.95


def longest_run(words: list[str], n: int) -> tuple[int, list[str]]:
    """The most consecutive repeats of one word n-gram, and that n-gram."""
    best, gram = 0, []
    for i in range(len(words) - n + 1):
        reps = 1
        while words[i + reps * n : i + (reps + 1) * n] == words[i : i + n]:
            reps += 1
        if reps > best:
            best, gram = reps, words[i : i + n]
    return best, gram


def degenerate(source: str, output: str) -> str | None:
    """Why an output is degenerate, or None: absurdly long (characters > 3 x the source's + 30), a word
    n-gram (n = 1..4, ignoring case) 4+ times in a row (more times than the source repeats any n-gram), or a substring
    of >= 2 characters 4+ times in a row inside a word-run (not when the source has that run itself)."""
    if len(output) > 3 * len(source) + 30:
        return f"too long: {len(output)} characters for a {len(source)}-character source"
    words, source_words = output.lower().split(), source.lower().split()
    for n in range(1, MAX_NGRAM + 1):
        reps, gram = longest_run(words, n)
        if reps >= MIN_RUN and reps > longest_run(source_words, n)[0]:
            return f"word {n}-gram {' '.join(gram)!r} {reps} times in a row"
    for match in CHAR_REPEAT.finditer(output):
        unit = match.group(1)
        if unit * MIN_RUN not in source:
            return f"substring {unit!r} {len(match.group(0)) // len(unit)} times in a row"
    return None


@dataclass(frozen=True)
class RobustnessConfig:
    bundle: Path = Path("bundles/default")
    split: str = "test_2016_flickr"
    data_dir: Path | None = None  # None: $NMT_DATA_DIR, else the verified download cache
    src: str = "en"
    tgt: str = "de"
    limit: int | None = None  # first N sentences, and N protected-span texts (development)
    seed: int = 0
    batch_size: int = 32
    threads: int = 0  # ORT intra-op threads; 0 = the engine's default
    out: Path = Path("bench/results")
    force: bool = False
    strict: bool = False  # exit 1 when a target fails

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {self.threads}")

    def result_paths(self) -> list[Path]:
        return [self.out / f"robustness-{self.split}.{ext}" for ext in ("json", "md", "png")]


def translate_all(translator: Any, options: Any, texts: tuple[str, ...] | list[str], batch_size: int) -> list[str]:
    """The best translation of each text, in input order; batches of similar length."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    outputs = [""] * len(texts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        results = translator.translate([texts[i] for i in chunk], options)
        assert len(results) == len(chunk), (len(results), len(chunk))
        for i, hyps in zip(chunk, results):
            outputs[i] = hyps[0].text
    return outputs


def degenerate_list(sources: tuple[str, ...] | list[str], outputs: list[str]) -> list[dict[str, Any]]:
    found = [(i, degenerate(s, o)) for i, (s, o) in enumerate(zip(sources, outputs))]
    return [{"index": i, "source": sources[i], "output": outputs[i], "reason": why} for i, why in found if why]


def span_stats(cond: sets.Condition, outputs: list[str]) -> dict[str, Any]:
    """Verbatim: spans found as exact substrings; once: texts whose output has each of its spans exactly once."""
    by_kind: dict[str, list[int]] = {}
    found = total = once = 0
    missed = []
    for i, (spans, kinds, out) in enumerate(zip(cond.spans, cond.span_kinds, outputs)):
        hits = [span in out for span in spans]
        found, total = found + sum(hits), total + len(spans)
        once += all(out.count(span) == 1 for span in spans)
        for kind, hit in zip(kinds, hits):
            by_kind.setdefault(kind, [0, 0])[0] += hit
            by_kind[kind][1] += 1
        if not all(hits):
            missed.append(
                {
                    "index": i,
                    "source": cond.sources[i],
                    "output": out,
                    "missing": [s for s, h in zip(spans, hits) if not h],
                }
            )
    return {
        "spans": total,
        "verbatim": found,
        "verbatim_pct": 100.0 * found / max(total, 1),
        "once_pct": 100.0 * once / max(len(outputs), 1),
        "by_kind_pct": {k: round(100.0 * v[0] / v[1], 1) for k, v in sorted(by_kind.items())},
        "missed_examples": missed[:MAX_EXAMPLES],
    }


def score(cond: sets.Condition, outputs: list[str]) -> dict[str, Any]:
    from sacrebleu.metrics import BLEU, CHRF

    refs = [list(cond.references)]
    bleu_metric, chrf_metric = BLEU(), CHRF()
    bleu = bleu_metric.corpus_score(outputs, refs)
    bleu_ci = BLEU(lowercase=True).corpus_score(outputs, refs)  # = sacrebleu.corpus_bleu(..., lowercase=True)
    bad = degenerate_list(cond.sources, outputs)
    row: dict[str, Any] = {
        "condition": cond.name,
        "texts": len(outputs),
        "bleu": round(bleu.score, 2),
        "bleu_ci": round(bleu_ci.score, 2),
        "chrf": round(chrf_metric.corpus_score(outputs, refs).score, 2),
        "sys_len": bleu.sys_len,
        "ref_len": bleu.ref_len,
        "len_ratio": round(bleu.sys_len / max(bleu.ref_len, 1), 4),
        "signatures": {"bleu": str(bleu_metric.get_signature()), "chrf": str(chrf_metric.get_signature())},
        "degenerate": len(bad),
        "degenerate_examples": bad[:MAX_EXAMPLES],
        "examples": [
            {"source": s, "output": o, "reference": r}
            for s, o, r in list(zip(cond.sources, outputs, cond.references))[:3]
        ],
    }
    if cond.spans:
        row["spans"] = span_stats(cond, outputs)
    return row


def against_plain(rows: list[dict[str, Any]]) -> None:
    plain = rows[0]
    for row in rows:
        row["delta_bleu"] = round(row["bleu"] - plain["bleu"], 2)
        row["bleu_ci_pct_of_plain"] = round(100.0 * row["bleu_ci"] / plain["bleu_ci"], 1) if plain["bleu_ci"] else None
        row["len_ratio_vs_plain"] = round(row["len_ratio"] / plain["len_ratio"], 4) if plain["len_ratio"] else None


def check_targets(rows: list[dict[str, Any]], odd_degenerate: int) -> list[dict[str, Any]]:
    by = {row["condition"]: row for row in rows}
    plain, para = by["plain"], by["paragraphs"]
    len_off = abs((para["len_ratio_vs_plain"] or 0.0) - 1.0)
    total_bad = sum(row["degenerate"] for row in rows) + odd_degenerate
    targets = [
        (
            "paragraphs BLEU >= plain - 0.5",
            f"{para['bleu']:.2f} vs {plain['bleu'] - PARAGRAPH_BLEU_DROP:.2f}",
            para["bleu"] >= plain["bleu"] - PARAGRAPH_BLEU_DROP,
        ),
        (
            "paragraphs length ratio within 2% of plain",
            f"{para['len_ratio']:.3f} vs {plain['len_ratio']:.3f} ({100 * len_off:.1f}%)",
            len_off <= PARAGRAPH_LEN_RATIO,
        ),
        *(
            (
                f"{name} BLEU-ci >= 95% of plain",
                f"{by[name]['bleu_ci_pct_of_plain']}%",
                (by[name]["bleu_ci_pct_of_plain"] or 0.0) >= 100 * CASE_SHARE,
            )
            for name in ("ALL CAPS", "Title Case")
        ),
        (
            "protected spans 100% verbatim",
            f"{by['protected spans']['spans']['verbatim_pct']:.1f}%",
            by["protected spans"]["spans"]["verbatim"] == by["protected spans"]["spans"]["spans"],
        ),
        ("0 degenerate outputs", f"{total_bad} (odd inputs {odd_degenerate})", total_bad == 0),
    ]
    return [{"target": name, "value": value, "pass": bool(ok)} for name, value, ok in targets]


def machine_info() -> dict[str, Any]:
    import onnxruntime

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return {
        "cpu": model,
        "cpu_flags": flags,
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


def code_state() -> dict[str, Any]:
    """The engine that ran: the checkout's commit, uncommitted engine/ changes, a sha256 over the imported
    engine's *.py files (others edit them while benches run), and whether it has the text module."""
    import hashlib

    engine_dir = Path(importlib.util.find_spec("nmt.engine").origin).parent  # type: ignore[arg-type, union-attr]
    digest = hashlib.sha256()
    for path in sorted(engine_dir.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=engine_dir, capture_output=True, text=True, timeout=30, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    dirty = git("status", "--porcelain", "--", ".")
    return {
        "engine_dir": str(engine_dir),
        "commit": git("rev-parse", "HEAD"),
        "engine_uncommitted": dirty.splitlines() if dirty else [],
        "engine_py_sha256": digest.hexdigest(),
        "engine_text_module": (engine_dir / "text.py").is_file(),
        "text_pipeline_loaded": "nmt.engine.text" in sys.modules,
    }  # did the Translator import it


def load_split(cfg: RobustnessConfig) -> tuple[list[str], list[str], int]:
    from nmt.training.data import multi30k

    corpus = multi30k(cfg.split, cfg.src, cfg.tgt, cfg.data_dir)
    n = len(corpus) if cfg.limit is None else min(cfg.limit, len(corpus))
    return corpus.src[:n], corpus.tgt[:n], len(corpus)


def run(cfg: RobustnessConfig) -> dict[str, Any]:
    """The whole benchmark; returns what robustness-SPLIT.json holds."""
    from nmt.engine.runtime import RuntimeConfig
    from nmt.engine.translator import Translator

    sources, references, split_size = load_split(cfg)
    runtime = RuntimeConfig(intra_op_threads=cfg.threads)
    translator = Translator.from_bundle(cfg.bundle, runtime)
    options = translator.default_options()
    code, info, started = code_state(), machine_info(), time.time()  # before: others edit engine/ meanwhile
    rows = []
    for cond in sets.build_conditions(sources, references, cfg.seed, cfg.limit):
        t0 = time.perf_counter()
        outputs = translate_all(translator, options, cond.sources, cfg.batch_size)
        rows.append({**score(cond, outputs), "seconds": round(time.perf_counter() - t0, 1)})
        print(f"  {cond.name}: {len(outputs)} texts, {rows[-1]['seconds']} s", file=sys.stderr)
    against_plain(rows)
    odd = sets.odd_inputs(cfg.seed)
    odd_outputs = translate_all(translator, options, odd, cfg.batch_size)
    odd_bad = degenerate_list(odd, odd_outputs)
    code["engine_changed_during_run"] = code_state()["engine_py_sha256"] != code["engine_py_sha256"]
    info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "config": config,
        "bundle": str(cfg.bundle.resolve()),
        "split": cfg.split,
        "split_sentences": split_size,
        "sentences": len(sources),
        "options": asdict(options),
        "engine": {"runtime": asdict(runtime), "model": asdict(translator.info)},
        "code": code,
        "machine": info,
        "seconds": round(time.time() - started, 1),
        "conditions": rows,
        "odd_inputs": {
            "count": len(odd),
            "degenerate": odd_bad,
            "outputs": [{"source": s, "output": o} for s, o in zip(odd, odd_outputs)],
        },
        "targets": check_targets(rows, len(odd_bad)),
    }


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| condition | texts | BLEU | BLEU-ci | chrF | len ratio | Δ BLEU vs plain | BLEU-ci % of plain "
        "| degenerate | verbatim % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["conditions"]:
        spans = r.get("spans")
        lines.append(
            f"| {r['condition']} | {r['texts']} | {r['bleu']:.2f} | {r['bleu_ci']:.2f} | {r['chrf']:.2f} | "
            f"{r['len_ratio']:.3f} | {r['delta_bleu']:+.2f} | {fmt(r['bleu_ci_pct_of_plain'], '.1f')} | "
            f"{r['degenerate']} | {fmt(spans['verbatim_pct'], '.1f') if spans else '-'} |"
        )
    return lines


def markdown(results: dict[str, Any]) -> str:
    cfg, m, code = results["config"], results["machine"], results["code"]
    pipeline = (
        "the Translator loaded engine/text.py (the text pipeline)"
        if code["text_pipeline_loaded"]
        else "the Translator did not load engine/text.py: numbers before the text pipeline"
    )
    changed = ", CHANGED during the run" if code.get("engine_changed_during_run") else ""
    lines = [
        f"# Robustness (`nmt-bench robustness`): {results['split']}",
        "",
        f"{results['sentences']} of {results['split_sentences']} sentences of {results['split']} "
        f"({cfg['src']}→{cfg['tgt']}), bundle `{cfg['bundle']}` ({results['engine']['model']['precision']}, "
        f"{results['engine']['model']['provider']}), the bundle's default options "
        f"{json.dumps(results['options'])}, batches of {cfg['batch_size']}, seed {cfg['seed']}. "
        f"Commit {str(code['commit'])[:12]}; {pipeline}"
        f"{'; uncommitted engine/ changes' if code['engine_uncommitted'] else ''} (engine *.py sha256 "
        f"{str(code['engine_py_sha256'])[:12]}{changed}). CPU: {m['cpu']} "
        f"({m['logical_cpus']} logical CPUs), load average {m['load_average_start'][0]} at the start, "
        f"{m['load_average_end'][0]} at the end; {results['seconds']} s in all. {results['date']}.",
        "",
        *([f"**Note:** {results['note']}", ""] if results.get("note") else []),
        *table(results),
        "",
        "BLEU: sacreBLEU (13a, cased); BLEU-ci: lowercased; len ratio: sys_len/ref_len. Paragraphs are "
        "scored per paragraph against the group's references joined with a space; protected spans against "
        "the German references with the same spans (their BLEU is secondary: the references differ from "
        "plain's), verbatim: spans found as exact substrings of the output.",
        "",
    ]
    spans = next(r["spans"] for r in results["conditions"] if "spans" in r)
    lines += [
        f"Protected spans: {spans['verbatim']} of {spans['spans']} verbatim; every span exactly once in "
        f"{spans['once_pct']:.1f}% of outputs; verbatim by kind: "
        + ", ".join(f"{k} {v:.1f}%" for k, v in spans["by_kind_pct"].items())
        + ".",
        "",
        "## Targets",
        "",
        "| target | value | result |",
        "|---|---|---|",
    ]
    lines += [f"| {t['target']} | {t['value']} | {'PASS' if t['pass'] else 'FAIL'} |" for t in results["targets"]]
    odd = results["odd_inputs"]
    lines += ["", f"## Odd inputs: {len(odd['degenerate'])} of {odd['count']} degenerate", ""]
    if odd["degenerate"]:
        lines += ["| input | output | reason |", "|---|---|---|"]
        lines += [f"| {cell(d['source'])} | {cell(d['output'])} | {d['reason']} |" for d in odd["degenerate"]]
    for r in results["conditions"]:
        if r["degenerate"]:
            lines += [
                "",
                f"Degenerate in {r['condition']}: {r['degenerate']}, e.g. "
                + "; ".join(f"{cell(d['output'][:80])} ({d['reason']})" for d in r["degenerate_examples"][:3]),
            ]
    return "\n".join(lines) + "\n"


def cell(text: str) -> str:
    """A table cell: repr-like escapes for line breaks, pipes escaped, long text cut."""
    text = text if len(text) <= 120 else text[:117] + "..."
    return "`" + text.replace("\\", "\\\\").replace("\n", "\\n").replace("|", "\\|").replace("`", "'") + "`"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["conditions"]
    plain = rows[0]
    metrics = (("bleu", "BLEU"), ("bleu_ci", "BLEU-ci"), ("chrf", "chrF"))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(metrics)
    for k, (key, label) in enumerate(metrics):
        values = [100.0 * r[key] / plain[key] if plain[key] else 0.0 for r in rows]
        ax.bar(
            [i + (k - 1) * width for i in range(len(rows))],
            values,
            width,
            label=f"{label} % of plain",
            alpha=1.0 if key == "bleu_ci" else 0.5,
        )
    ax.axhline(100 * CASE_SHARE, color="red", linestyle="--", linewidth=1, label="95% target")
    ax.set_xticks(range(len(rows)), [r["condition"] for r in rows], rotation=15)
    ax.set_ylabel("% of plain")
    ax.set_title(f"Robustness on {results['split']} (protected spans: different references)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(results: dict[str, Any]) -> str:
    lines = [f"{'condition':<16} {'BLEU':>6} {'BLEU-ci':>7} {'chrF':>6} {'len':>6} {'Δ':>6} {'degen':>5} verbatim"]
    for r in results["conditions"]:
        verbatim = f"{r['spans']['verbatim_pct']:.1f}%" if "spans" in r else "-"
        lines.append(
            f"{r['condition']:<16} {r['bleu']:>6.2f} {r['bleu_ci']:>7.2f} {r['chrf']:>6.2f} "
            f"{r['len_ratio']:>6.3f} {r['delta_bleu']:>+6.2f} {r['degenerate']:>5} {verbatim}"
        )
    lines.append(
        f"odd inputs: {len(results['odd_inputs']['degenerate'])} of {results['odd_inputs']['count']} degenerate"
    )
    lines += [f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['value']}" for t in results["targets"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> RobustnessConfig:
    d = RobustnessConfig()
    p = argparse.ArgumentParser(prog="nmt-bench robustness", description=__doc__.splitlines()[0])
    p.add_argument("--split", default=d.split, help="a Multi30k split with both languages (default: %(default)s)")
    p.add_argument("--bundle", type=Path, default=d.bundle, help="model bundle (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, help="Multi30k directory (default: $NMT_DATA_DIR, else download)")
    p.add_argument("--src", default=d.src, help="source language (default: %(default)s)")
    p.add_argument("--tgt", default=d.tgt, help="target language (default: %(default)s)")
    p.add_argument(
        "--limit",
        type=int,
        help="first N sentences, and N protected-span texts (default: the split; "
        f"at least {sets.SPAN_SENTENCES} span texts)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="paragraphs, spans, fuzz (default: %(default)s)")
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="texts per translate call (default: %(default)s)"
    )
    p.add_argument("--threads", type=int, default=d.threads, help="ORT intra-op threads; 0 = the engine's default")
    p.add_argument("--out", type=Path, default=d.out, help="results directory (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace existing robustness-SPLIT.* in --out")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    a = p.parse_args(argv)
    try:
        return RobustnessConfig(
            a.bundle,
            a.split,
            a.data_dir,
            a.src,
            a.tgt,
            a.limit,
            a.seed,
            a.batch_size,
            a.threads,
            a.out,
            a.force,
            a.strict,
        )
    except ValueError as e:
        p.error(str(e))
        raise  # unreachable


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    existing = [p.name for p in cfg.result_paths() if p.exists()]
    if existing and not cfg.force:
        print(
            f"nmt-bench robustness: error: {cfg.out} already has {', '.join(existing)}; pass --force to replace",
            file=sys.stderr,
        )
        return 2
    try:
        results = run(cfg)
    except (ValueError, OSError) as e:  # BundleError, DataError: ValueErrors that name the problem
        print(f"nmt-bench robustness: error: {e}", file=sys.stderr)
        return 1
    cfg.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = cfg.result_paths()
    json_path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    md_path.write_text(markdown(results))
    plot(results, png_path)
    print(summary(results))
    print(f"wrote {json_path}, {md_path}, {png_path}")
    return 1 if cfg.strict and not all(t["pass"] for t in results["targets"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
