from __future__ import annotations

import math

import pytest
import torch

from nmt.training.model import PRESETS, ModelConfig, Transformer, preset, sinusoidal_table
from nmt.training.search import pad_batch


def small_model(pre_norm: bool = False, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=50,
        d_model=32,
        n_heads=4,
        d_ff=64,
        n_encoder_layers=2,
        n_decoder_layers=2,
        dropout=0.0,
        pre_norm=pre_norm,
    )
    return Transformer(cfg).eval()


def test_positional_encoding_equals_the_formula():
    table = sinusoidal_table(60, 16)
    for pos in (0, 1, 7, 59):
        for i in range(8):
            angle = pos / 10000 ** (2 * i / 16)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_changing_a_future_target_token_never_changes_earlier_outputs(pre_norm):
    model = small_model(pre_norm)
    src, src_mask = pad_batch([[5, 6, 7, 8, 3]])
    tgt = torch.tensor([[2, 10, 11, 12, 13, 14]])
    changed = tgt.clone()
    changed[0, 4] = 40
    with torch.no_grad():
        a, b = model(src, src_mask, tgt), model(src, src_mask, changed)
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 4:], b[:, 4:])  # the change is visible from its position on


def test_padded_source_positions_never_change_the_output():
    model = small_model()
    short, long = [5, 6, 7, 3], [9, 10, 11, 12, 13, 14, 15, 3]
    tgt = torch.tensor([[2, 20, 21, 22]])
    with torch.no_grad():
        src, mask = pad_batch([short])
        alone = model(src, mask, tgt)
        src, mask = pad_batch([short, long])
        batched = model(src, mask, tgt.expand(2, -1))
        src[0, len(short) :] = 33  # garbage under the padding mask changes nothing either
        garbage = model(src, mask, tgt.expand(2, -1))
    torch.testing.assert_close(batched[:1], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(garbage[:1], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_incremental_decoding_equals_full_decoding(pre_norm):
    model = small_model(pre_norm)
    src, mask = pad_batch([[5, 6, 7, 3], [9, 10, 3]])
    tgt = torch.tensor([[2, 20, 21, 22, 23], [2, 30, 31, 32, 33]])
    with torch.no_grad():
        memory = model.encode(src, mask)
        cross = model.cross_kv(memory)
        full, _ = model.decode(tgt, cross, mask)
        past, steps = None, []
        for t in range(tgt.shape[1]):
            logits, past = model.decode(tgt[:, t : t + 1], cross, mask, past)
            steps.append(logits)
        # two tokens at once after a cached prefix: the causal mask must honour the offset
        _, prefix = model.decode(tgt[:, :3], cross, mask)
        chunk, _ = model.decode(tgt[:, 3:], cross, mask, prefix)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunk, full[:, 3:], rtol=1e-5, atol=1e-5)
    assert past[0][0].shape == (2, 4, 5, 8)  # (B, heads, steps, d_head)


def test_output_projection_is_tied_to_the_embedding():
    model = small_model()
    vocab_by_model = [n for n, p in model.named_parameters() if p.shape == (50, 32)]
    assert vocab_by_model == ["embedding.weight"]  # no separate output matrix
    with torch.no_grad():
        model.embedding.weight[7] += 1.0
        src, mask = pad_batch([[5, 3]])
        before = model(src, mask, torch.tensor([[2]]))[0, 0, 7]
        model.embedding.weight[7] += 1.0
        after = model(src, mask, torch.tensor([[2]]))[0, 0, 7]
    assert before != after


def test_presets_follow_the_issue():
    tiny, base = preset("tiny"), preset("base")
    assert (tiny.n_encoder_layers, tiny.d_model, tiny.d_ff, tiny.n_heads, tiny.dropout) == (4, 128, 256, 4, 0.3)
    assert (base.n_encoder_layers, base.d_model, base.d_ff, base.n_heads) == (6, 512, 2048, 8)
    assert set(PRESETS) == {"tiny", "small", "base", "big"}


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"d_model \(100\) must be divisible by n_heads \(3\)"):
        ModelConfig(d_model=100, n_heads=3)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match="unknown model config keys: colour"):
        ModelConfig.from_dict({"colour": 1})
    assert ModelConfig.from_dict(preset("tiny").to_dict()) == preset("tiny")
