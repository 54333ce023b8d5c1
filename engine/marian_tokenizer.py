"""An imported Marian model's tokenizer, as transformers' MarianTokenizer does it, without transformers.

Source text through source.spm, pieces to ids through vocab.json (`<unk>` for a piece it lacks); a
multilingual model's target language is a leading `>>xxx<<` token, its own id. Output ids to pieces
through the target vocabulary (target_vocab.json, or vocab.json when shared), text through
target.spm; `</s>`, `<pad>` and `<unk>` are left out (MarianTokenizer's skip_special_tokens). The
engine appends `</s>` to a source itself, as for our own models, so `encode` returns none.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import sentencepiece as spm

LANGUAGE_CODE = re.compile(r">>.+<<")  # MarianTokenizer's: a greedy match, removed wherever it is


def target_languages(vocab: dict[str, int]) -> list[str]:
    """The languages a multilingual model's >>xxx<< tokens name (none for a model of one pair)."""
    return sorted(piece[2:-2] for piece in vocab if LANGUAGE_CODE.fullmatch(piece))


class MarianTokenizer:
    def __init__(self, directory: Path, files: dict[str, str], special_ids: dict[str, int]):
        def processor(name: str) -> spm.SentencePieceProcessor:
            path = directory / files[name]
            if not path.is_file():
                raise ValueError(f"tokenizer file not found: {path}")
            return spm.SentencePieceProcessor(model_file=str(path))

        self.source, self.target = processor("source"), processor("target")
        self.vocab = self._read_vocab(directory / files["vocab"])
        target_vocab = (
            self.vocab
            if files["target_vocab"] == files["vocab"]
            else self._read_vocab(directory / files["target_vocab"])
        )
        self.pieces_of = {i: piece for piece, i in target_vocab.items()}
        self.unk, self.eos, self.pad = special_ids["unk"], special_ids["eos"], special_ids["pad"]
        self.skipped = {self.unk, self.eos, self.pad}
        self.languages = target_languages(self.vocab)

    @staticmethod
    def _read_vocab(path: Path) -> dict[str, int]:
        if not path.is_file():
            raise ValueError(f"tokenizer file not found: {path}")
        return json.loads(path.read_text())

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [self._encode(text.replace("\0", "")) for text in texts]

    def _encode(self, text: str) -> list[int]:
        code = LANGUAGE_CODE.match(text)
        prefix = [self.vocab.get(code.group(0), self.unk)] if code else []
        pieces = self.source.encode(LANGUAGE_CODE.sub("", text), out_type=str)
        return prefix + [self.vocab.get(piece, self.unk) for piece in pieces]

    def decode(self, ids: list[list[int]]) -> list[str]:
        return [
            self.target.decode_pieces([self.pieces_of[i] for i in row if i not in self.skipped]).strip() for row in ids
        ]

    def normalize(self, text: str) -> str:
        """The text as the model sees it ("" for a blank text)."""
        return self.source.normalize(text.replace("\0", "")).replace("\u2581", " ").strip()

    def pieces(self, text: str) -> list[str]:
        return self.source.encode(text.replace("\0", ""), out_type=str)
