"""The vocabulary shortlist: built at export (export/shortlist.py), read and applied by the engine."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nmt.engine import bundle
from nmt.engine.bundle import BundleError
from nmt.engine.cache import row_top_k
from nmt.engine.decoding import DecodeOptions, Decoder
from nmt.engine.runtime import RuntimeConfig, Sessions, load_sessions
from nmt.engine.shortlist import Shortlist, load, save
from nmt.export.export import ExportOptions, export_checkpoint
from nmt.export.shortlist import ShortlistOptions, build
from nmt.training.model import Transformer
from nmt.training.search import beam_search, greedy_search

ONE_THREAD = RuntimeConfig(device="cpu", intra_op_threads=1, inter_op_threads=1, shortlist=True)


@pytest.fixture(scope="module")
def shortlisted_bundle(server_checkpoint: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shortlist") / "bundle"
    export_checkpoint(
        server_checkpoint, out, options=ExportOptions(variants=("fp32",), validate=False, data_dir=str(data_dir))
    )
    return out


@pytest.fixture(scope="module")
def shortlisted(shortlisted_bundle: Path) -> Sessions:
    sessions = load_sessions(shortlisted_bundle, ONE_THREAD)
    assert sessions.has_head and sessions.shortlist is not None
    return sessions


def test_the_table_ranks_targets_by_co_occurrence_leaving_out_the_frequent_ones() -> None:
    # Source 10 occurs in 3 pairs: with 20 in all 3, 21 in 2, 22 in 1; 30 is the most frequent target.
    sources = [[10, 11], [10], [10, 12], [11]]
    targets = [[20, 21, 22, 30, 30], [20, 21, 30], [20, 30], [23, 30]]
    table = build(sources, targets, vocab_size=40, options=ShortlistOptions(per_source=2, frequent=1))
    assert table.frequent.tolist() == [30]
    assert table.targets_of(10).tolist() == [20, 21]  # p = 3/3, 2/3; 22 (1/3) is past per_source
    assert table.targets_of(11).tolist() == [20, 21]  # 1/2 each for 20, 21, 22, 23: ties by id
    assert table.targets_of(12).tolist() == [20]
    assert table.targets_of(5).tolist() == []
    ids = table.vocab_ids([[12], [5]])
    assert ids.dtype == np.int64 and ids.tolist() == [0, 1, 2, 3, 5, 12, 20, 30]  # specials, sources, lists, frequent


def test_a_damaged_shortlist_file_is_refused(tmp_path: Path) -> None:
    good = Shortlist(np.array([0, 1, 1], np.int32), np.array([1], np.int32), np.array([0], np.int32))
    save(tmp_path / "s.npz", good)
    assert load(tmp_path / "s.npz", 2).targets.tolist() == [1]
    with pytest.raises(BundleError, match=r"^s\.npz: expected 1-d integer arrays with 4 offsets$"):
        load(tmp_path / "s.npz", 3)
    save(tmp_path / "bad.npz", Shortlist(good.offsets, np.array([7], np.int32), good.frequent))
    with pytest.raises(BundleError, match=r"^bad\.npz: offsets or ids out of range for a vocabulary of 2$"):
        load(tmp_path / "bad.npz", 2)
    (tmp_path / "text.npz").write_text("not numpy")
    with pytest.raises(BundleError, match=r"^text\.npz: not a shortlist file"):
        load(tmp_path / "text.npz", 2)


def test_the_manifest_must_list_the_shortlist_it_names(shortlisted_bundle: Path, tmp_path: Path) -> None:
    copy_dir = Path(shutil.copytree(shortlisted_bundle, tmp_path / "bundle"))
    manifest = json.loads((copy_dir / bundle.MANIFEST).read_text())
    manifest["shortlist"]["file"] = "elsewhere.npz"
    manifest[bundle.SELF_HASH] = bundle.content_hash(manifest)
    (copy_dir / bundle.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="shortlist: 'elsewhere.npz' is not a file listed in the manifest"):
        bundle.verify_bundle(copy_dir)


def test_the_shortlist_is_optional_at_run_time(shortlisted_bundle: Path) -> None:
    sessions = load_sessions(shortlisted_bundle, RuntimeConfig(device="cpu", intra_op_threads=1, shortlist=False))
    assert sessions.has_head and sessions.shortlist is None


def _restricted(model: Transformer, ids: np.ndarray) -> Transformer:
    """The torch model scoring only `ids`: what the graph computes when vocab_ids is fed."""
    restricted = copy.deepcopy(model)
    bias = torch.full((model.cfg.vocab_size,), float("-inf"))
    bias[torch.from_numpy(ids)] = 0.0
    weight = restricted.embedding.weight
    restricted.project = lambda states: F.linear(states, weight) + bias  # type: ignore[method-assign]
    return restricted


def test_with_a_shortlist_search_equals_torch_restricted_to_the_same_ids(
    shortlisted: Sessions, torch_model, sources
) -> None:
    """One sub-batch, so one union: greedy and beam equal the torch reference over those ids alone."""
    ids = shortlisted.shortlist.vocab_ids(sources)
    assert 4 < len(ids) < torch_model.cfg.vocab_size
    reference = _restricted(torch_model, ids)
    decoder = Decoder(shortlisted)
    greedy = decoder.search(sources, DecodeOptions(beam_size=1, max_len_extra=8)).hypotheses
    assert [h[0].tokens for h in greedy] == [h.tokens for h in greedy_search(reference, sources, max_len_extra=8)]
    found = decoder.search(sources, DecodeOptions(beam_size=4, n_best=4, max_len_extra=8)).hypotheses
    expected = beam_search(reference, sources, 4, 0.6, 4, 8)
    assert [[h.tokens for h in hyps] for hyps in found] == [[h.tokens for h in hyps] for hyps in expected]
    for hyps, exp in zip(found, expected):
        assert [h.score for h in hyps] == pytest.approx([h.score for h in exp], abs=1e-4)
    assert all(set(h.tokens) <= set(ids.tolist()) for hyps in found for h in hyps)


def test_row_top_k_matches_the_graphs_topk_order() -> None:
    """The fallback for graphs without the head: best first, equal values by lower id (as ONNX TopK;
    which of several values equal to the k-th is kept is np.argpartition's choice)."""
    log_probs = np.log(np.array([[0.1, 0.3, 0.3, 0.2, 0.1], [0.4, 0.1, 0.2, 0.2, 0.1]], np.float32))
    values, ids, eos = row_top_k(log_probs, 3)
    assert ids.tolist() == [[1, 2, 3], [0, 2, 3]]
    np.testing.assert_array_equal(values, np.take_along_axis(log_probs, ids, 1))
    np.testing.assert_array_equal(eos, log_probs[:, 3])
    assert row_top_k(log_probs, 1)[1].tolist() == [[1], [0]]


def test_the_export_builds_from_given_files_or_says_why_there_is_none(
    tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nmt.export.shortlist import write

    (tmp_path / "c.en").write_text("A dog runs.\nTwo men talk.\n")
    (tmp_path / "c.de").write_text("Ein Hund rennt.\nZwei Männer reden.\n")
    entry = write(tmp_path, tokenizer, 600, "en", "de", (str(tmp_path / "c.en"), str(tmp_path / "c.de")), None)
    table = load(tmp_path / bundle.SHORTLIST, 600)
    assert entry == {
        "file": bundle.SHORTLIST,
        "corpus": f"{tmp_path / 'c.en'} + {tmp_path / 'c.de'}",
        "sentence_pairs": 2,
        "per_source": 20,
        "frequent": len(table.frequent),
    }
    assert set(tokenizer.encode(["Hund"])[0]) <= set(table.vocab_ids(tokenizer.encode(["A dog"])).tolist())
    monkeypatch.delenv("NMT_DATA_DIR", raising=False)
    assert write(tmp_path, tokenizer, 600, "en", "de", None, None) == {
        "skipped": "no training corpus (give --shortlist-corpus SRC TGT, or a Multi30k --data-dir)"
    }
