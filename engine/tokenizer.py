"""The bundle's SentencePiece model: fixed special ids, text <-> ids (training's Tokenizer extends it).

Source text is normalized inside the SentencePiece model itself (training/tokenizer.py writes the
rules into spm.model), so training, export parity and the server see the same text. NUL is the one
character that table cannot hold (its keys are C strings): it is dropped here before the model
sees the text. A text that normalizes to nothing encodes to no tokens: it is blank.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_FILENAME = "spm.model"


class SentencePiece:
    def __init__(self, processor: spm.SentencePieceProcessor, path: Path | None = None):
        self.sp, self.path = processor, path
        ids = (processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id())
        if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            name = path.name if path else "tokenizer"
            raise ValueError(f"{name}: special ids are {ids}, expected {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}")

    @classmethod
    def load(cls, path: str | Path) -> SentencePiece:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"tokenizer model not found: {path}")
        return cls(spm.SentencePieceProcessor(model_file=str(path)), path)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode([t.replace("\0", "") for t in texts], out_type=int)

    def decode(self, ids: list[list[int]]) -> list[str]:
        return self.sp.decode(ids)

    def normalize(self, text: str) -> str:
        """The text as the model sees it ("" for a blank text)."""
        return self.sp.normalize(text.replace("\0", "")).replace("\u2581", " ").strip()

    def pieces(self, text: str) -> list[str]:
        return self.sp.encode(text.replace("\0", ""), out_type=str)
