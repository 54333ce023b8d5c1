"""The vocabulary shortlist: the target ids a batch may produce (Marian's lexical shortlist,
CTranslate2's vocabulary map).

A bundle may carry shortlist.npz (bundle.SHORTLIST; built at export from the training corpus by
export/shortlist.py). For each source id it lists the target ids that co-occur with it most
(by p(target | source) over sentence pairs), plus the most frequent target ids. Per batch the
engine scores only the union of
    the special ids 0..3, the frequent ids, every source token's list, and the source tokens
    themselves (names and numbers pass through the joint vocabulary unchanged),
fed to the decoder as vocab_ids (export/decoder_head.py). Greedy and beam search then choose
among those; a batch's union only grows with its size, so a sentence can translate differently
alone and in a batch (the measured effect on BLEU is in export/shortlist.py).

File format (numpy .npz, no pickles): offsets (V + 1,) int32 and targets (nnz,) int32 -- the
list of source id s is targets[offsets[s]:offsets[s + 1]] -- and frequent (M,) int32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import BundleError
from .tokenizer import EOS_ID

SPECIAL_IDS = EOS_ID + 1  # pad, unk, bos, eos: always scored


@dataclass(frozen=True, eq=False)
class Shortlist:
    offsets: np.ndarray  # (V + 1,) int32
    targets: np.ndarray  # (nnz,) int32
    frequent: np.ndarray  # (M,) int32

    @property
    def vocab_size(self) -> int:
        return len(self.offsets) - 1

    def targets_of(self, source_id: int) -> np.ndarray:
        return self.targets[self.offsets[source_id] : self.offsets[source_id + 1]]

    def vocab_ids(self, sources: list[list[int]]) -> np.ndarray:
        """The ids a batch of sources (ids without EOS) may produce: (V',) int64, ascending."""
        keep = np.zeros(self.vocab_size, dtype=bool)
        keep[:SPECIAL_IDS] = True
        keep[self.frequent] = True
        seen = np.unique(np.fromiter((t for s in sources for t in s), dtype=np.int64))
        keep[seen] = True
        for source_id in seen.tolist():
            keep[self.targets_of(source_id)] = True
        return np.flatnonzero(keep)


def save(path: Path, shortlist: Shortlist) -> None:
    with open(path, "wb") as f:  # np.savez would add ".npz" to a name without it
        np.savez(f, offsets=shortlist.offsets, targets=shortlist.targets, frequent=shortlist.frequent)


def load(path: Path, vocab_size: int) -> Shortlist:
    """Read and check shortlist.npz; BundleError if it does not fit a vocabulary of vocab_size."""
    try:
        with np.load(path, allow_pickle=False) as data:
            found = Shortlist(data["offsets"], data["targets"], data["frequent"])
    except (OSError, ValueError, KeyError) as e:
        raise BundleError(f"{path.name}: not a shortlist file: {e}") from e
    offsets, targets = found.offsets, found.targets
    arrays_ok = all(a.ndim == 1 and a.dtype.kind in "iu" for a in (offsets, targets, found.frequent))
    if not arrays_ok or len(offsets) != vocab_size + 1:
        raise BundleError(f"{path.name}: expected 1-d integer arrays with {vocab_size + 1} offsets")
    ids_ok = all(a.size == 0 or (a.min() >= 0 and a.max() < vocab_size) for a in (targets, found.frequent))
    if offsets[0] != 0 or offsets[-1] != len(targets) or np.any(np.diff(offsets) < 0) or not ids_ok:
        raise BundleError(f"{path.name}: offsets or ids out of range for a vocabulary of {vocab_size}")
    return found
