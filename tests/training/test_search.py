from __future__ import annotations

import pytest
import torch

from nmt.training.model import ModelConfig, Transformer
from nmt.training.search import beam_search, greedy_search, length_penalty

SOURCES = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16], [17]]


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(1)
    cfg = ModelConfig(
        vocab_size=40, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2, dropout=0.0
    )
    return Transformer(cfg).eval()


def test_greedy_respects_the_length_limit_and_batching(model):
    batched = greedy_search(model, SOURCES, max_len_extra=3)
    for src, hyp in zip(SOURCES, batched):
        assert len(hyp.tokens) + 1 <= len(src) + 3  # EOS counts
        assert greedy_search(model, [src], max_len_extra=3)[0].tokens == hyp.tokens  # alone = in a batch


def test_beam_of_one_is_greedy(model):
    greedy = greedy_search(model, SOURCES, max_len_extra=6)
    beam = beam_search(model, SOURCES, beam_size=1, alpha=0.0, max_len_extra=6)
    assert [h.tokens for h in greedy] == [b[0].tokens for b in beam]
    for g, b in zip(greedy, beam):
        assert b[0].score == pytest.approx(g.score, abs=1e-4)


def test_beam_returns_sorted_n_best_and_is_batch_independent(model):
    found = beam_search(model, SOURCES, beam_size=4, alpha=0.6, n_best=3, max_len_extra=6)
    for src, hyps in zip(SOURCES, found):
        assert len(hyps) == 3
        scores = [h.normalized_score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        for h in hyps:
            assert h.normalized_score == pytest.approx(h.score / length_penalty(len(h.tokens) + 1, 0.6))
        alone = beam_search(model, [src], beam_size=4, alpha=0.6, n_best=3, max_len_extra=6)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in hyps]


def test_beam_finds_at_least_the_greedy_score(model):
    greedy = greedy_search(model, SOURCES, max_len_extra=6)
    beam = beam_search(model, SOURCES, beam_size=5, alpha=0.0, max_len_extra=6)
    for g, b in zip(greedy, beam):
        assert b[0].score >= g.score - 1e-5


def test_n_best_larger_than_beam_is_refused(model):
    with pytest.raises(ValueError, match=r"n_best must be between 1 and beam_size \(2\), got 3"):
        beam_search(model, SOURCES, beam_size=2, n_best=3)
