"""SentencePiece tokenizer: one joint vocabulary for source and target, fixed special ids.

Normalization is the identity and unknown characters fall back to bytes, so `decode(encode(s))`
restores `s` exactly (no NFKC folding, no whitespace squeezing, no <unk>).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_FILENAME = "spm.model"


class Tokenizer:
    def __init__(self, processor: spm.SentencePieceProcessor):
        self.sp = processor
        ids = (processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id())
        if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(f"tokenizer special ids are {ids}, expected {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"tokenizer model not found: {path}")
        return cls(spm.SentencePieceProcessor(model_file=str(path)))

    @classmethod
    def train(cls, sentences: Iterable[str], out_path: str | Path, vocab_size: int = 8000) -> Tokenizer:
        """Train on `sentences` (both languages for a joint vocabulary) and write the model file."""
        out_path = Path(out_path)
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="unigram",
            character_coverage=1.0,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            num_threads=2,
            minloglevel=2,
        )
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_bytes(model.getvalue())
        return cls.load(out_path)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, out_type=int)

    def decode(self, ids: list[list[int]]) -> list[str]:
        return self.sp.decode(ids)

    def pieces(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)
