"""The decoder's past_mask (bundle format 3): rows that joined a batch late, in torch and in the exported graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from nmt.engine import bundle
from nmt.export.validate import OnnxGraphs, cpu_session
from nmt.training.model import KV, Transformer

N_DEC, GARBAGE = 2, 7.0


def _sources(model: Transformer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[KV]]:
    generator = torch.Generator().manual_seed(3)
    src = torch.randint(4, model.cfg.vocab_size, (3, 8), generator=generator)
    src_mask = torch.ones_like(src, dtype=torch.bool)
    src_mask[1, 5:] = False
    tgt = torch.randint(4, model.cfg.vocab_size, (3, 5), generator=generator)
    return src, src_mask, tgt, model.cross_kv(model.encode(src, src_mask))


@torch.no_grad()
def test_torch_rows_joining_late_equal_them_decoded_alone(model: Transformer) -> None:
    _, src_mask, tgt, cross = _sources(model)
    B, P, T = 3, 4, tgt.shape[1]
    shape = (B, model.cfg.n_heads, P, model.cfg.d_head)
    past = [(torch.full(shape, GARBAGE), torch.full(shape, -GARBAGE)) for _ in range(N_DEC)]
    mask = torch.ones(B, P + T, dtype=torch.bool)
    mask[:, :P] = False  # every row: 4 padded slots in front, then its own T tokens
    mask[0, 1:P] = True  # row 0 really has 3 cached slots (garbage, but its own)
    padded, _ = model.decode(tgt, cross, src_mask, past, mask)
    alone, _ = model.decode(tgt[1:], [(k[1:], v[1:]) for k, v in cross], src_mask[1:])
    torch.testing.assert_close(padded[1:], alone, rtol=1e-5, atol=1e-5)
    # Training's path (no mask) is the all-True mask.
    full, _ = model.decode(tgt, cross, src_mask)
    same, _ = model.decode(tgt, cross, src_mask, None, torch.ones(B, T, dtype=torch.bool))
    torch.testing.assert_close(same, full, rtol=0, atol=0)


@pytest.mark.parametrize("decoder", [bundle.DECODER, bundle.DECODER_CPU])
@torch.no_grad()
def test_the_graph_with_padded_cache_slots_equals_torch(model: Transformer, bundle_dir: Path, decoder: str) -> None:
    """Each row steps once per call from a cache whose first slots are masked garbage; the rows have
    different numbers of real slots (they joined at different steps), as the running batch makes them."""
    src, src_mask, tgt, cross_ref = _sources(model)
    graphs = OnnxGraphs(cpu_session(bundle_dir / bundle.ENCODER), cpu_session(bundle_dir / decoder), N_DEC)
    cross = graphs.encode(src.numpy(), src_mask.numpy())
    B, P = 3, 4
    shape = (B, model.cfg.n_heads, P, model.cfg.d_head)
    generator = torch.Generator().manual_seed(5)
    random = lambda: torch.randn(shape, generator=generator)  # noqa: E731
    past_ref = [(random(), random()) for _ in range(N_DEC)]
    real = [0, 2, 4]  # slots each row really has, at the end of the cache
    mask = torch.zeros(B, P + 1, dtype=torch.bool)
    for b, n in enumerate(real):
        mask[b, P - n :] = True
    for t in range(3):
        tokens = tgt[:, t : t + 1]
        logits, present_ref = model.decode(tokens, cross_ref, src_mask, past_ref, mask)
        past = [tensor.numpy() for kv in past_ref for tensor in kv]
        log_probs, present = graphs.step(tokens.numpy(), src_mask.numpy(), past, cross, mask.numpy())
        np.testing.assert_allclose(log_probs, F.log_softmax(logits[:, -1], -1).numpy(), atol=1e-4, rtol=0)
        for got, want in zip(present, (tensor for kv in present_ref for tensor in kv)):
            np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)
        past_ref = present_ref
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool)], dim=1)


def test_the_decoder_declares_past_mask(bundle_dir: Path) -> None:
    for name in (bundle.DECODER, bundle.DECODER_CPU, bundle.DECODER_INT8, bundle.DECODER_FP16):
        graph = onnx.load(str(bundle_dir / name)).graph
        past_mask = next(i for i in graph.input if i.name == bundle.PAST_MASK)
        dims = [d.dim_param or d.dim_value for d in past_mask.type.tensor_type.shape.dim]
        assert dims == ["batch", "past_len + tgt_len"], name
        assert past_mask.type.tensor_type.elem_type == onnx.TensorProto.BOOL, name
    manifest = bundle.read_manifest(bundle_dir)
    assert manifest["format_version"] == 3 and bundle.PAST_MASK in manifest["interface"]["decoder"]["inputs"]
    assert manifest["parity"]["variants"]["fp32"]["max_abs_diff"]["log_probs_joined_late"] <= 1e-4
