"""Optimizer, learning-rate schedule, loss, and their state as safetensors-friendly tensors + JSON."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .tokenizer import PAD_ID


def noam_lr(step: int, d_model: int, warmup: int, peak: float | None = None) -> float:
    """The paper's schedule: linear warmup, then inverse square root of the step.

    lr = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), scaled so its maximum (at
    step == warmup) is `peak` when one is given.
    """
    step = max(step, 1)
    paper = d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)
    if peak is None:
        return paper
    return paper * peak / (d_model**-0.5 * warmup**-0.5)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Adam:
    # Adam with the paper's betas and epsilon; the schedule sets lr before every step.
    # fused: one kernel for all parameters instead of a dozen element-wise passes each.
    return torch.optim.Adam(model.parameters(), lr=0.0, betas=(0.9, 0.98), eps=1e-9, fused=True)


def smoothed_loss(logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(label-smoothed loss summed over tokens, plain NLL summed over tokens); padding ignored.

    Same values as `F.cross_entropy(..., label_smoothing=smoothing, reduction="sum")`, from one
    log-softmax. Validation and small tests use it; training fuses the output layer and this loss
    (training/output_loss.py).
    """
    flat_logits, flat_target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    real = flat_target != PAD_ID
    lprobs = F.log_softmax(flat_logits[real].float(), dim=-1)  # (N, V)
    nll = -lprobs.gather(1, flat_target[real][:, None]).sum()
    uniform = -lprobs.mean(dim=-1).sum()
    return (1.0 - smoothing) * nll + smoothing * uniform, nll.detach()


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into named tensors and a JSON-able remainder."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> dict[str, torch.Tensor]:
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors


def load_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
