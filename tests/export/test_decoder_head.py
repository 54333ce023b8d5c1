"""The decoder's output head (export/decoder_head.py): vocab_ids, top_k and the top-k outputs, in every CPU variant."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nmt.engine import bundle
from nmt.export.validate import cpu_session
from nmt.export.variants import FP32, FP32_CPU, INT8_CPU, SPECS
from nmt.training.model import Transformer
from nmt.training.tokenizer import EOS_ID

if TYPE_CHECKING:
    import onnxruntime as ort

VOCAB, N_DEC = 600, 2  # the conftest model
TOLERANCE = 1e-4
HEAD = [bundle.TOP_LOG_PROBS, bundle.TOP_IDS, bundle.EOS_LOG_PROBS]


def _inputs(batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    src = torch.randint(4, VOCAB, (batch, 7), generator=generator)
    mask = torch.ones_like(src, dtype=torch.bool)
    mask[0, 5:] = False
    return src, mask, torch.randint(4, VOCAB, (batch, 3), generator=generator)


def _shortlist(seed: int = 1, size: int = 90) -> np.ndarray:
    """Ascending ids with the special ids 0..3 in them (the head's contract)."""
    picked = np.random.default_rng(seed).choice(np.arange(4, VOCAB), size, replace=False)
    return np.sort(np.concatenate([np.arange(4), picked])).astype(np.int64)


def _run(directory: Path, variant: str, model_inputs, **head: np.ndarray) -> dict[str, np.ndarray]:
    """The encoder, then the decoder on the whole target prefix after an empty past."""
    src, mask, tgt = (t.numpy() for t in model_inputs)
    spec = SPECS[variant]
    cross = cpu_session(directory / spec.encoder).run(bundle.cross_names(N_DEC), {"src_ids": src, "src_mask": mask})
    decoder = cpu_session(directory / spec.decoder)
    empty = np.zeros((len(src), 4, 0, 8), np.float32)
    feeds = {
        "tgt_ids": tgt,
        "src_mask": mask,
        bundle.PAST_MASK: np.ones(tgt.shape, bool),
        **dict.fromkeys(bundle.past_names(N_DEC), empty),
        **dict(zip(bundle.cross_names(N_DEC), cross)),
        **head,
    }
    names = ["log_probs", *HEAD]
    return dict(zip(names, decoder.run(names, feeds)))


@torch.no_grad()
def _torch_logits(model: Transformer, model_inputs) -> torch.Tensor:
    src, mask, tgt = model_inputs
    logits, _ = model.decode(tgt, model.cross_kv(model.encode(src, mask)), mask)
    return logits[:, -1]  # (B, V)


@pytest.mark.parametrize("variant", [FP32, FP32_CPU])
def test_without_vocab_ids_the_graph_gives_the_whole_vocabulary_as_before(
    model: Transformer, bundle_dir: Path, variant: str
) -> None:
    inputs = _inputs()
    found = _run(bundle_dir, variant, inputs)
    expected = F.log_softmax(_torch_logits(model, inputs), dim=-1).numpy()
    assert found["log_probs"].shape == (3, VOCAB)
    np.testing.assert_allclose(found["log_probs"], expected, atol=TOLERANCE, rtol=0)
    assert found[bundle.TOP_LOG_PROBS].shape == found[bundle.TOP_IDS].shape == (3, 0)  # top_k's default: 0
    np.testing.assert_array_equal(found[bundle.EOS_LOG_PROBS], found["log_probs"][:, EOS_ID])


@pytest.mark.parametrize("variant", [FP32, FP32_CPU])
def test_a_shortlist_renormalizes_over_its_ids_and_top_k_maps_back(
    model: Transformer, bundle_dir: Path, variant: str
) -> None:
    inputs, ids = _inputs(seed=3), _shortlist()
    found = _run(bundle_dir, variant, inputs, vocab_ids=ids, top_k=np.array([6]))
    expected = F.log_softmax(_torch_logits(model, inputs)[:, torch.from_numpy(ids)], dim=-1).numpy()
    np.testing.assert_allclose(found["log_probs"], expected, atol=TOLERANCE, rtol=0)
    best = np.argsort(-found["log_probs"], axis=1, kind="stable")[:, :6]
    np.testing.assert_array_equal(found[bundle.TOP_IDS], ids[best])
    np.testing.assert_array_equal(found[bundle.TOP_LOG_PROBS], np.take_along_axis(found["log_probs"], best, 1))
    np.testing.assert_array_equal(found[bundle.EOS_LOG_PROBS], found["log_probs"][:, EOS_ID])  # EOS: column 3


@pytest.mark.parametrize(("variant", "tolerance"), [(FP32, TOLERANCE), (FP32_CPU, TOLERANCE), (INT8_CPU, 0.2)])
def test_both_projection_branches_agree(bundle_dir: Path, variant: str, tolerance: float) -> None:
    """The If's two branches (constant weight for every id; gathered rows for a shortlist) compute
    the same logits; int8 quantizes only the first, so it gets a looser bound."""
    inputs, ids = _inputs(seed=5), _shortlist(seed=2)
    full = _run(bundle_dir, variant, inputs)["log_probs"][:, ids]
    renormalized = full - np.log(np.exp(full).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(
        _run(bundle_dir, variant, inputs, vocab_ids=ids)["log_probs"], renormalized, atol=tolerance, rtol=0
    )


def test_the_decoder_states_the_vocabulary_size(bundle_dir: Path) -> None:
    """log_probs has V' columns, so the graphs carry the vocabulary size as metadata (engine/runtime.py)."""
    for variant in (FP32, FP32_CPU, INT8_CPU):
        metadata = cpu_session(bundle_dir / SPECS[variant].decoder).get_modelmeta().custom_metadata_map
        assert metadata[bundle.VOCAB_SIZE_KEY] == str(VOCAB)


def _toy_head(vocab: int, d_model: int, embedding: np.ndarray, blocks: bool) -> ort.InferenceSession:
    """LogSoftmax(states @ embedding[vocab_ids].T), the traced head's form, with add_top_k's outputs."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from nmt.export import decoder_head

    nodes = [
        helper.make_node("Gather", ["embedding", bundle.VOCAB_IDS], ["scored_weight"]),
        helper.make_node("Gemm", ["states", "scored_weight"], ["logits"], transB=1),
        helper.make_node("LogSoftmax", ["logits"], ["log_probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "head",
        [
            helper.make_tensor_value_info("states", TensorProto.FLOAT, ["batch", d_model]),
            helper.make_tensor_value_info(bundle.VOCAB_IDS, TensorProto.INT64, ["vocab"]),
        ],
        [helper.make_tensor_value_info("log_probs", TensorProto.FLOAT, ["batch", "vocab"])],
        [numpy_helper.from_array(embedding, "embedding")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    decoder_head.add_top_k(model, vocab, blocks=blocks)
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("scored", [300, 64, 130])  # several blocks, exactly one, a partial last block
def test_the_two_stage_top_k_equals_one_top_k_ties_included(scored: int) -> None:
    """The step decoder's block top-k (decoder_head._block_top_k) against TopK itself: equal log-probs
    (tied embedding rows) must come back lowest id first, at every k up to the whole vocabulary."""
    vocab, d_model = 300, 8
    rng = np.random.default_rng(0)
    embedding = rng.standard_normal((vocab, d_model)).astype(np.float32)
    embedding[7] = np.eye(d_model, dtype=np.float32)[0] * 5
    embedding[[40, 200, 201, 250]] = embedding[7]  # five ids with the same logit in every row
    embedding[[100, 260]] = embedding[99]
    states = rng.standard_normal((5, d_model)).astype(np.float32)
    states[0] = embedding[7]  # row 0: the tied ids are its best by far (25 against N(0, 25) for the others)
    vocab_ids = (
        np.arange(vocab)
        if scored == vocab
        else np.sort(
            np.concatenate(
                [np.arange(4), [7, 40, 200, 201], rng.choice(np.arange(8, vocab), scored - 8, replace=False)]
            )
        )
    )
    vocab_ids = np.unique(vocab_ids)[:scored].astype(np.int64)
    one, two = _toy_head(vocab, d_model, embedding, False), _toy_head(vocab, d_model, embedding, True)
    for k in sorted(k for k in {0, 1, 3, 9, 65, len(vocab_ids)} if k <= len(vocab_ids)):  # the engine's bound
        feeds = {"states": states, bundle.VOCAB_IDS: vocab_ids, bundle.TOP_K: np.array([k])}
        expected, got = one.run(HEAD, feeds), two.run(HEAD, feeds)
        for e, g in zip(expected, got):
            assert e.shape == g.shape and np.array_equal(e, g), (scored, k)
    tied = two.run(HEAD, {"states": states, bundle.VOCAB_IDS: np.arange(vocab), bundle.TOP_K: np.array([5])})[1][0]
    assert tied.tolist() == [7, 40, 200, 201, 250]
