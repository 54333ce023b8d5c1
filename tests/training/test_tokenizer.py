from __future__ import annotations

import pytest

from nmt.training.data import multi30k
from nmt.training.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer


@pytest.fixture(scope="module")
def tokenizer(data_dir, tmp_path_factory):
    train = multi30k("train", "en", "de", data_dir)
    path = tmp_path_factory.mktemp("spm") / "spm.model"
    return Tokenizer.train(train.src[:5000] + train.tgt[:5000], path, vocab_size=2000)


def test_special_ids_are_fixed(tokenizer):
    sp = tokenizer.sp
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert tokenizer.vocab_size == 2000


@pytest.mark.parametrize(
    "text",
    [
        "A man in an orange hat starring at something.",
        "Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt.",
        "Ünïcödé, Œuvre, Straße, 漢字 and 🙂 are outside the training data",
        "",
    ],
)
def test_decoding_restores_normalized_text(tokenizer, text):
    ids = tokenizer.encode([text])[0]
    assert UNK_ID not in ids
    assert tokenizer.decode([ids]) == [text]


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("a  b", "a b"),  # whitespace collapsed
        ("  trailing and leading \t", "trailing and leading"),  # and trimmed
        ("line\nbreak\ttab\u00a0nbsp\u3000ideographic", "line break tab nbsp ideographic"),
        ("ＦＵＬＬＷＩＤＴＨ ﬁ ½", "FULLWIDTH fi 1⁄2"),  # NFKC compatibility forms
        ("cafe\u0301", "café"),  # combining mark composed (NFC part of NFKC)
        ("zero\u200bwidth\ufeff soft\u00adhyphen", "zerowidth softhyphen"),  # invisible format chars dropped
        ("bell\x07 nul\x00 escape\x1b", "bell nul escape"),  # control characters dropped
    ],
)
def test_source_text_is_normalized_inside_the_model(tokenizer, text, normalized):
    assert tokenizer.normalize(text) == normalized
    assert tokenizer.encode([text]) == tokenizer.encode([normalized])
    assert tokenizer.decode(tokenizer.encode([text])) == [normalized]


@pytest.mark.parametrize("text", ["\u200b", "\ufeff", "\x00", "   ", "\u200b\ufeff\x00 \t\u2060"])
def test_text_of_only_invisible_characters_is_blank(tokenizer, text):
    assert tokenizer.normalize(text) == ""
    assert tokenizer.encode([text]) == [[]]


def test_the_rules_travel_in_the_model_file(tokenizer, tmp_path):
    """A plain SentencePieceProcessor (what the server loads) applies the same normalization."""
    import sentencepiece as spm

    plain = spm.SentencePieceProcessor(model_file=str(tokenizer.path))
    assert plain.encode("a  b\u200b ﬁ") == tokenizer.encode(["a b fi"])[0]


def test_load_refuses_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match=f"tokenizer model not found: {tmp_path / 'x.model'}"):
        Tokenizer.load(tmp_path / "x.model")
