"""`nmt-bench robustness`: the condition builders, `degenerate()`, and a short real run on a tiny bundle."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from nmt.bench import cli
from nmt.bench import robustness_sets as sets
from nmt.bench.robustness import degenerate

SOURCES = [
    "A man rides a bike.",
    "Two dogs play in the park!",
    "Is it raining?",
    "A woman in a red coat",
    '"Hello," she said.',
    "Children play soccer.",
    "A cat sleeps.",
]
REFERENCES = [
    "Ein Mann fährt Fahrrad.",
    "Zwei Hunde spielen im Park!",
    "Regnet es?",
    "Eine Frau in einem roten Mantel",
    "„Hallo“, sagte sie.",
    "Kinder spielen Fußball.",
    "Eine Katze schläft.",
]


def test_case_conditions_change_only_the_sources() -> None:
    caps, title = sets.all_caps(SOURCES, REFERENCES), sets.title(SOURCES, REFERENCES)
    assert caps.sources[:2] == ("A MAN RIDES A BIKE.", "TWO DOGS PLAY IN THE PARK!")
    assert title.sources[1] == "Two Dogs Play In The Park!"
    assert caps.references == title.references == tuple(REFERENCES)


def test_title_case_keeps_punctuation_and_the_rest_of_each_word() -> None:
    assert (
        sets.title_case('a man\'s "big" dog-walk, (really) 3rd place.  iPhone')
        == 'A Man\'s "Big" Dog-walk, (Really) 3rd Place.  IPhone'
    )
    assert sets.title_case('"hello," she said.\nnew line') == '"Hello," She Said.\nNew Line'


def test_final_punctuation_is_removed_and_references_stay() -> None:
    cond = sets.no_final_punct(SOURCES, REFERENCES)
    assert cond.sources[:4] == (
        "A man rides a bike",
        "Two dogs play in the park",
        "Is it raining",
        "A woman in a red coat",
    )
    assert cond.sources[4] == '"Hello," she said'
    assert sets.strip_final("Wow!?! ") == "Wow" and sets.strip_final("e.g. this") == "e.g. this"
    assert cond.references == tuple(REFERENCES)


def test_paragraphs_join_consecutive_sentences_and_their_references() -> None:
    cond = sets.paragraphs(SOURCES, REFERENCES, seed=0)
    assert cond == sets.paragraphs(SOURCES, REFERENCES, seed=0)  # seeded
    start = 0
    for text, ref in zip(cond.sources, cond.references):
        parts = re.split(r" (?=[A-Z\"])|\n\n|\n", text)
        k = len(parts)
        assert 2 <= k <= 5 and parts == SOURCES[start : start + k]
        assert ref == " ".join(REFERENCES[start : start + k])
        start += k
    assert start == len(SOURCES)


def test_paragraph_groups_cover_the_split_with_some_line_breaks() -> None:
    sources = [f"Sentence {i}." for i in range(400)]
    cond = sets.paragraphs(sources, sources, seed=3)
    assert all(2 <= len(re.findall(r"Sentence \d+\.", t)) <= 5 for t in cond.sources)
    assert " ".join(cond.references) == " ".join(sources)
    assert any("\n\n" in t for t in cond.sources) and any(re.search(r"[^\n]\n[^\n]", t) for t in cond.sources)
    assert sum("\n" not in t for t in cond.sources) > len(cond.sources) / 2  # mostly spaces


def test_protected_spans_are_embedded_once_and_recorded() -> None:
    cond = sets.protected_spans(SOURCES, REFERENCES, seed=0)
    assert len(cond.sources) == sets.SPAN_SENTENCES  # the 7 sentences, cycled
    assert len(cond.spans) == len(cond.span_kinds) == len(cond.sources)
    for text, ref, spans, kinds in zip(cond.sources, cond.references, cond.spans, cond.span_kinds):
        assert 1 <= len(spans) <= 2 and len(kinds) == len(spans)
        assert all(text.count(span) == 1 and span in ref for span in spans), (text, spans)
    assert {k for kinds in cond.span_kinds for k in kinds} == set(sets.SPAN_KINDS)
    assert sum(len(s) == 2 for s in cond.spans) > 50
    assert all(
        text.startswith(SOURCES[i % 7].rstrip(".!?")) or text.endswith(SOURCES[i % 7])
        for i, text in enumerate(cond.sources)
    )  # appended, or a prefix before the whole sentence
    assert len(sets.protected_spans(SOURCES, REFERENCES, seed=0, count=3).sources) == 3


def test_protected_span_references_use_the_german_template() -> None:
    cond = sets.protected_spans(["A dog runs."], ["Ein Hund rennt."], seed=1, count=300)
    for text, ref, spans in zip(cond.sources, cond.references, cond.spans):
        if text.startswith("A dog runs, see ") and len(spans) == 1:
            assert ref == f"Ein Hund rennt, siehe {spans[0]}."
            break
    else:
        pytest.fail("no 'see' template among 300 texts")


def test_odd_inputs_are_seeded_and_include_the_fixed_lines() -> None:
    odd = sets.odd_inputs(0)
    assert len(odd) == sets.ODD_INPUTS and odd == sets.odd_inputs(0) and odd != sets.odd_inputs(1)
    assert "A man rides a bike.\\nTwo dogs play." in odd and "A MAN RIDES A BIKE." in odd
    assert any(re.search("[\u0400-\u04ff]", t) for t in odd) and any(len(t) >= 25 and " " not in t for t in odd)


@pytest.mark.parametrize(
    "source, output",
    [
        ("Very good.", "Sehr sehr sehr sehr gut."),
        ("A man.", "Ein Mann , ein Mann , ein Mann , ein Mann ,"),
        ("Thanks", "Fanananansansanser."),
        ("no", "Ein freiem Oberkörper ist ohne freiem Oberkörper zu sehen."),
        ("xyz", "Ein (E“ (E“ (E“ (E“ Axt."),
    ],
)
def test_degenerate_positives(source: str, output: str) -> None:
    assert degenerate(source, output)


@pytest.mark.parametrize(
    "source, output",
    [
        ("A man rides a bike.", "Ein Mann fährt Fahrrad."),
        ("Yes, yes, yes.", "Ja, ja, ja."),
        ("It costs 1,000,000 dollars...", "Es kostet 1,000,000 Dollar..."),
        ("dog dog dog dog dog", "Hund Hund Hund Hund Hund"),  # the source repeats as much
        ("hahahahaha", "hahahahaha"),
        ("", ""),
    ],
)
def test_degenerate_negatives(source: str, output: str) -> None:
    assert degenerate(source, output) is None


def test_degenerate_reasons() -> None:
    assert degenerate("Very good.", "Sehr sehr sehr sehr gut.") == "word 1-gram 'sehr' 4 times in a row"
    assert degenerate("Good.", "gut gut gut gut") == "word 1-gram 'gut' 4 times in a row"
    assert degenerate("ab", "x" * 37) == "too long: 37 characters for a 2-character source"
    assert degenerate("Thanks", "Fanananansansanser.") == "substring 'an' 4 times in a row"


@pytest.mark.slow
def test_robustness_runs_on_a_tiny_bundle(tiny_bundle: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    args = [
        "robustness",
        "--bundle",
        str(tiny_bundle),
        "--data-dir",
        str(data_dir),
        "--limit",
        "6",
        "--threads",
        "1",
        "--batch-size",
        "16",
        "--out",
        str(out),
    ]
    assert cli.main(args) == 0
    split = "test_2016_flickr"
    assert sorted(p.name for p in out.iterdir()) == [f"robustness-{split}.{e}" for e in ("json", "md", "png")]
    results = json.loads((out / f"robustness-{split}.json").read_text())
    rows = {r["condition"]: r for r in results["conditions"]}
    assert list(rows) == ["plain", "paragraphs", "ALL CAPS", "Title Case", "no final punct", "protected spans"]
    assert rows["plain"]["texts"] == 6 and rows["protected spans"]["texts"] == 6 and rows["plain"]["delta_bleu"] == 0
    assert 0 <= rows["protected spans"]["spans"]["verbatim_pct"] <= 100
    assert results["odd_inputs"]["count"] == sets.ODD_INPUTS and len(results["targets"]) == 6
    assert results["options"] and results["machine"]["cpu_flags"] is not None and results["bundle"]
    assert "| condition | texts | BLEU | BLEU-ci |" in (out / f"robustness-{split}.md").read_text()
    assert cli.main(args) == 2  # refuses to replace them without --force


def test_bad_settings_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["robustness", "--limit", "0"])
    assert "--limit must be at least 1" in capsys.readouterr().err
