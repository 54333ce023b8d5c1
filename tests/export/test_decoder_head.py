"""The decoder's output head (export/decoder_head.py): vocab_ids, top_k and the top-k outputs, in every CPU variant."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nmt.engine import bundle
from nmt.export.validate import cpu_session
from nmt.export.variants import FP32, FP32_CPU, INT8_CPU, SPECS
from nmt.training.model import Transformer
from nmt.training.tokenizer import EOS_ID

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
    feeds = {"tgt_ids": tgt, "src_mask": mask, bundle.PAST_MASK: np.ones(tgt.shape, bool),
             **dict.fromkeys(bundle.past_names(N_DEC), empty), **dict(zip(bundle.cross_names(N_DEC), cross)), **head}
    names = ["log_probs", *HEAD]
    return dict(zip(names, decoder.run(names, feeds)))


@torch.no_grad()
def _torch_logits(model: Transformer, model_inputs) -> torch.Tensor:
    src, mask, tgt = model_inputs
    logits, _ = model.decode(tgt, model.cross_kv(model.encode(src, mask)), mask)
    return logits[:, -1]  # (B, V)


@pytest.mark.parametrize("variant", [FP32, FP32_CPU])
def test_without_vocab_ids_the_graph_gives_the_whole_vocabulary_as_before(model: Transformer, bundle_dir: Path,
                                                                         variant: str) -> None:
    inputs = _inputs()
    found = _run(bundle_dir, variant, inputs)
    expected = F.log_softmax(_torch_logits(model, inputs), dim=-1).numpy()
    assert found["log_probs"].shape == (3, VOCAB)
    np.testing.assert_allclose(found["log_probs"], expected, atol=TOLERANCE, rtol=0)
    assert found[bundle.TOP_LOG_PROBS].shape == found[bundle.TOP_IDS].shape == (3, 0)  # top_k's default: 0
    np.testing.assert_array_equal(found[bundle.EOS_LOG_PROBS], found["log_probs"][:, EOS_ID])


@pytest.mark.parametrize("variant", [FP32, FP32_CPU])
def test_a_shortlist_renormalizes_over_its_ids_and_top_k_maps_back(model: Transformer, bundle_dir: Path,
                                                                   variant: str) -> None:
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
    np.testing.assert_allclose(_run(bundle_dir, variant, inputs, vocab_ids=ids)["log_probs"], renormalized,
                               atol=tolerance, rtol=0)


def test_the_decoder_states_the_vocabulary_size(bundle_dir: Path) -> None:
    """log_probs has V' columns, so the graphs carry the vocabulary size as metadata (engine/runtime.py)."""
    for variant in (FP32, FP32_CPU, INT8_CPU):
        metadata = cpu_session(bundle_dir / SPECS[variant].decoder).get_modelmeta().custom_metadata_map
        assert metadata[bundle.VOCAB_SIZE_KEY] == str(VOCAB)
