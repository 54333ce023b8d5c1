"""engine/marian_tokenizer.py against transformers' MarianTokenizer on the models of marian_fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from marian_fixtures import MarianSpec, make_and_import, sentences, translate_words

from nmt.engine.marian_tokenizer import MarianTokenizer

transformers = pytest.importorskip("transformers")  # a dev dependency: installed by `make test`
SPECS = {
    "shared": MarianSpec(steps=1),
    "separate": MarianSpec(steps=1, shared=False),
    "multilingual": MarianSpec(steps=1, multilingual=True),
}


@pytest.fixture(scope="module", params=list(SPECS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    return request.param, *make_and_import(tmp_path_factory.mktemp(request.param), SPECS[request.param])


def ours(directory: Path) -> MarianTokenizer:
    config = json.loads((directory / "config.json").read_text())
    return MarianTokenizer(directory, config["tokenizer"], config["special_ids"])


def texts(name: str) -> list[str]:
    plain = sentences(30, seed=5) + ["a zebra unknownword runs", "Man, DOG!", "  spaced   out  ", ""]
    return [f">>{'fra' if i % 2 else 'deu'}<< {t}" for i, t in enumerate(plain)] if name == "multilingual" else plain


def test_encode_matches_transformers(pair: tuple[str, Path, Path]) -> None:
    name, source, imported = pair
    reference, tokenizer = transformers.MarianTokenizer.from_pretrained(source), ours(imported)
    for text in texts(name):
        assert tokenizer.encode([text])[0] + [tokenizer.eos] == reference(text)["input_ids"], text
    assert tokenizer.languages == (["deu", "fra"] if name == "multilingual" else [])


def test_decode_matches_transformers(pair: tuple[str, Path, Path]) -> None:
    name, source, imported = pair
    reference, tokenizer = transformers.MarianTokenizer.from_pretrained(source), ours(imported)
    targets = [translate_words(t) for t in sentences(30, seed=6)]
    rows = [reference(text_target=t)["input_ids"] for t in targets]
    rows.append([tokenizer.unk, *rows[0][:3], tokenizer.pad])  # special ids are left out
    assert tokenizer.decode(rows) == reference.batch_decode(rows, skip_special_tokens=True)
