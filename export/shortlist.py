"""The vocabulary shortlist of a bundle, built at export from the training corpus (engine/shortlist.py reads it).

For every source id s, the PER_SOURCE target ids t with the highest p(t | s) = (sentence pairs
where both occur) / (sentences where s occurs), leaving out the FREQUENT most frequent target ids,
which are always scored anyway. Both sides are tokenized with the bundle's (joint) SentencePiece
model. The corpus: the files given (ExportOptions.shortlist_corpus), else Multi30k's train split
for the checkpoint's languages from the data directory; without either there is no shortlist
and the manifest says why.

Choosing the sizes (models/default, tiny preset, joint vocabulary 8000, of which 5300 ids ever
occur on the target side of the training data; torch search restricted to the shortlist, union
per batch of 32 sorted sentences as the engine forms them, or per sentence; sacreBLEU cased):

    | per source | frequent | V' at b=1 / b=8 / b=32 | greedy 2016 / 2017 | beam 5, lp 1.4: 2016 / 2017 |
    |------------|----------|------------------------|--------------------|-----------------------------|
    | full vocabulary      |    8000                | 38.49 / 29.10      | 39.81 / 30.54               |
    | 20         | 300      |  488 / 1016 / 1817     | 38.45 / 29.37      | 39.67 / 30.48               |
    | 20, b=1    | 300      |                        | 38.34 / 29.50      | 39.69 / 30.89               |
    | 10         | 100      |  197 /  ~600 / 1022    | 38.34 / 28.97 (b=1)| 39.19 / 30.55               |

20 / 300 stays within 0.3 BLEU of the full vocabulary on both sets (the int8 variant's allowed
loss, export/validate.py), 10 / 100 loses 0.6 on test_2016: 20 / 300 is the default. About 84%
of the greedy outputs of test_2016 use only shortlisted pieces for their own sentence; the rest
mostly differ by a rare compound piece ('gebiet', 'landschaft') that the model spells with
other pieces. Also tried: attaching each target id to its 1-2 best source ids by Dice
coefficient (no gain in coverage: +0.1%), ranking by p(t|s)·PMI (larger lists, same coverage).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nmt.engine import shortlist as engine_shortlist
from nmt.engine.bundle import SHORTLIST
from nmt.engine.shortlist import Shortlist
from nmt.training.data import MULTI30K_SPLITS, multi30k, read_parallel
from nmt.training.tokenizer import Tokenizer

PER_SOURCE = 20
FREQUENT = 300


@dataclass(frozen=True)
class ShortlistOptions:
    per_source: int = PER_SOURCE
    frequent: int = FREQUENT

    def __post_init__(self) -> None:
        for name in ("per_source", "frequent"):
            if getattr(self, name) < 0:
                raise ValueError(f"shortlist {name} must be >= 0, got {getattr(self, name)}")


def build(
    sources: list[list[int]], targets: list[list[int]], vocab_size: int, options: ShortlistOptions = ShortlistOptions()
) -> Shortlist:
    """The table from token-id sentence pairs (see the module docstring)."""
    src_sets = [np.unique(np.asarray(s, dtype=np.int64)) for s in sources]
    tgt_sets = [np.unique(np.asarray(t, dtype=np.int64)) for t in targets]
    pairs = np.concatenate(
        [np.add.outer(s * vocab_size, t).ravel() for s, t in zip(src_sets, tgt_sets)] or [np.zeros(0, np.int64)]
    )
    keys, together = np.unique(pairs, return_counts=True)  # (s, t) -> sentence pairs with both
    s, t = keys // vocab_size, keys % vocab_size
    src_count = np.bincount(np.concatenate(src_sets or [np.zeros(0, np.int64)]), minlength=vocab_size)
    tgt_count = np.bincount(
        np.concatenate([np.asarray(x, np.int64) for x in targets] or [np.zeros(0, np.int64)]), minlength=vocab_size
    )
    frequent = np.argsort(-tgt_count, kind="stable")[: options.frequent]
    frequent = np.sort(frequent[tgt_count[frequent] > 0])
    rare = ~np.isin(t, frequent)
    s, t, p = s[rare], t[rare], together[rare] / np.maximum(src_count[s[rare]], 1)
    order = np.lexsort((t, -p, s))  # by source, then best p(t|s), ties by id
    s, t = s[order], t[order]
    rank = np.arange(len(s)) - np.searchsorted(s, s)  # position within the source's run
    s, t = s[rank < options.per_source], t[rank < options.per_source]
    offsets = np.searchsorted(s, np.arange(vocab_size + 1)).astype(np.int32)
    return Shortlist(offsets, t.astype(np.int32), frequent.astype(np.int32))


def training_corpus(
    src_lang: str, tgt_lang: str, corpus: tuple[str, str] | None, data_dir: str | Path | None
) -> tuple[str, list[str], list[str]] | None:
    """(description, source lines, target lines) of the shortlist's corpus, or None when there is none."""
    if corpus is not None:
        found = read_parallel(*corpus)
        return f"{corpus[0]} + {corpus[1]}", list(found.src), list(found.tgt)
    data_dir = data_dir or os.environ.get("NMT_DATA_DIR")
    langs = MULTI30K_SPLITS["train"]
    if not data_dir or src_lang not in langs or tgt_lang not in langs:
        return None
    found = multi30k("train", src_lang, tgt_lang, data_dir)
    return "multi30k train", list(found.src), list(found.tgt)


def write(
    directory: Path,
    tokenizer: Tokenizer,
    vocab_size: int,
    src_lang: str,
    tgt_lang: str,
    corpus: tuple[str, str] | None,
    data_dir: str | Path | None,
    options: ShortlistOptions = ShortlistOptions(),
) -> dict[str, Any]:
    """Build shortlist.npz into `directory`; returns manifest["shortlist"] (the reason, when skipped)."""
    found = training_corpus(src_lang, tgt_lang, corpus, data_dir)
    if found is None:
        return {"skipped": "no training corpus (give --shortlist-corpus SRC TGT, or a Multi30k --data-dir)"}
    name, src_lines, tgt_lines = found
    table = build(tokenizer.encode(src_lines), tokenizer.encode(tgt_lines), vocab_size, options)
    engine_shortlist.save(directory / SHORTLIST, table)
    return {
        "file": SHORTLIST,
        "corpus": name,
        "sentence_pairs": len(src_lines),
        "per_source": options.per_source,
        "frequent": len(table.frequent),
    }
