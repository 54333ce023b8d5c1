"""The pieces that make a CPU training step fast give the same numbers as the plain ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nmt.training import output_loss
from nmt.training.model import Dropout, Transformer, preset
from nmt.training.optim import smoothed_loss
from nmt.training.output_loss import projected_cross_entropy
from nmt.training.train import resolve_amp


@pytest.fixture
def case():
    torch.manual_seed(0)
    states = torch.randn(70, 16, requires_grad=True)
    weight = (0.3 * torch.randn(300, 16)).requires_grad_()
    target = torch.randint(4, 300, (70,))
    return states, weight, target


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_projected_loss_equals_cross_entropy_in_value_and_gradient(case, smoothing, monkeypatch):
    monkeypatch.setattr(output_loss, "CHUNK_ROWS", 16)  # several chunks, the last one partial
    states, weight, target = case
    loss, nll = projected_cross_entropy(states, weight, target, smoothing)
    loss.backward()
    grads = states.grad.clone(), weight.grad.clone()
    states.grad = weight.grad = None
    reference = F.cross_entropy(states @ weight.T, target, label_smoothing=smoothing, reduction="sum")
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(nll, F.cross_entropy(states @ weight.T, target, reduction="sum"), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads[0], states.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-4, atol=1e-5)


def test_bf16_output_layer_stays_close_to_fp32(case):
    states, weight, target = case
    full, _ = projected_cross_entropy(states, weight, target, 0.1)
    (g_full,) = torch.autograd.grad(full, states)
    low, _ = projected_cross_entropy(states, weight, target, 0.1, low_precision=True)
    (g_low,) = torch.autograd.grad(low, states)
    assert low.item() == pytest.approx(full.item(), rel=2e-3)
    assert (g_low - g_full).norm() / g_full.norm() < 2e-2


def test_smoothed_loss_ignores_padding_like_cross_entropy():
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 40)
    target = torch.randint(4, 40, (3, 5))
    target[0, 3:] = 0
    loss, nll = smoothed_loss(logits, target, 0.1)
    flat = logits.reshape(-1, 40), target.reshape(-1)
    torch.testing.assert_close(loss, F.cross_entropy(*flat, ignore_index=0, label_smoothing=0.1, reduction="sum"))
    torch.testing.assert_close(nll, F.cross_entropy(*flat, ignore_index=0, reduction="sum"))


def test_dropout_drops_at_rate_p_and_keeps_the_expectation():
    torch.manual_seed(2)
    drop = Dropout(0.3).train()
    x = torch.ones(200_000, requires_grad=True)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(0.3, abs=0.01)
    assert y.mean().item() == pytest.approx(1.0, abs=0.02)
    y.sum().backward()
    assert torch.equal(x.grad == 0, y == 0)  # the gradient flows through the kept elements only
    assert torch.equal(drop.eval()(x), x)


def test_a_bf16_training_step_gives_losses_close_to_fp32():
    """The whole model under bf16 autocast, and the bf16 output layer alone, on the same batch."""
    torch.manual_seed(3)
    model = Transformer(preset("tiny", vocab_size=500, dropout=0.0)).train()
    src = torch.randint(4, 500, (8, 12))
    tgt_in, tgt_out = torch.randint(4, 500, (8, 10)), torch.randint(4, 500, (8, 10))
    keep = tgt_out != 0

    def loss(autocast: bool, low_precision: bool) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            states = model(src, src != 0, tgt_in, keep, project=False)
            value, _ = projected_cross_entropy(states, model.embedding.weight, tgt_out[keep], 0.1, low_precision)
        return value.item() / keep.sum().item()

    fp32 = loss(False, False)
    assert loss(False, True) == pytest.approx(fp32, rel=5e-3)
    assert loss(True, True) == pytest.approx(fp32, rel=2e-2)


@pytest.mark.parametrize(
    ("requested", "device", "cpu_bf16", "chosen"),
    [
        ("auto", "cuda", False, "bf16"),
        ("auto", "cpu", True, "bf16"),  # AMX or AVX-512 BF16
        ("auto", "cpu", False, "none"),  # e.g. AVX2 only: bf16 would be emulated, slower
        ("bf16-output", "cpu", True, "bf16-output"),  # asked for explicitly
        ("none", "cuda", True, "none"),
    ],
)
def test_amp_auto_picks_bf16_only_where_it_is_native(requested, device, cpu_bf16, chosen):
    assert resolve_amp(requested, device, cpu_bf16) == chosen


def test_fp16_amp_needs_cuda():
    with pytest.raises(ValueError, match="--amp fp16 needs CUDA; this run is on cpu"):
        resolve_amp("fp16", "cpu", True)
