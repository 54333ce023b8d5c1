from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from nmt.engine import bundle
from nmt.export.validate import (
    DEFAULT_SENTENCES,
    MAX_BLEU_LOSS,
    MIN_IDENTICAL,
    TOLERANCE,
    ParityError,
    ParityRun,
    ParitySet,
    graph_greedy,
    greedy_verdict,
    in_batches,
    open_graphs,
    parity_set,
    validate,
)
from nmt.training.checkpoint import load_checkpoint
from nmt.training.data import multi30k
from nmt.training.model import Transformer
from nmt.training.search import greedy_search
from nmt.training.tokenizer import Tokenizer

PARITY_LIMIT = 16  # conftest.py's bundle_dir


@pytest.fixture(scope="module")
def tokenizer(checkpoint: Path) -> Tokenizer:
    return load_checkpoint(checkpoint).tokenizer


@pytest.fixture(scope="module")
def broken(model: Transformer) -> Transformer:
    """The model with one bias moved: cross V and every log-prob change, so do greedy outputs."""
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.decoder_layers[0].cross_attn.v_proj.bias += 0.5
    return changed


def test_the_manifest_records_the_parity_summary(bundle_dir: Path) -> None:
    parity = bundle.read_manifest(bundle_dir)["parity"]
    assert parity["checked"] is True
    assert (parity["set"], parity["sentences"], parity["references"]) == (
        "multi30k test_2016_flickr",
        PARITY_LIMIT,
        True,
    )
    assert (parity["tolerance"], parity["min_identical"], parity["max_bleu_loss"]) == (1e-4, 0.99, 0.3)
    assert parity["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert isinstance(parity["torch_bleu"], float)
    for name in ("fp32", "fp32-cpu"):
        summary = parity["variants"][name]
        assert (summary["checked_against"], summary["greedy_identical"], summary["mismatches"]) == ("torch", 1.0, [])
        assert all(value <= TOLERANCE for value in summary["max_abs_diff"].values())
        assert summary["bleu"] == parity["torch_bleu"]
    for role in ("step_decoder", "rows_decoder"):  # the in-place-cache decoders: exact as well
        step = parity["variants"]["fp32-cpu"][role]
        assert (step["greedy_identical"], step["mismatches"]) == (1.0, [])
    int8 = parity["variants"]["int8-cpu"]
    assert int8["checked_against"] == "fp32" and 0 <= int8["greedy_identical"] <= 1
    assert int8["step_decoder"]["bleu_loss"] <= MAX_BLEU_LOSS and int8["rows_decoder"]["bleu_loss"] <= MAX_BLEU_LOSS
    assert int8["reference_bleu"] == parity["variants"]["fp32"]["bleu"]
    assert int8["bleu_loss"] == pytest.approx(int8["reference_bleu"] - int8["bleu"], abs=0.011)
    assert int8["bleu_loss"] <= MAX_BLEU_LOSS


def test_the_servers_greedy_over_the_graphs_equals_torch_on_real_sentences(
    model: Transformer, tokenizer: Tokenizer, bundle_dir: Path, data_dir: Path
) -> None:
    sources = tokenizer.encode(multi30k("val", "en", "de", data_dir).src[:12]) + [[]]  # [] -> src_len 1
    sessions = open_graphs(bundle_dir / bundle.ENCODER_CPU, bundle_dir / bundle.DECODER_CPU)
    expected = in_batches(lambda batch: [h.tokens for h in greedy_search(model, batch, max_len_extra=4)], sources)
    assert graph_greedy(sessions, sources, max_len_extra=4) == expected


def _decode(outputs: list[list[int]]) -> list[str]:
    return [" ".join(map(str, tokens)) for tokens in outputs]


def test_one_mismatch_in_a_hundred_passes_but_is_recorded() -> None:
    expected = [[i, i + 1] for i in range(100)]
    got = [list(t) for t in expected]
    got[7] = [7, 9]
    summary, problems = greedy_verdict(expected, got, tuple(f"s{i}" for i in range(100)), _decode)
    assert problems == [] and MIN_IDENTICAL == 0.99
    assert summary == {
        "greedy_identical": 0.99,
        "mismatches": [{"index": 7, "source": "s7", "torch": "7 8", "onnx": "7 9"}],
    }


def test_below_99_percent_fails_listing_every_differing_sentence() -> None:
    expected = [[i] for i in range(100)]
    got = [[i] if i not in (3, 50) else [0] for i in range(100)]
    summary, problems = greedy_verdict(expected, got, tuple(f"s{i}" for i in range(100)), _decode)
    assert summary["greedy_identical"] == 0.98 and len(summary["mismatches"]) == 2
    assert problems == [
        "greedy: 98 of 100 outputs identical to torch (98.0%, below 99%)",
        "greedy output differs for sentence 3 ('s3'): torch [3] '3', onnx [0] '0'",
        "greedy output differs for sentence 50 ('s50'): torch [50] '50', onnx [0] '0'",
    ]


def test_one_error_lists_every_mismatch_of_every_variant(
    broken: Transformer, tokenizer: Tokenizer, bundle_dir: Path, data_dir: Path
) -> None:
    sentences = tuple(multi30k("val", "en", "de", data_dir).src[:6])
    run = ParityRun(broken, tokenizer, ParitySet("val", sentences), max_len_extra=3)
    for name, (encoder, decoder) in (
        ("fp32", (bundle.ENCODER, bundle.DECODER)),
        ("fp32-cpu", (bundle.ENCODER_CPU, bundle.DECODER_CPU)),
    ):
        run.check_exact(name, bundle_dir / encoder, bundle_dir / decoder)
    with pytest.raises(ParityError) as e:
        run.raise_if_failed()
    message = str(e.value)
    assert message.startswith("parity failed:\n  fp32: greedy: ")
    for name in ("fp32", "fp32-cpu"):
        differ = [m["index"] for m in run.results[name]["mismatches"]]
        assert differ, "the broken model should change some greedy outputs"
        for i in differ:
            assert f"\n  {name}: greedy output differs for sentence {i} ({sentences[i]!r})" in message
        for check in ("cross_kv", "log_probs_incremental", "log_probs_whole_prefix"):
            assert f"\n  {name}: {check}: max abs diff " in message


def test_a_variant_losing_bleu_fails(
    model: Transformer, tokenizer: Tokenizer, bundle_dir: Path, data_dir: Path
) -> None:
    """References equal to fp32's own output: fp32 scores 100, int8 (random tiny model) far less."""
    sentences = multi30k("val", "en", "de", data_dir).src[:16]
    sources = tokenizer.encode(sentences)
    references = tuple(tokenizer.decode([h.tokens for h in greedy_search(model, sources, max_len_extra=5)]))
    run = ParityRun(model, tokenizer, ParitySet("val", tuple(sentences), references), max_len_extra=5)
    assert run.check_exact("fp32", bundle_dir / bundle.ENCODER, bundle_dir / bundle.DECODER)["bleu"] == 100.0
    summary = run.check_approximate(
        "int8-cpu", bundle_dir / bundle.ENCODER_INT8, bundle_dir / bundle.DECODER_INT8, ["CPUExecutionProvider"]
    )
    assert summary["reference_bleu"] == 100.0 and summary["bleu_loss"] > MAX_BLEU_LOSS
    with pytest.raises(ParityError) as e:
        run.raise_if_failed()
    assert str(e.value) == (
        f"parity failed:\n  int8-cpu: BLEU {summary['bleu']:.2f} is {summary['bleu_loss']:.2f} "
        "below fp32's 100.00 (at most 0.3 may be lost)"
    )


def test_a_variant_without_its_provider_is_skipped(model: Transformer, tokenizer: Tokenizer, bundle_dir: Path) -> None:
    run = ParityRun(model, tokenizer, ParitySet("one", ("A dog runs.",)), max_len_extra=3)
    run.check_exact("fp32", bundle_dir / bundle.ENCODER, bundle_dir / bundle.DECODER)
    summary = run.check_approximate(
        "fp16-x", bundle_dir / bundle.ENCODER_FP16, bundle_dir / bundle.DECODER_FP16, ["NoSuchExecutionProvider"]
    )
    assert summary == {"skipped": "no NoSuch execution provider"} and run.problems == []


def test_validate_reports_every_mismatch_of_one_pair(
    broken: Transformer, tokenizer: Tokenizer, bundle_dir: Path
) -> None:
    with pytest.raises(ParityError) as e:
        validate(broken, tokenizer, bundle_dir / bundle.ENCODER, bundle_dir / bundle.DECODER, ["A dog runs."], 3)
    message = str(e.value)
    assert message.startswith("encoder.onnx + decoder.onnx: parity failed:\n  ")
    for check in ("cross_kv", "log_probs_incremental", "log_probs_whole_prefix"):
        assert f"\n  {check}: max abs diff " in message


def test_validate_needs_sentences(model: Transformer, tokenizer: Tokenizer, bundle_dir: Path) -> None:
    with pytest.raises(ValueError) as e:
        validate(model, tokenizer, bundle_dir / bundle.ENCODER, bundle_dir / bundle.DECODER, [])
    assert str(e.value) == "validate needs at least one sentence"


def test_the_parity_set(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NMT_DATA_DIR", raising=False)
    assert parity_set("en", "de") == ParitySet("built-in sentences", tuple(DEFAULT_SENTENCES["en"]))
    assert parity_set("en", "de", sentences=("a", "b", "c"), limit=2) == ParitySet("given sentences", ("a", "b"))
    found = parity_set("en", "de", data_dir=data_dir, limit=3)
    assert found.name == "multi30k test_2016_flickr" and found.sources[0] == DEFAULT_SENTENCES["en"][0]
    assert found.references is not None and len(found.references) == 3
    monkeypatch.setenv("NMT_DATA_DIR", str(data_dir))
    assert len(parity_set("en", "de").sources) == 1000
    assert parity_set("en", "ja").name == "built-in sentences"  # not a Multi30k pair
