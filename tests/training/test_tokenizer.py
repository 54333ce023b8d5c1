from __future__ import annotations

import pytest

from training.data import multi30k
from training.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer


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
        "  double  spaces and trailing ",
        "Ünïcödé, Œuvre, Straße, 漢字 and 🙂 are outside the training data",
        "ＦＵＬＬＷＩＤＴＨ and ligature ﬁ stay as written (no NFKC)",
        "",
    ],
)
def test_decoding_restores_the_exact_text(tokenizer, text):
    ids = tokenizer.encode([text])[0]
    assert UNK_ID not in ids
    assert tokenizer.decode([ids]) == [text]


def test_load_refuses_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match=f"tokenizer model not found: {tmp_path / 'x.model'}"):
        Tokenizer.load(tmp_path / "x.model")
