"""Token-id examples for training: encoding, length filtering and padded tensors per batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import ParallelCorpus
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer


@dataclass(frozen=True)
class Examples:
    src: list[list[int]]  # source tokens + EOS
    tgt: list[list[int]]  # target tokens (without BOS/EOS)
    dropped: int  # pairs left out for being longer than max_len

    def __len__(self) -> int:
        return len(self.src)

    @property
    def src_lengths(self) -> list[int]:
        return [len(s) for s in self.src]

    @property
    def tgt_lengths(self) -> list[int]:
        return [len(t) + 1 for t in self.tgt]  # decoder input and output are one longer


def encode_corpus(corpus: ParallelCorpus, tokenizer: Tokenizer, max_len: int) -> Examples:
    src_ids, tgt_ids = tokenizer.encode(corpus.src), tokenizer.encode(corpus.tgt)
    src, tgt, dropped = [], [], 0
    for s, t in zip(src_ids, tgt_ids):
        if len(s) + 1 > max_len or len(t) + 1 > max_len:
            dropped += 1
            continue
        src.append(s + [EOS_ID])
        tgt.append(t)
    return Examples(src, tgt, dropped)


def _pad(seqs: list[list[int]]) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [PAD_ID] * (width - len(s)) for s in seqs], dtype=torch.long)


@dataclass(frozen=True)
class Batch:
    src: torch.Tensor  # (B, S)
    src_mask: torch.Tensor  # (B, S) bool, True for real tokens
    tgt_in: torch.Tensor  # (B, T): BOS + target
    tgt_out: torch.Tensor  # (B, T): target + EOS
    n_tokens: int  # real target tokens (the loss's denominator)

    def to(self, device: torch.device | str) -> Batch:
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.src), move(self.src_mask), move(self.tgt_in), move(self.tgt_out), self.n_tokens)


def make_batch(examples: Examples, indices: list[int]) -> Batch:
    src = _pad([examples.src[i] for i in indices])
    tgt_in = _pad([[BOS_ID] + examples.tgt[i] for i in indices])
    tgt_out = _pad([examples.tgt[i] + [EOS_ID] for i in indices])
    return Batch(src, src != PAD_ID, tgt_in, tgt_out, int((tgt_out != PAD_ID).sum()))
