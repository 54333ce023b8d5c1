from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from nmt.engine import bundle
from nmt.export.export import ExportOptions, export_decoder, export_graphs
from nmt.export.fuse import FusionError, check_fused, op_counts
from nmt.export.validate import OnnxGraphs, cpu_session
from nmt.training.model import Transformer

MHA = "com.microsoft::MultiHeadAttention"
ATTENTION = "Attention"  # ONNX Attention-23, the default form
# The conftest model: vocabulary 600, 2 encoder and 2 decoder layers, 4 heads of 8.
VOCAB, N_ENC, N_DEC = 600, 2, 2
GRAPHS = [
    (bundle.ENCODER, N_ENC),
    (bundle.DECODER, 2 * N_DEC),
    (bundle.ENCODER_CPU, N_ENC),
    (bundle.DECODER_CPU, 2 * N_DEC),
]
PAIRS = [(bundle.ENCODER, bundle.DECODER), (bundle.ENCODER_CPU, bundle.DECODER_CPU)]


def test_the_model_is_the_one_these_tests_assume(model: Transformer) -> None:
    cfg = model.cfg
    assert (cfg.vocab_size, cfg.n_encoder_layers, cfg.n_decoder_layers) == (VOCAB, N_ENC, N_DEC)
    assert (cfg.n_heads, cfg.d_head) == (4, 8)


@pytest.mark.parametrize("name, expected", GRAPHS)
def test_every_attention_block_is_one_fused_node(bundle_dir: Path, name: str, expected: int) -> None:
    counts = op_counts(onnx.load(str(bundle_dir / name)))
    assert counts[ATTENTION] == expected
    assert counts["Softmax"] == counts[MHA] == 0
    # One If in the decoder: the output head's projection, full vocabulary or shortlist (decoder_head.py).
    assert counts["If"] == (1 if name.startswith("decoder") else 0) and counts["Loop"] == 0


def test_ort_optimization_fuses_layer_norms(bundle_dir: Path) -> None:
    for name, n_norms in ((bundle.ENCODER_CPU, 2 * N_ENC), (bundle.DECODER_CPU, 3 * N_DEC)):
        counts = op_counts(onnx.load(str(bundle_dir / name)))
        assert counts["com.microsoft::SkipLayerNormalization"] == n_norms
        assert counts["LayerNormalization"] == 0


