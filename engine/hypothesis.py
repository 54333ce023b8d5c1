"""A search result and its length penalty: shared by the engine, the torch reference search and the bench.

Torch- and onnxruntime-free (numpy only), so training/search.py can import it with only the `train` extra.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Hypothesis:
    tokens: list[int]  # without EOS
    score: float  # sum of token log-probabilities, EOS included
    normalized_score: float  # score / length penalty (equals score for greedy)


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's ((5 + length) / 6) ** alpha."""
    return ((5.0 + length) / 6.0) ** alpha


# Repetition guard, part of the search rules of the engine and of the torch reference alike: no
# n-gram of up to MAX_REPEAT_NGRAM tokens may occur MAX_REPEATS times in a row. Degenerate loops
# ("bahnbahnbahnbahn") are what a small model produces on input unlike its training data;
# fluent text never repeats a phrase four times back to back.
MAX_REPEATS = 4
MAX_REPEAT_NGRAM = 6


def blocked_tokens(prefix: list[int]) -> list[int]:
    """The tokens that would complete an n-gram's MAX_REPEATS-th consecutive copy after `prefix`."""
    length = len(prefix)
    if length < MAX_REPEATS - 1 or prefix[-1] not in prefix[-1 - MAX_REPEAT_NGRAM : -1]:
        return []  # the common case, decided in C: the last token has no copy n <= MAX_REPEAT_NGRAM back
    blocked: list[int] = []
    for n in range(1, MAX_REPEAT_NGRAM + 1):
        window = MAX_REPEATS * n - 1  # MAX_REPEATS - 1 copies, then n - 1 tokens of the next one
        if window > length:
            break
        if prefix[-1] == prefix[-1 - n] and prefix[length - window + n :] == prefix[length - window : length - n]:
            token = prefix[length - n]
            if token not in blocked:
                blocked.append(token)
    return blocked


def blocked_matrix(history: np.ndarray) -> np.ndarray | None:
    """blocked_tokens for every row of `history` (R, L) at once: (R, MAX_REPEAT_NGRAM) token ids, -1
    for none; None when no row has any (the common case, decided by one comparison)."""
    rows, length = history.shape
    if length < MAX_REPEATS - 1 or not (history[:, -1:] == history[:, -1 - MAX_REPEAT_NGRAM : -1]).any():
        return None
    blocked = np.full((rows, MAX_REPEAT_NGRAM), -1, dtype=np.int64)
    for n in range(1, MAX_REPEAT_NGRAM + 1):
        window = MAX_REPEATS * n - 1
        if window > length:
            break
        tail = history[:, length - window :]
        periodic = (tail[:, n:] == tail[:, :-n]).all(axis=1)
        blocked[periodic, n - 1] = tail[periodic, window - n]
    return blocked if (blocked >= 0).any() else None


def mask_blocked(values: np.ndarray, ids: np.ndarray, blocked: np.ndarray) -> None:
    """Each row's candidates (R, k), best first: blocked ids get -inf and sink to the end (in place)."""
    hit = (ids[:, :, None] == blocked[:, None, :]).any(axis=2)
    if hit.any():
        values[hit] = -np.inf
        order = np.argsort(-values, axis=1, kind="stable")
        values[:] = np.take_along_axis(values, order, axis=1)
        ids[:] = np.take_along_axis(ids, order, axis=1)
