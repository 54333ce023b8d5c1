"""Our Transformer against torch.nn.Transformer on the same batches, optimizer and schedule.

    NMT_DATA_DIR=../shared/data/multi30k python scripts/reference_check.py --steps 400

Both get the same embedding (scaled, sinusoidal positions, tied output), the same dropout p
everywhere (nn.Transformer has one rate for attention weights, FFN and residuals, so ours is set
the same way), Adam (0.9, 0.98, 1e-9) and the inverse-square-root schedule. If our model learns
as fast as the reference, a slow run is the recipe's fault, not the model's.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from nmt.training.data import multi30k, token_batches
from nmt.training.examples import encode_corpus, make_batch
from nmt.training.model import Transformer, preset, sinusoidal_table
from nmt.training.optim import make_optimizer, noam_lr, smoothed_loss
from nmt.training.tokenizer import Tokenizer


class Reference(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=0)
        nn.init.normal_(self.embedding.weight, 0.0, cfg.d_model**-0.5)
        self.register_buffer("positions", sinusoidal_table(cfg.max_positions, cfg.d_model), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.core = nn.Transformer(
            cfg.d_model,
            cfg.n_heads,
            cfg.n_encoder_layers,
            cfg.n_decoder_layers,
            cfg.d_ff,
            cfg.dropout,
            batch_first=True,
        )

    def embed(self, ids):
        return self.drop(self.embedding(ids) * math.sqrt(self.cfg.d_model) + self.positions[: ids.shape[1]])

    def forward(self, src, src_mask, tgt_in):
        T = tgt_in.shape[1]
        causal = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
        out = self.core(
            self.embed(src),
            self.embed(tgt_in),
            tgt_mask=causal,
            src_key_padding_mask=~src_mask,
            memory_key_padding_mask=~src_mask,
        )
        return out @ self.embedding.weight.T


def train(model, examples, valid, batches, steps, lr, warmup) -> list[tuple[int, float]]:
    optimizer = make_optimizer(model)
    curve = []
    for step, indices in enumerate(batches[:steps], start=1):
        model.train()
        for g in optimizer.param_groups:
            g["lr"] = noam_lr(step, model.cfg.d_model, warmup, lr)
        batch = make_batch(examples, indices)
        loss, _ = smoothed_loss(model(batch.src, batch.src_mask, batch.tgt_in), batch.tgt_out, 0.1)
        (loss / batch.n_tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == min(steps, len(batches)):
            curve.append((step, valid_loss(model, valid)))
    return curve


@torch.no_grad()
def valid_loss(model, valid) -> float:
    model.eval()
    total, tokens = 0.0, 0
    for indices in token_batches(valid.src_lengths, valid.tgt_lengths, 8192):
        batch = make_batch(valid, indices)
        total += smoothed_loss(model(batch.src, batch.src_mask, batch.tgt_in), batch.tgt_out, 0.0)[1].item()
        tokens += batch.n_tokens
    return total / tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--warmup", type=int, default=800)
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--tokenizer", default="models/default/spm.model")
    p.add_argument("--ours-only", action="store_true", help="skip the reference (its curve is deterministic)")
    args = p.parse_args()
    tokenizer = Tokenizer.load(args.tokenizer)
    examples = encode_corpus(multi30k("train", "en", "de"), tokenizer, 256)
    valid = encode_corpus(multi30k("val", "en", "de"), tokenizer, 10**9)
    batches = token_batches(examples.src_lengths, examples.tgt_lengths, 4096, seed=1)
    batches += token_batches(examples.src_lengths, examples.tgt_lengths, 4096, seed=2)
    cfg = preset(
        "tiny",
        vocab_size=tokenizer.vocab_size,
        dropout=args.dropout,
        attention_dropout=args.dropout,
        activation_dropout=args.dropout,
    )
    p_models = [("ours", Transformer), ("torch.nn.Transformer", Reference)]
    for name, build in p_models[: 1 if args.ours_only else 2]:
        torch.manual_seed(1)
        start = time.perf_counter()
        curve = train(build(cfg), examples, valid, batches, args.steps, args.lr, args.warmup)
        print(
            f"{name:22s} valid NLL at steps {[s for s, _ in curve]}: {[round(v, 3) for _, v in curve]} "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