def _dims(value: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_graphs_have_named_dynamic_axes(bundle_dir: Path) -> None:
    encoder = onnx.load(str(bundle_dir / bundle.ENCODER)).graph
    decoder = onnx.load(str(bundle_dir / bundle.DECODER)).graph
    assert [i.name for i in encoder.input] == bundle.encoder_inputs()
    assert [o.name for o in encoder.output] == bundle.cross_names(N_DEC)
    assert [_dims(i) for i in encoder.input] == [["batch", "src_len"]] * 2
    assert _dims(encoder.output[0]) == ["batch", 4, "src_len", 8]
    assert [i.name for i in decoder.input] == [*bundle.decoder_inputs(N_DEC), bundle.VOCAB_IDS, bundle.TOP_K]
    assert [o.name for o in decoder.output] == bundle.decoder_outputs(N_DEC) + bundle.head_outputs()
    assert _dims(decoder.input[0]) == ["batch", "tgt_len"]
    assert _dims(decoder.input[2]) == ["batch", 4, "past_len", 8]
    assert _dims(decoder.output[0]) == ["batch", "vocab"]  # the ids of vocab_ids (all VOCAB by default)
    head = {v.name: _dims(v) for v in [*decoder.input, *decoder.output]}
    assert (head[bundle.VOCAB_IDS], head[bundle.TOP_K], head[bundle.TOP_IDS]) == (["vocab"], [1], ["batch", "top_k"])


def _sources(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    src = torch.randint(4, VOCAB, (batch, 9), generator=generator)
    src_mask = torch.ones_like(src, dtype=torch.bool)
    src_mask[0, 6:] = False  # one padded row
    tgt = torch.randint(4, VOCAB, (batch, 6), generator=generator)
    return src, src_mask, tgt


@torch.no_grad()
def _check_incremental(model: Transformer, graphs: OnnxGraphs) -> None:
    """Feeding tokens one at a time through the KV cache, from an empty past, equals torch."""
    src, src_mask, tgt = _sources(3, seed=1)
    cross_ref = model.cross_kv(model.encode(src, src_mask))
    logits, present_ref = model.decode(tgt, cross_ref, src_mask)
    ref = F.log_softmax(logits, dim=-1)
    cross = graphs.encode(src.numpy(), src_mask.numpy())
    past = graphs.empty_past(3)
    for t in range(tgt.shape[1]):
        log_probs, past = graphs.step(tgt[:, t : t + 1].numpy(), src_mask.numpy(), past, cross)
        np.testing.assert_allclose(log_probs, ref[:, t].numpy(), atol=1e-4, rtol=0)
    for got, want in zip(past, (t for kv in present_ref for t in kv)):
        assert got.shape == tuple(want.shape)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)


def _graphs(directory: Path, encoder: str = bundle.ENCODER_CPU, decoder: str = bundle.DECODER_CPU) -> OnnxGraphs:
    return OnnxGraphs(cpu_session(directory / encoder), cpu_session(directory / decoder), N_DEC)


@pytest.mark.parametrize("encoder, decoder", PAIRS)
def test_incremental_decoding_matches_torch(model: Transformer, bundle_dir: Path, encoder: str, decoder: str) -> None:
    _check_incremental(model, _graphs(bundle_dir, encoder, decoder))


@torch.no_grad()
def test_a_whole_prefix_after_an_empty_past_matches_torch(model: Transformer, bundle_dir: Path) -> None:
    graphs = _graphs(bundle_dir)
    src, src_mask, tgt = _sources(2, seed=2)
    cross_ref = model.cross_kv(model.encode(src, src_mask))
    logits, _ = model.decode(tgt, cross_ref, src_mask)
    cross = graphs.encode(src.numpy(), src_mask.numpy())
    log_probs, present = graphs.step(tgt.numpy(), src_mask.numpy(), graphs.empty_past(2), cross)
    np.testing.assert_allclose(log_probs, F.log_softmax(logits[:, -1], -1).numpy(), atol=1e-4, rtol=0)
    assert present[0].shape == (2, 4, tgt.shape[1], 8)


def test_the_mha_contrib_form(model: Transformer, tmp_path: Path) -> None:
    """ORT's com.microsoft.MultiHeadAttention on opset 18: same fusion, same parity."""
    graphs = export_graphs(model, tmp_path, attention="mha")
    for name, expected in ((bundle.ENCODER, N_ENC), (bundle.DECODER, 2 * N_DEC)):
        counts = op_counts(graphs[name])
        assert (counts[MHA], counts[ATTENTION], counts["Softmax"]) == (expected, 0, 0)
    assert {o.domain: o.version for o in graphs[bundle.DECODER].opset_import}[""] == 18
    _check_incremental(model, _graphs(tmp_path, bundle.ENCODER, bundle.DECODER))


def test_the_unfused_form_for_benchmarks(model: Transformer, bundle_dir: Path, tmp_path: Path) -> None:
    """The decoder alone covers both mask kinds (causal self-attention, padded cross-attention)."""
    decoder = export_decoder(model, tmp_path / bundle.DECODER, attention="none")
    counts = op_counts(decoder)
    assert (counts[MHA], counts[ATTENTION], counts["Softmax"]) == (0, 0, 2 * N_DEC)
    shutil.copyfile(bundle_dir / bundle.ENCODER, tmp_path / bundle.ENCODER)  # same model, fused encoder
    _check_incremental(model, _graphs(tmp_path, bundle.ENCODER, bundle.DECODER))


def test_check_fused_names_the_graph_and_every_problem() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"])],
        "g",
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
    )
    with pytest.raises(FusionError) as e:
        check_fused(helper.make_model(graph), "mha", 4, "decoder.onnx")
    assert str(e.value) == f"decoder.onnx: 0 {MHA} nodes, expected 4; 1 Softmax nodes left, expected 0"


def test_unknown_attention_form_is_refused() -> None:
    with pytest.raises(ValueError) as e:
        ExportOptions(attention="flash")
    assert str(e.value) == "unknown attention form 'flash'; choose one of onnx, mha, none"
