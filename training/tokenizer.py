"""SentencePiece tokenizer: one joint vocabulary for source and target, fixed special ids.

Source text is normalized inside the SentencePiece model itself (its precompiled normalization
rules travel in spm.model, so training, export parity and the server all see the same text; the
loading, encoding and special ids are the engine's, nmt.engine.tokenizer): Unicode NFKC, every
space-like character and tab/newline to one space, runs of spaces collapsed and the ends trimmed, control and invisible format characters (U+200B, U+FEFF, soft hyphen, ...)
dropped. NUL is the one character SentencePiece's rule table cannot hold (its keys are C strings),
so `encode` drops it before the model sees the text. A text that normalizes to nothing encodes to
no tokens: it is blank. Unknown characters fall back to bytes, so there is no <unk>.
"""

from __future__ import annotations

import io
import tempfile
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from nmt.engine.tokenizer import BOS_ID, EOS_ID, MODEL_FILENAME, PAD_ID, UNK_ID, SentencePiece

__all__ = ["BOS_ID", "EOS_ID", "MODEL_FILENAME", "PAD_ID", "UNK_ID", "Tokenizer", "normalization_rules"]


def _normalize_char(c: str) -> str:
    if c in "\t\n\r" or unicodedata.category(c) in ("Zs", "Zl", "Zp"):
        return " "
    if unicodedata.category(c) in ("Cc", "Cf"):
        return ""
    return "".join(x for x in unicodedata.normalize("NFKC", c) if unicodedata.category(x) not in ("Cc", "Cf"))


def normalization_rules() -> list[tuple[str, str]]:
    """(source, replacement) pairs for SentencePiece's rule table: every assigned code point whose
    normalization differs from itself, and base + combining mark -> the precomposed character
    (NFKC composes; SentencePiece applies a table, longest match first)."""
    rules: list[tuple[str, str]] = []
    for cp in range(1, 0x110000):  # NUL cannot be a key; see the module docstring
        c = chr(cp)
        if 0xD800 <= cp <= 0xDFFF or unicodedata.category(c) == "Cn":
            continue
        target = _normalize_char(c)
        if target != c:
            rules.append((c, target))
        decomposition = unicodedata.decomposition(c)
        if decomposition and not decomposition.startswith("<"):
            parts = "".join(chr(int(x, 16)) for x in decomposition.split())
            if len(parts) == 2 and unicodedata.normalize("NFC", parts) == c:
                rules.append((parts, target))
    return rules


def _write_rules_tsv(path: Path) -> None:
    hexes = lambda s: " ".join(f"{ord(x):X}" for x in s)  # noqa: E731
    path.write_text("".join(f"{hexes(src)}\t{hexes(dst)}\n" for src, dst in normalization_rules()))


class Tokenizer(SentencePiece):
    """The engine's SentencePiece wrapper plus training a model with our normalization rules."""

    @classmethod
    def train(cls, sentences: Iterable[str], out_path: str | Path, vocab_size: int = 8000) -> Tokenizer:
        """Train on `sentences` (both languages for a joint vocabulary) and write the model file."""
        out_path = Path(out_path)
        model = io.BytesIO()
        with tempfile.TemporaryDirectory() as tmp:
            rules = Path(tmp) / "normalization.tsv"
            _write_rules_tsv(rules)
            spm.SentencePieceTrainer.train(
                sentence_iterator=(s.replace("\0", "") for s in sentences),
                model_writer=model,
                vocab_size=vocab_size,
                model_type="unigram",
                character_coverage=1.0,
                byte_fallback=True,
                normalization_rule_tsv=str(rules),
                remove_extra_whitespaces=True,
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                num_threads=2,
                minloglevel=2,
            )
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_bytes(model.getvalue())
        return cls.load(out_path)  # type: ignore[return-value]
