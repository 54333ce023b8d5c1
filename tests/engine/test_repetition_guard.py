"""The repetition guard: no n-gram of up to MAX_REPEAT_NGRAM tokens 4 times in a row, in the engine
and in the torch reference alike (the tiny random model loops often, so the guard fires here)."""

from __future__ import annotations

import numpy as np
import pytest

from nmt.engine.decoding import DecodeOptions
from nmt.engine.hypothesis import MAX_REPEAT_NGRAM, MAX_REPEATS, blocked_matrix, blocked_tokens
from nmt.training.search import beam_search, greedy_search


def longest_run(tokens: list[int]) -> int:
    """The most consecutive copies of any n-gram (n <= MAX_REPEAT_NGRAM) in `tokens`."""
    best = 1
    for n in range(1, MAX_REPEAT_NGRAM + 1):
        for start in range(len(tokens)):
            copies = 1
            while tokens[start + copies * n : start + (copies + 1) * n] == tokens[start : start + n] and start + (
                copies + 1
            ) * n <= len(tokens):
                copies += 1
            best = max(best, copies)
    return best


@pytest.mark.parametrize(
    "prefix, blocked",
    [
        ([], []),
        ([5, 5], []),
        ([5, 5, 5], [5]),
        ([1, 2, 1, 2, 1, 2], []),
        ([1, 2, 1, 2, 1, 2, 1], [2]),
        ([9, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2], [3]),
        ([7, 5, 5, 5], [5]),
        ([5, 5, 5, 6], []),
    ],
)
def test_blocked_tokens(prefix: list[int], blocked: list[int]) -> None:
    assert blocked_tokens(prefix) == blocked


def test_the_vectorized_guard_agrees_with_the_reference_rule() -> None:
    rng = np.random.default_rng(0)
    for _ in range(2000):
        history = rng.integers(0, 3, size=(4, int(rng.integers(0, 30))))
        found = blocked_matrix(history)
        for row in range(4):
            got = set() if found is None else {int(t) for t in found[row] if t >= 0}
            assert got == set(blocked_tokens(history[row].tolist()))


def test_no_output_repeats_an_ngram_four_times_and_the_engine_equals_torch(decoder, torch_model, sources) -> None:
    greedy = decoder.search(sources, DecodeOptions(beam_size=1, max_len_extra=40)).hypotheses
    beam = decoder.search(sources, DecodeOptions(beam_size=4, n_best=4, max_len_extra=40)).hypotheses
    outputs = [h.tokens for hyps in greedy + beam for h in hyps]
    assert max(longest_run(t) for t in outputs) == MAX_REPEATS - 1  # the guard fired, and held
    assert [h.tokens for h in greedy_search(torch_model, sources, 40)] == [hyps[0].tokens for hyps in greedy]
    reference = beam_search(torch_model, sources, beam_size=4, alpha=0.6, n_best=4, max_len_extra=40)
    assert [[h.tokens for h in hyps] for hyps in reference] == [[h.tokens for h in hyps] for hyps in beam]


def test_without_the_guard_the_model_loops_and_both_searches_still_agree(decoder, torch_model, sources) -> None:
    """The switch nmt-bench decode uses against CTranslate2 (which has no such rule)."""
    off = decoder.search(sources, DecodeOptions(beam_size=1, max_len_extra=40, repetition_guard=False)).hypotheses
    assert max(longest_run(hyps[0].tokens) for hyps in off) >= MAX_REPEATS
    reference = greedy_search(torch_model, sources, 40, repetition_guard=False)
    assert [h.tokens for h in reference] == [hyps[0].tokens for hyps in off]
