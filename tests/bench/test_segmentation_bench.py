"""`nmt-bench segmentation` end to end on a tiny corpus: the report's structure, and accuracy numbers
that come from real splits (trivially splittable text scores 1.0, unpunctuated text 0.0)."""

from __future__ import annotations

import gzip
import json

import pytest

from nmt.bench import segmentation
from nmt.bench.cli import main

PUNCTUATED = [
    "The dog runs.",
    "A cat sleeps on the sofa.",
    "Two men play chess.",
    "The sun is bright today.",
    "A girl reads a book.",
    "The train leaves at noon.",
    "Birds sing in the trees.",
    "It is raining.",
]
UNPUNCTUATED = [s.lower().rstrip(".") for s in PUNCTUATED]


def installed() -> list[str]:
    names = []
    for name in segmentation.SEGMENTERS:
        try:
            segmentation.load(name)
        except ValueError:
            continue
        names.append(name)
    return names


@pytest.fixture
def tiny_data(tmp_path):
    for split, lines in (("tiny", PUNCTUATED), ("nopunct", UNPUNCTUATED)):
        with gzip.open(tmp_path / f"{split}.en.gz", "wt", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return tmp_path


def test_locate_counts_sentences_the_join_cannot_place():
    assert segmentation.locate("A b.  C d.\r\nE f.", ["A b.", "C d.", "E f."]) == 0
    assert segmentation.locate("A b.\nC d.", ["A b. C d."]) == 1  # a newline became a space
    assert segmentation.locate("A b. C d.", ["C d."]) == 1  # "A b." would be lost


def test_segmentation_bench_reports_real_accuracy(tiny_data, tmp_path, capsys):
    libraries = installed()
    if not libraries:
        pytest.skip("no sentence segmenter installed (pip install sentencex pysbd ...)")
    out = tmp_path / "results" / "segmentation"
    args = [
        "segmentation",
        "--splits",
        "tiny,nopunct",
        "--data-dir",
        str(tiny_data),
        "--out",
        str(out),
        "--repeats",
        "1",
        "--libraries",
        ",".join(libraries),
    ]
    assert main(args) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    n = len(segmentation.make_paragraphs(PUNCTUATED, "space", 0))
    assert n >= 2
    assert result["paragraphs"] == {f"{s}/{v}": n for s in ("tiny", "nopunct") for v in segmentation.SEPARATORS}
    assert result["space_punctuated_share"] == 0.5
    assert sorted(r["library"] for r in result["rows"]) == sorted(libraries)
    for row in result["rows"]:
        assert row["per_split_accuracy"]["tiny/space"] == 1.0, row["library"]
        assert row["per_split_accuracy"]["nopunct/space"] == 0.0, row["library"]
        assert row["accuracy_lines_first"]["newline"] == 1.0, row["library"]
        assert set(row["hard_cases"]) == {name for name, _, _ in segmentation.HARD_CASES}
        assert row["accuracy"]["hard"] == sum(row["hard_cases"].values()) / len(segmentation.HARD_CASES)
        assert 0 < row["speed_ratio"] <= 1.0 and row["sentences_per_s"] > 0
        assert row["details"]["space"]["precision"] == 1.0 and row["details"]["space"]["recall"] == 0.5
    report = out.with_suffix(".md").read_text()
    assert report.startswith("# Sentence segmentation") and "CPU: " in report and "**Winner: " in report
    assert "| library | package | space | newline | mixed | hard |" in report
    with pytest.raises(ValueError, match="--force"):
        main(args)


def test_unknown_segmenter_is_refused():
    with pytest.raises(ValueError, match="unknown segmenter"):
        segmentation.main(["--libraries", "nosuch"])
