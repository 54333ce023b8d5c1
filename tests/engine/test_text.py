"""engine/text.py: segmentation and join keep every separator, case round trips, protected spans."""

from __future__ import annotations

import random

import pytest

from nmt.engine.text import Case, TextOptions, case_of, find_spans, prepare, restore_case, split_sentences

SENTENCES = [
    "A man rides a bike.",
    "Two dogs play in the snow!",
    "Is the girl running?",
    "Dr. Smith reads a book.",
    "It costs 3.5 dollars.",
    "Visit https://example.com/a.b today.",
    "A WOMAN SINGS.",
]
SEPARATORS = [" ", "  ", "\n", "\n\n", "\r\n", "\t", " \n \n", "\\n", "\n\n\n"]


def identity(text: str, options: TextOptions = TextOptions()) -> str:
    prepared = prepare(text, options)
    return prepared.finish([s.source for s in prepared.sentences])


@pytest.mark.parametrize("seed", range(20))
def test_joined_sentences_split_back_and_every_separator_survives(seed: int) -> None:
    rng = random.Random(seed)
    chosen = rng.sample(SENTENCES, rng.randint(2, 5))
    seps = [rng.choice(SEPARATORS) for _ in chosen[1:]]
    text = (
        rng.choice(["", " ", "\n"])
        + chosen[0]
        + "".join(s + c for s, c in zip(seps, chosen[1:]))
        + rng.choice(["", "\n", "  "])
    )
    bounds = split_sentences(text)
    assert [text[a:b] for a, b in bounds] == chosen
    # The separators between translations are the original's, byte for byte.
    prepared = prepare(text, TextOptions(normalize_case=False, protect_spans=False))
    out = prepared.finish([f"<{i}>" for i in range(len(chosen))])
    expected = text
    for i, (a, b) in reversed(list(enumerate(bounds))):
        expected = expected[:a] + f"<{i}>" + expected[b:]
    assert out == expected


def test_three_paragraphs_come_back_as_three_paragraphs() -> None:
    text = "A man rides a bike. Two dogs play.\n\nA woman sings.\n\nA cat sleeps. A bird sings."
    prepared = prepare(text, TextOptions())
    assert len(prepared.sentences) == 5
    assert prepared.finish(["S"] * 5) == "S S\n\nS\n\nS S"


def test_without_splitting_a_text_is_one_sentence_and_its_outer_whitespace_stays() -> None:
    prepared = prepare("  A man. Two dogs.\n", TextOptions(split_sentences=False))
    assert prepared.sources == ["A man. Two dogs."]
    assert prepared.finish(["X"]) == "  X\n"


@pytest.mark.parametrize(
    "text, case",
    [
        ("A MAN RIDES A BIKE.", Case.UPPER),
        ("A Man Rides A Bike Down The Street.", Case.TITLE),
        ("A Man Rides a Bike Down the Street.", Case.TITLE),
        ("A man rides a bike.", Case.AS_IS),
        ("I met John Smith in Paris.", Case.AS_IS),
        ("NASA launches a rocket.", Case.AS_IS),
        ("OK.", Case.AS_IS),
    ],
)
def test_case_is_recognised(text: str, case: Case) -> None:
    assert case_of(text) is case


def test_case_normalised_for_the_model_and_restored_after() -> None:
    upper, title = prepare("A MAN RIDES A BIKE.", TextOptions()), prepare("A Man Rides A Bike.", TextOptions())
    assert upper.sources == title.sources == ["A man rides a bike."]
    assert upper.finish(["Ein Mann fährt Fahrrad."]) == "EIN MANN FÄHRT FAHRRAD."
    assert title.finish(["Ein Mann fährt Fahrrad."]) == "Ein Mann Fährt Fahrrad."
    assert restore_case("ein mann", Case.AS_IS) == "ein mann"
    assert prepare("A MAN RIDES.", TextOptions(normalize_case=False)).sources == ["A MAN RIDES."]


def test_the_word_i_and_mixed_case_words_keep_their_case() -> None:
    assert prepare("I SEE A DOG.", TextOptions()).sources == ["I see a dog."]
    assert prepare("The Big iPhone Store Is Open.", TextOptions()).sources == ["The big iPhone store is open."]


@pytest.mark.parametrize(
    "span",
    [
        "https://example.com/photos?id=42",
        "www.example.org/a_b",
        "anna.berg@example.org",
        "@anna_b",
        "25",
        "3.5",
        "1,000",
        "2026-12-02",
        "10:30",
        "50%",
        "/var/log/syslog",
        "C:\\Users\\anna\\notes.txt",
        "./data/train.en",
    ],
)
def test_each_span_kind_is_found_and_comes_back_verbatim(span: str) -> None:
    sentence = f"Two dogs play near {span} in the park."
    assert [sentence[a:b] for a, b in find_spans(sentence)] == [span]
    prepared = prepare(sentence, TextOptions())
    assert span not in prepared.sources[0]
    placeholder = prepared.sentences[0].spans[0][0]
    # The model kept the placeholder; dropped it; repeated it: the span is there exactly once each time.
    for translation in (
        f"Zwei Hunde spielen bei {placeholder} im Park.",
        "Zwei Hunde spielen im Park.",
        f"{placeholder} Hunde spielen {placeholder} im Park.",
    ):
        out = prepared.finish([translation])
        assert out.count(span) == 1, (translation, out)
    assert (
        prepared.finish([f"Zwei Hunde spielen bei {placeholder} im Park."]) == f"Zwei Hunde spielen bei {span} im Park."
    )


def test_sentence_punctuation_after_a_url_stays_outside_it() -> None:
    assert [s for s in find_spans("See https://example.com/a.")] == [(4, 25)]


def test_spans_keep_their_case_in_an_all_caps_sentence() -> None:
    prepared = prepare("VISIT WWW.EXAMPLE.ORG TODAY.", TextOptions())
    assert len(prepared.sentences) == 1 and prepared.sentences[0].case is Case.UPPER
    placeholder = prepared.sentences[0].spans[0][0]
    assert prepared.finish([f"Besuche {placeholder} heute."]) == "BESUCHE WWW.EXAMPLE.ORG HEUTE."


def test_a_sentence_of_spans_and_symbols_only_comes_back_as_it_is() -> None:
    prepared = prepare("25. See you.", TextOptions())
    assert prepared.sentences[0].source == "" and prepared.finish(["", "Bis dann."]) == "25. Bis dann."
    assert prepare("\u200b", TextOptions()).finish([""]) == ""


def test_run_on_captions_without_final_punctuation_are_split() -> None:
    text = "A waterfall in a forest with many trees Two dogs running along the beach A man sits."
    assert [text[a:b] for a, b in split_sentences(text)] == [
        "A waterfall in a forest with many trees",
        "Two dogs running along the beach",
        "A man sits.",
    ]
    for whole in (
        "A man reads The Da Vinci Code.",
        "A person waits for the A bus.",
        "A Man Rides A Bike Down The Street.",
    ):
        assert split_sentences(whole) == [(0, len(whole))]
