"""The numpy search over ORT sessions against training/search.py (the torch reference)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nmt.engine.cache import CudaCache, HostCache, compact
from nmt.engine.decoding import DecodeOptions, Decoder, Hypothesis, length_penalty
from nmt.training.search import beam_search, greedy_search

TOLERANCE = 1e-4  # scores: fp32 ORT vs torch
ROOT = Path(__file__).resolve().parents[2]


def assert_same(expected: list[list], got: list[list[Hypothesis]]) -> None:
    assert len(expected) == len(got)
    for i, (exp, hyps) in enumerate(zip(expected, got)):
        assert [h.tokens for h in hyps] == [h.tokens for h in exp], f"source {i}"
        for e, g in zip(exp, hyps):
            assert g.score == pytest.approx(e.score, abs=TOLERANCE), f"source {i}"
            assert g.normalized_score == pytest.approx(e.normalized_score, abs=TOLERANCE), f"source {i}"


def test_the_tiny_model_stops_at_varied_lengths(decoder, sources):
    """Guards the fixture: the tests below need hypotheses that end before the limit, and some that do not."""
    found = decoder.search(sources, DecodeOptions(beam_size=4, n_best=4, max_len_extra=8)).hypotheses
    lengths = {len(h.tokens) for hyps in found for h in hyps}
    at_limit = sum(len(hyps[0].tokens) + 1 == len(s) + 8 for s, hyps in zip(sources, found))
    assert len(lengths) >= 5 and 0 < at_limit < len(sources)


def test_greedy_equals_the_torch_reference(decoder, torch_model, sources):
    expected = [[h] for h in greedy_search(torch_model, sources, max_len_extra=8)]
    result = decoder.search(sources, DecodeOptions(beam_size=1, max_len_extra=8))
    assert_same(expected, result.hypotheses)
    assert result.steps > 0 and result.encode_seconds >= 0 and result.decode_seconds > 0


@pytest.mark.parametrize(
    ("beam", "alpha", "n_best", "extra"),
    [
        (4, 0.6, 4, 8),
        (4, 0.0, 2, 8),
        (4, 1.5, 3, 8),
        (4, 1.0, 4, 3),
        (2, 0.6, 2, 8),
        (1, 0.6, 1, 8),
    ],
)
def test_beam_equals_the_torch_reference(decoder, torch_model, sources, beam, alpha, n_best, extra):
    options = DecodeOptions(beam_size=beam, length_penalty=alpha, max_len_extra=extra, n_best=n_best)
    if beam == 1:  # DecodeOptions: beam 1 is greedy
        expected = [[h] for h in greedy_search(torch_model, sources, max_len_extra=extra)]
    else:
        expected = beam_search(torch_model, sources, beam, alpha, n_best, extra)
    assert_same(expected, decoder.search(sources, options).hypotheses)


def test_beam_hypotheses_are_ranked_by_the_gnmt_penalty(decoder, sources):
    found = decoder.search(sources, DecodeOptions(beam_size=4, length_penalty=1.0, n_best=4, max_len_extra=8))
    for hyps in found.hypotheses:
        assert len(hyps) == 4
        norms = [h.normalized_score for h in hyps]
        assert norms == sorted(norms, reverse=True)
        for h in hyps:
            assert h.normalized_score == pytest.approx(h.score / length_penalty(len(h.tokens) + 1, 1.0), rel=1e-6)


@pytest.mark.parametrize("beam", [1, 4])
def test_a_sentence_alone_equals_it_in_a_batch(decoder, sources, beam):
    options = DecodeOptions(beam_size=beam, n_best=beam, max_len_extra=8)
    batched = decoder.search(sources, options).hypotheses
    for source, hyps in zip(sources, batched):
        alone = decoder.search([source], options).hypotheses[0]
        assert [h.tokens for h in alone] == [h.tokens for h in hyps]
        assert [h.score for h in alone] == pytest.approx([h.score for h in hyps], abs=TOLERANCE)


@pytest.mark.parametrize("beam", [1, 3])
def test_input_order_is_preserved_across_sorting_and_sub_batches(sessions, decoder, sources, beam):
    options = DecodeOptions(beam_size=beam, max_len_extra=6)
    expected = [hyps[0].tokens for hyps in decoder.search(sources, options).hypotheses]
    permutation = np.random.default_rng(0).permutation(len(sources)).tolist()
    shuffled = decoder.search([sources[i] for i in permutation], options).hypotheses
    assert [hyps[0].tokens for hyps in shuffled] == [expected[i] for i in permutation]
    small = Decoder(sessions, max_batch_rows=3 * beam)  # 3 sentences per sub-batch
    assert [hyps[0].tokens for hyps in small.search(sources, options).hypotheses] == expected


def test_empty_inputs(decoder, torch_model):
    assert decoder.search([], DecodeOptions()).hypotheses == []
    expected = beam_search(torch_model, [[]], 4, 0.6, 2, 3)
    assert_same(expected, decoder.search([[]], DecodeOptions(n_best=2, max_len_extra=3)).hypotheses)
    # Limit 1: only EOS is possible. The reference would loop for ever here; we stop.
    only_eos = decoder.search([[]], DecodeOptions(beam_size=4, n_best=2, max_len_extra=1)).hypotheses[0]
    assert [h.tokens for h in only_eos] == [[]]
    assert decoder.search([[]], DecodeOptions(beam_size=1, max_len_extra=1)).hypotheses[0][0].tokens == []


def test_hypotheses_respect_the_length_limit(decoder, sources):
    for beam in (1, 4):
        found = decoder.search(sources, DecodeOptions(beam_size=beam, n_best=beam, max_len_extra=2)).hypotheses
        for source, hyps in zip(sources, found):
            assert all(len(h.tokens) + 1 <= len(source) + 2 for h in hyps)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beam_size": 0}, "beam_size must be at least 1, got 0"),
        ({"beam_size": 2, "n_best": 3}, r"n_best must be between 1 and beam_size \(2\), got 3"),
        ({"n_best": 0}, r"n_best must be between 1 and beam_size \(4\), got 0"),
        ({"length_penalty": -0.1}, "length_penalty must be a finite number between 0 and 10, got -0.1"),
        ({"length_penalty": 1e4}, "length_penalty must be a finite number between 0 and 10, got 10000.0"),
        ({"length_penalty": float("nan")}, "length_penalty must be a finite number between 0 and 10, got nan"),
        ({"max_len_extra": 0}, "max_len_extra must be at least 1, got 0"),
    ],
)
def test_decode_options_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        DecodeOptions(**kwargs)


def test_bad_sources_are_refused(decoder, sessions):
    with pytest.raises(ValueError, match=r"^source 1 has a token id outside the vocabulary \(0\.\.599\)$"):
        decoder.search([[5], [5, 600]], DecodeOptions())
    with pytest.raises(ValueError, match=r"^source 0 is too long: 1000 tokens \+ max_len_extra 50 exceeds"):
        decoder.search([[5] * 1000], DecodeOptions())
    with pytest.raises(ValueError, match="max_batch_rows must be at least 1, got 0"):
        Decoder(sessions, max_batch_rows=0)


class _BoundOnCpu(CudaCache):
    DEVICE = "cpu"


@pytest.mark.parametrize("beam", [1, 4])
def test_the_io_binding_path_decodes_like_the_host_path(sessions, decoder, sources, beam):
    """The CUDA cache's logic (bound OrtValues fed back, host round trip on row changes), run on the CPU,
    against the host path over the same (traced) decoder graph."""
    bound, host = Decoder(sessions), Decoder(sessions)
    bound._cache, host._cache = _BoundOnCpu, HostCache
    options = DecodeOptions(beam_size=beam, n_best=beam, max_len_extra=8)
    expected = host.search(sources, options).hypotheses
    got = bound.search(sources, options).hypotheses
    assert [[h.tokens for h in hs] for hs in got] == [[h.tokens for h in hs] for hs in expected]
    assert [[h.score for h in hs] for hs in got] == [[h.score for h in hs] for hs in expected]


def test_compact_equals_fancy_indexing():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 30))
        array = rng.standard_normal((n, 2, 3)).astype(np.float32)
        rows = np.sort(rng.choice(n, int(rng.integers(1, n + 1)), replace=False))
        expected = array[rows].copy()
        got = compact(array, rows)
        assert np.array_equal(got, expected) and got.flags.c_contiguous


def test_server_and_engine_import_neither_torch_nor_training_nor_export():
    code = (
        "import sys, nmt.server.main, nmt.server.translate, nmt.engine.translator; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'torch' "
        "or m.startswith(('nmt.training', 'nmt.export'))); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
