"""engine/continuous.py: sentences joining and leaving a running batch get what they get alone (real ORT sessions)."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
from model_fixtures import ONE_THREAD

from nmt.engine import bundle
from nmt.engine.continuous import NoPastMask, RunningBatch
from nmt.engine.decoding import DecodeOptions, Decoder, Hypothesis
from nmt.engine.runtime import Sessions, load_sessions

TOLERANCE = 1e-4  # scores: the padded attention sums its terms in another order
OPTIONS = [
    DecodeOptions(beam_size=1, max_len_extra=8),
    DecodeOptions(beam_size=4, n_best=4, max_len_extra=8),
    DecodeOptions(beam_size=2, n_best=2, length_penalty=1.0, max_len_extra=5),
    DecodeOptions(beam_size=3, length_penalty=0.0, max_len_extra=3),
]


def assert_same(expected: list[Hypothesis], got: list[Hypothesis], what: object) -> None:
    assert [h.tokens for h in got] == [h.tokens for h in expected], what
    assert [h.score for h in got] == pytest.approx([h.score for h in expected], abs=TOLERANCE), what
    assert [h.normalized_score for h in got] == pytest.approx([h.normalized_score for h in expected], abs=TOLERANCE)


def run_to_end(batch: RunningBatch, schedule: list[list[tuple[int, list[int], DecodeOptions]]]) -> dict:
    """Admit schedule[i] before step i (then keep stepping); the hypotheses by key, checking the cache width."""
    found: dict = {}
    step = 0
    while step < len(schedule) or len(batch):
        batch.admit(schedule[step] if step < len(schedule) else [])
        found.update(batch.step())
        step += 1
        if len(batch):  # slots no row has any more are cut: the cache is as wide as the oldest row is old
            assert batch.past_len == max(s.step for s in batch.sentences)  # per row: the oldest's own
            assert batch.rows == sum(s.options.beam_size for s in batch.sentences)
    return found


@pytest.fixture(scope="module", params=["per-row", "traced"])
def running_sessions(request, server_bundle) -> Sessions:
    """Both caches of a running batch: the per-row step decoder's (engine/row_cache.py) and past_mask's."""
    sessions = load_sessions(server_bundle, replace(ONE_THREAD, step_decoder=request.param == "per-row"))
    assert (sessions.rows is not None) == (request.param == "per-row")
    return sessions


@pytest.fixture(scope="module")
def traced_sessions(server_bundle) -> Sessions:
    return load_sessions(server_bundle, replace(ONE_THREAD, step_decoder=False))


@pytest.mark.parametrize("beam", [1, 4])
def test_a_sentence_joining_a_running_batch_gets_its_answer_alone(running_sessions, decoder, sources, beam):
    options = DecodeOptions(beam_size=beam, n_best=beam, max_len_extra=8)
    schedule = [[(i, source, options)] for i, source in enumerate(sources)]  # one joins at every step
    found = run_to_end(RunningBatch(running_sessions), schedule)
    for i, source in enumerate(sources):
        assert_same(decoder.search([source], options).hypotheses[0], found[i], i)


def test_mixed_options_and_random_arrivals(running_sessions, decoder, sources):
    rng = random.Random(0)
    jobs = [(i, source, OPTIONS[i % len(OPTIONS)]) for i, source in enumerate(sources * 2)]
    schedule = []
    while jobs:
        n = rng.randint(0, 3)
        schedule.append(jobs[:n])
        jobs = jobs[n:]
    found = run_to_end(RunningBatch(running_sessions), schedule)
    for i, source in enumerate(sources * 2):
        options = OPTIONS[i % len(OPTIONS)]
        assert_same(decoder.search([source], options).hypotheses[0], found[i], i)


def test_dropping_a_sentence_mid_decode_frees_its_rows(sessions, decoder, sources):
    beam = DecodeOptions(beam_size=4, n_best=2, max_len_extra=8)
    longest = max(range(len(sources)), key=lambda i: len(sources[i]))
    batch = RunningBatch(sessions)
    batch.admit([("a", sources[0], beam), ("long", sources[longest], beam), ("c", sources[1], DecodeOptions(1))])
    assert batch.rows == 9 and batch.src_len == len(sources[longest]) + 1
    found = dict(batch.step()) | dict(batch.step())
    assert "long" in batch.keys()
    assert batch.drop({"long", "never admitted"}) == ["long"]
    assert "long" not in batch.keys() and batch.rows == 4 * ("a" in batch.keys()) + ("c" in batch.keys())
    assert batch.src_len == max(len(sources[0]), len(sources[1])) + 1  # the longest source left
    found.update(run_to_end(batch, []))
    assert "long" not in found
    assert_same(decoder.search([sources[0]], beam).hypotheses[0], found["a"], "a")
    assert_same(decoder.search([sources[1]], DecodeOptions(1)).hypotheses[0], found["c"], "c")
    assert batch.rows == 0 and batch.past_len == 0 and len(batch) == 0


def test_an_empty_batch_steps_to_nothing_and_drops_nothing(sessions):
    batch = RunningBatch(sessions)
    assert batch.step() == [] and batch.drop({"x"}) == [] and len(batch) == 0


def test_sources_the_engine_refuses(sessions):
    batch = RunningBatch(sessions)
    with pytest.raises(ValueError, match=r"^source 1 has a token id outside the vocabulary \(0\.\.599\)$"):
        batch.check([[5], [5, 600]], DecodeOptions())
    with pytest.raises(ValueError, match=r"^source 0 is too long: 1000 tokens \+ max_len_extra 50 exceeds"):
        batch.admit([("x", [5] * 1000, DecodeOptions())])
    assert len(batch) == 0


def test_a_format_2_bundle_decodes_statically_but_cannot_batch_continuously(format2_bundle, decoder, sources):
    old: Sessions = load_sessions(format2_bundle, ONE_THREAD)
    assert bundle.read_manifest(format2_bundle)["format_version"] == 2
    assert not bundle.takes_past_mask([i.name for i in old.decoder.get_inputs()])
    options = DecodeOptions(beam_size=4, n_best=2, max_len_extra=8)
    got, expected = Decoder(old).search(sources, options).hypotheses, decoder.search(sources, options).hypotheses
    for i, (e, g) in enumerate(zip(expected, got)):
        assert_same(e, g, i)
    with pytest.raises(NoPastMask, match="no past_mask input"):
        RunningBatch(old)


def test_the_cache_is_copied_once_per_step_and_never_holds_garbage(traced_sessions, sources):
    """Admitted rows are zero under their mask (NaN garbage would poison the masked products)."""
    sessions = traced_sessions
    batch = RunningBatch(sessions)
    batch.admit([(0, sources[0], DecodeOptions(beam_size=2))])
    batch.step()
    batch.step()
    batch.admit([(1, sources[1], DecodeOptions(beam_size=3))])
    assert batch.rows == 5 and batch.past_len == 2
    assert all(np.all(p[2:] == 0) and p.shape == (5, sessions.n_heads, 2, sessions.d_head) for p in batch.past)
    assert batch.past_mask.tolist() == [[True, True]] * 2 + [[False, False]] * 3


@pytest.fixture(scope="module")
def shortlisted(server_checkpoint, data_dir, tmp_path_factory) -> Sessions:
    """The test model with a vocabulary shortlist built from Multi30k train."""
    from nmt.export.export import ExportOptions, export_checkpoint

    out = tmp_path_factory.mktemp("shortlisted") / "bundle"
    export_checkpoint(
        server_checkpoint, out, options=ExportOptions(variants=("fp32",), validate=False, data_dir=str(data_dir))
    )
    sessions = load_sessions(out, replace(ONE_THREAD, shortlist=True))
    assert sessions.shortlist is not None
    return sessions


def test_with_a_shortlist_the_batch_scores_the_union_of_its_sentences_lists(shortlisted, sources):
    options = DecodeOptions(beam_size=4, n_best=2, max_len_extra=8)
    static = Decoder(shortlisted)
    # Alone, a sentence's union is its own list: what the static search gives it alone.
    for i, source in enumerate(sources[:4]):
        assert_same(
            static.search([source], options).hypotheses[0],
            run_to_end(RunningBatch(shortlisted), [[(i, source, options)]])[i],
            i,
        )
    # Together, every output comes from the union (which shrinks as sentences leave, where a static
    # batch keeps its first union to the end: the scores differ from a static batch's).
    together = run_to_end(RunningBatch(shortlisted), [[(i, s, options) for i, s in enumerate(sources)]])
    union = set(shortlisted.shortlist.vocab_ids(sources).tolist())
    assert all(set(h.tokens) <= union for hyps in together.values() for h in hyps)
    # The union follows the sentences in the batch as they join and leave.
    batch = RunningBatch(shortlisted)
    batch.admit([(0, sources[0], options), (1, sources[1], options)])
    batch.step()
    assert batch._vocab.ids().tolist() == shortlisted.shortlist.vocab_ids(sources[:2]).tolist()
    batch.drop({0})
    assert batch._vocab.ids().tolist() == shortlisted.shortlist.vocab_ids(sources[1:2]).tolist()
    batch.drop({1})
    assert len(batch) == 0 and batch._vocab.ids().size == 0


def test_with_the_per_row_decoder_each_row_caches_only_its_own_positions(sessions, sources):
    """A newcomer starts at length 0 beside rows two steps old (no masked slots in front); its beams
    reorder by moving whole rows, and rows that leave take their positions with them."""
    batch = RunningBatch(sessions)
    assert batch.cache is not None
    batch.admit([(0, sources[0], DecodeOptions(beam_size=2, max_len_extra=8))])
    batch.step()
    batch.step()
    batch.admit([(1, sources[1], DecodeOptions(beam_size=3, max_len_extra=8))])
    batch.step()
    assert batch.cache.lengths.tolist() == [3, 3, 1, 1, 1] and batch.past_len == 3
    batch.drop({0})
    batch.step()
    assert batch.cache.lengths.tolist() == [2, 2, 2] and batch.past_len == 2
