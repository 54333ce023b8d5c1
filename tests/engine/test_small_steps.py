"""Decoder steps of few rows run on a second, single-threaded session (RuntimeConfig.single_thread_rows)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nmt.engine.decoding import DecodeOptions, Decoder
from nmt.engine.runtime import SINGLE_THREAD_ROWS, STEP_SINGLE_THREAD_ROWS, RuntimeConfig, load_sessions


def test_a_multi_threaded_runtime_opens_a_single_threaded_decoder_for_small_steps(server_bundle: Path) -> None:
    sessions = load_sessions(server_bundle, RuntimeConfig(intra_op_threads=2, step_decoder=False))
    assert sessions.decoder_small is not None and sessions.single_thread_rows == SINGLE_THREAD_ROWS == 64
    assert sessions.decoder_for(64) is sessions.decoder_small and sessions.decoder_for(65) is sessions.decoder
    # the step decoder's own twin and threshold (fewer nodes: two threads paid off at 16 rows, not at 8); the traced
    # decoder then runs no steps, so it has no twin, nor is the per-row decoder opened unless asked for
    stepped = load_sessions(server_bundle, RuntimeConfig(intra_op_threads=2))
    assert stepped.step_small is not None and stepped.step_single_thread_rows == STEP_SINGLE_THREAD_ROWS == 8
    assert stepped.decoder_small is None and stepped.rows is None
    running = load_sessions(server_bundle, RuntimeConfig(intra_op_threads=2, per_row_decoder=True))
    assert running.rows is not None and running.rows_small is not None and running.decoder_small is None
    for cfg in (RuntimeConfig(intra_op_threads=1), RuntimeConfig(intra_op_threads=2, single_thread_rows=0)):
        alone = load_sessions(server_bundle, cfg)
        assert alone.decoder_small is None and alone.decoder_for(1) is alone.decoder


@pytest.mark.parametrize("beam", [1, 4])
def test_switching_sessions_mid_search_changes_nothing(server_bundle: Path, sources, beam: int) -> None:
    """12 sentences x 4 beams start on the 2-thread session and end on the 1-thread one."""
    options = DecodeOptions(beam_size=beam, n_best=beam, max_len_extra=8)
    found = {}
    for rows in (0, 16):
        sessions = load_sessions(
            server_bundle, RuntimeConfig(intra_op_threads=2, single_thread_rows=rows, step_single_thread_rows=rows)
        )
        found[rows] = Decoder(sessions).search(sources, options).hypotheses
    assert [[h.tokens for h in hs] for hs in found[16]] == [[h.tokens for h in hs] for hs in found[0]]
    scores = {rows: [h.score for hs in found[rows] for h in hs] for rows in found}
    assert scores[16] == pytest.approx(scores[0], abs=1e-5)


def test_a_negative_threshold_is_refused() -> None:
    with pytest.raises(ValueError, match="^single_thread_rows must be >= 0, got -1$"):
        RuntimeConfig(single_thread_rows=-1)
    with pytest.raises(ValueError, match="^step_single_thread_rows must be >= 0, got -2$"):
        RuntimeConfig(step_single_thread_rows=-2)
