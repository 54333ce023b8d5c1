"""Issue 23, part 1: every stage before the model (sentences, case, protected spans, tokenizer) costs
time linear in the text, whatever the text. A ratio, never an absolute time: CPU time per byte at
16 KB against 1 KB (quadratic work shows as 16x; the limit leaves room for a noisy machine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nmt.bench.adversarial_text import SHAPES, cost_per_byte, make
from nmt.engine.prepared import prepare_texts
from nmt.engine.text import TextOptions, find_spans, prepare
from nmt.engine.translator import Translator


@pytest.fixture(scope="module")
def translator(tiny_bundle: Path) -> Translator:
    return Translator.from_bundle(tiny_bundle)


@pytest.mark.parametrize("shape", SHAPES)
def test_cost_per_byte_does_not_grow_with_the_text(translator: Translator, shape: str) -> None:
    small, large = cost_per_byte(
        lambda text: prepare_texts(translator.tokenize, "en", [text], TextOptions()), shape, (1024, 16384)
    )
    assert large.per_byte_ns < 2.0 * small.per_byte_ns, (small, large)


def test_every_span_of_a_crowded_sentence_comes_back_once() -> None:
    """More spans than placeholder names (thousands): each span verbatim, once (where the model left no
    placeholder, a span goes by its relative position: the words around it may move)."""
    text = "a " + make("spaced numbers", 16384)
    [sentence] = prepare(text, TextOptions()).sentences
    assert len(sentence.spans) > 8000
    restored = sentence.restore(sentence.source.replace("Elmo", "Elmo Elmo"))  # a copy the model made is dropped
    assert sorted(restored.split()) == sorted(text.split())


def test_an_address_right_after_a_span_is_found() -> None:
    """The e-mail pattern starts only where its run starts (linear time), and right after another span."""
    sentence = "see ./b+@example.org now"
    assert [sentence[a:b] for a, b in find_spans(sentence)] == ["./b", "+@example.org"]


def test_a_private_use_character_of_the_text_does_not_pose_as_a_span() -> None:
    sentence = "A dog \ue000 runs to 3 cats."
    [prepared] = prepare(sentence, TextOptions()).sentences
    assert [span for _, span, _ in prepared.spans] == ["3"]
    assert "\ue000" not in prepared.source
    assert prepared.restore(prepared.source) == sentence.replace("\ue000", "\ufffd")
