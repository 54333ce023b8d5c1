"""A search result and its length penalty: shared by the engine, the torch reference search and the bench.

Torch- and onnxruntime-free, so training/search.py can import it with only the `train` extra.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hypothesis:
    tokens: list[int]  # without EOS
    score: float  # sum of token log-probabilities, EOS included
    normalized_score: float  # score / length penalty (equals score for greedy)


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's ((5 + length) / 6) ** alpha."""
    return ((5.0 + length) / 6.0) ** alpha
