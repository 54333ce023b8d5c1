"""Training metrics: one JSON object per line, and a PNG plot of loss and BLEU per epoch."""

from __future__ import annotations

import json
from pathlib import Path


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(records: list[dict], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    epochs = [r for r in records if r.get("event") == "epoch"]
    if not epochs:
        return
    x = [r["epoch"] for r in epochs]
    fig, (loss_ax, bleu_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(x, [r["train_loss"] for r in epochs], label="train (label-smoothed)")
    loss_ax.plot(x, [r["valid_loss"] for r in epochs], label="validation (NLL)")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss per token")
    loss_ax.legend()
    bleu_points = [(r["epoch"], r["valid_bleu"]) for r in epochs if r.get("valid_bleu") is not None]
    if bleu_points:
        bleu_ax.plot(*zip(*bleu_points), marker="o", color="tab:green")
    bleu_ax.set_xlabel("epoch")
    bleu_ax.set_ylabel("validation BLEU")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
