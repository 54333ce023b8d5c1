"""`nmt-bench train`: training tokens/s per optimizer step, every variant side by side in one run.

    nmt-bench train [--presets tiny,small] [--budgets 4096,8192,16384] [--steps 12]

Every row trains the same real Multi30k batches (length-bucketed, as `nmt-train` makes them) from
the same initial weights; the first `--warmup-steps` steps of a row are not timed (they allocate,
and compile where `torch.compile` is on). Rows:
- `legacy`: the training step as it was before the CPU work (torch `nn.Dropout` everywhere, 0.3
  dropout on attention weights and inside the FFN, logits for padding too, two log-softmaxes,
  unfused Adam, a host sync per step): the baseline the goal (>= 2.5x) is measured against;
- `current`: the step `nmt-train` runs, in fp32, with only the output layer in bf16 (`bf16-out`)
  or under bf16 autocast, eager or `torch.compile`.
Writes train.json and train.md (with the CPU model and its flags) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nmt.training.cpu import cpu_info, cpu_summary
from nmt.training.data import multi30k, token_batches
from nmt.training.examples import encode_corpus, make_batch
from nmt.training.model import Transformer, preset
from nmt.training.optim import make_optimizer
from nmt.training.output_loss import projected_cross_entropy
from nmt.training.tokenizer import PAD_ID, Tokenizer
from nmt.training.train import attention_backend


@dataclass(frozen=True)
class Variant:
    preset: str
    budget: int
    step: str  # "legacy" | "current"
    precision: str  # "fp32" | "bf16"
    compiled: bool

    @property
    def label(self) -> str:
        return f"{self.preset} {self.budget // 1024}k {self.step} {self.precision}{' compile' if self.compiled else ''}"


def legacy_model(cfg) -> Transformer:
    """The model as trained before: stock dropout, also on attention weights and inside the FFN."""
    cfg = type(cfg)(**{**cfg.to_dict(), "attention_dropout": cfg.dropout, "activation_dropout": cfg.dropout})
    model = Transformer(cfg)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "Dropout" and not isinstance(child, nn.Dropout):
                setattr(parent, name, nn.Dropout(child.p))
    return model


def legacy_step(model, optimizer, batch) -> None:
    logits = model(batch.src, batch.src_mask, batch.tgt_in)
    flat, target = logits.reshape(-1, logits.shape[-1]).float(), batch.tgt_out.reshape(-1)
    loss = F.cross_entropy(flat, target, ignore_index=PAD_ID, label_smoothing=0.1, reduction="sum")
    with torch.no_grad():
        F.cross_entropy(flat, target, ignore_index=PAD_ID, reduction="sum")
    (loss / batch.n_tokens).backward()
    loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def current_step(model, optimizer, batch, precision: str) -> torch.Tensor:
    """precision: "fp32"; "bf16-out" (bf16 output layer only); "bf16" (autocast, output layer too)."""
    keep = batch.tgt_out != PAD_ID
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"), attention_backend("cpu"):
        states = model(batch.src, batch.src_mask, batch.tgt_in, keep, project=False)
        weight = getattr(model, "_orig_mod", model).embedding.weight
        loss, _ = projected_cross_entropy(states, weight, batch.tgt_out[keep], 0.1, precision != "fp32")
    (loss / batch.n_tokens).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def run_variant(v: Variant, examples, vocab_size: int, steps: int, warmup_steps: int) -> dict[str, Any]:
    warmup_steps += 1 if v.compiled else 0  # a second shape recompiles (dynamic shapes from then on)
    batches = token_batches(examples.src_lengths, examples.tgt_lengths, v.budget, seed=1)[: warmup_steps + steps]
    torch.manual_seed(1)
    cfg = preset(v.preset, vocab_size=vocab_size)
    model = (legacy_model(cfg) if v.step == "legacy" else Transformer(cfg)).train()
    if v.step == "legacy":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
    else:
        optimizer = make_optimizer(model)
        for g in optimizer.param_groups:
            g["lr"] = 1e-4
    train_model = torch.compile(model) if v.compiled else model
    tokens, seconds, compile_s = 0, 0.0, 0.0
    for i, indices in enumerate(batches):
        batch = make_batch(examples, indices)
        start = time.perf_counter()
        if v.step == "legacy":
            legacy_step(train_model, optimizer, batch)
        else:
            current_step(train_model, optimizer, batch, v.precision).item()
        elapsed = time.perf_counter() - start
        if i >= warmup_steps:
            tokens, seconds = tokens + batch.n_tokens, seconds + elapsed
        else:
            compile_s += elapsed
    return {
        **v.__dict__,
        "label": v.label,
        "steps": len(batches) - warmup_steps,
        "target_tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "warmup_seconds": round(compile_s, 1),
    }


def variants(args: argparse.Namespace) -> list[Variant]:
    out = []
    for name in args.presets:
        out.append(Variant(name, args.budgets[0], "legacy", "fp32", False))  # the baseline: the first budget
        for budget in args.budgets:
            for precision in args.precisions:
                out.append(Variant(name, budget, "current", precision, False))
        if args.compile:
            for precision in args.precisions:
                out.append(Variant(name, args.budgets[0], "current", precision, True))
    return out


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    base = {r["preset"]: r["tokens_per_s"] for r in rows if r["step"] == "legacy"}
    lines = [
        f"# nmt-bench train ({result['date']})",
        "",
        f"CPU: {result['cpu']}",
        f"torch {result['torch']}, "
        f"{result['threads']} threads, {result['steps']} timed steps per row after {result['warmup_steps']} untimed, "
        f"vocabulary {result['vocab_size']}",
        "",
        "| preset | budget | step | precision | compile | target tok/s | x legacy | untimed warm-up s |",
        "|---|---:|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['budget']} | {r['step']} | {r['precision']} | {'yes' if r['compiled'] else 'no'} "
            f"| {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base[r['preset']]:.2f} | {r['warmup_seconds']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nmt-bench train", description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,small", type=lambda s: s.split(","))
    p.add_argument("--budgets", default="4096,8192,16384", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--precisions", default="fp32,bf16-out,bf16", type=lambda s: s.split(","))
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--sentences", type=int, default=0, help="use only the first N training pairs (0 = all)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--data-dir", default=os.environ.get("NMT_DATA_DIR"))
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = multi30k("train", "en", "de", args.data_dir)
    if args.sentences:
        corpus = type(corpus)(corpus.src[: args.sentences], corpus.tgt[: args.sentences])
    tokenizer_path = args.out / f"bench-spm-{args.vocab_size}.model"
    tokenizer = Tokenizer.train(corpus.src + corpus.tgt, tokenizer_path, args.vocab_size)
    tokenizer_path.unlink()
    examples = encode_corpus(corpus, tokenizer, 256)
    print(f"CPU: {cpu_summary()}", flush=True)
    rows = []
    for v in variants(args):
        rows.append(run_variant(v, examples, args.vocab_size, args.steps, args.warmup_steps))
        print(f"{v.label:36s} {rows[-1]['tokens_per_s']:8.0f} tok/s", flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_summary(),
        "cpu_flags": cpu_info()["flags"],
        "torch": torch.__version__,
        "threads": args.threads,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "vocab_size": args.vocab_size,
        "rows": rows,
    }
    (args.out / "train.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "train.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
