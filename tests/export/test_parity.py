from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from export import bundle
from export.validate import TOLERANCE, OnnxGraphs, ParityError, cpu_session, onnx_greedy, validate
from training.checkpoint import load_checkpoint
from training.data import multi30k
from training.model import Transformer
from training.search import greedy_search


def test_the_manifest_records_parity_for_both_graph_pairs(bundle_dir: Path) -> None:
    parity = bundle.read_manifest(bundle_dir)["parity"]
    assert parity["checked"] is True
    for name in (bundle.DECODER, bundle.DECODER_CPU):
        assert parity[name]["tolerance"] == TOLERANCE == 1e-4
        assert parity[name]["greedy_identical"] == parity[name]["sentences"] == 5
        assert all(value <= TOLERANCE for value in parity[name]["max_abs_diff"].values())


def test_numpy_greedy_over_the_graphs_equals_torch_on_real_sentences(model: Transformer, checkpoint: Path,
                                                                      bundle_dir: Path, data_dir: Path) -> None:
    tokenizer = load_checkpoint(checkpoint).tokenizer
    sources = tokenizer.encode(multi30k("val", "en", "de", data_dir).src[:12]) + [[]]  # [] -> src_len 1
    graphs = OnnxGraphs(cpu_session(bundle_dir / bundle.ENCODER_CPU), cpu_session(bundle_dir / bundle.DECODER_CPU), 2)
    expected = [h.tokens for h in greedy_search(model, sources, max_len_extra=4)]
    assert onnx_greedy(graphs, sources, max_len_extra=4) == expected


def test_every_mismatch_is_reported_in_one_error(model: Transformer, checkpoint: Path, bundle_dir: Path) -> None:
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.decoder_layers[0].cross_attn.v_proj.bias += 0.5  # moves cross V and every log-prob
    tokenizer = load_checkpoint(checkpoint).tokenizer
    with pytest.raises(ParityError) as e:
        validate(changed, tokenizer, bundle_dir / bundle.ENCODER, bundle_dir / bundle.DECODER, ["A dog runs."], 3)
    message = str(e.value)
    assert message.startswith("encoder.onnx + decoder.onnx: parity failed:\n  ")
    for check in ("cross_kv", "log_probs_incremental", "log_probs_whole_prefix"):
        assert f"\n  {check}: max abs diff " in message


def test_validate_needs_sentences(model: Transformer, checkpoint: Path, bundle_dir: Path) -> None:
    tokenizer = load_checkpoint(checkpoint).tokenizer
    with pytest.raises(ValueError) as e:
        validate(model, tokenizer, bundle_dir / bundle.ENCODER, bundle_dir / bundle.DECODER, [])
    assert str(e.value) == "validate needs at least one sentence"
