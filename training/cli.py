"""`nmt-train` command line -> a frozen TrainConfig."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from .model import PRESETS, ModelConfig, preset


@dataclass(frozen=True)
class TrainConfig:
    out_dir: Path
    model: ModelConfig
    src_lang: str = "en"
    tgt_lang: str = "de"
    data_dir: str | None = None
    train_files: tuple[str, str] | None = None
    valid_files: tuple[str, str] | None = None
    train_limit: int | None = None  # use only the first N training pairs (quick runs)
    tokenizer: str | None = None
    init_from: str | None = None  # warm start: weights, model config and tokenizer of a checkpoint
    max_len: int = 256
    max_tokens: int = 4096
    accum_steps: int = 1
    max_epochs: int = 100
    max_steps: int | None = None
    time_limit: float | None = None  # minutes; checked at the end of each epoch
    warmup: int = 4000
    lr: float | None = None  # peak learning rate; None = the paper's d_model^-0.5 * warmup^-0.5
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    seed: int = 1
    device: str = "auto"
    amp: str = "auto"
    compile: bool = False
    patience: int = 10
    average_last: int = 5
    valid_beam: int = 1
    valid_bleu_every: int = 1  # epochs between validation BLEU runs (loss is computed every epoch)
    beam: int = 4  # inference settings stored in every checkpoint
    length_penalty: float = 0.6
    valid_limit: int | None = None
    save_every_steps: int = 0
    progress: bool = True
    force: bool = False
    resume: bool = False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nmt-train",
        description="Train the Transformer of 'Attention Is All You Need' on Multi30k or any parallel corpus.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, type=Path, help="run directory (checkpoints, tokenizer, metrics)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size")
    for name in ("d_model", "n_heads", "d_ff", "n_encoder_layers", "n_decoder_layers"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"override the preset's {name}")
    p.add_argument("--dropout", type=float, help="override the preset's dropout (embeddings, residual branches)")
    p.add_argument("--attention-dropout", type=float, help="dropout on attention weights (default 0)")
    p.add_argument("--activation-dropout", type=float, help="dropout inside the feed-forward block (default 0)")
    p.add_argument("--pre-norm", action="store_true", help="pre-norm residual blocks instead of the paper's post-norm")
    data = p.add_argument_group("data")
    data.add_argument("--src-lang", default="en", choices=["en", "de", "fr", "cs"])
    data.add_argument("--tgt-lang", default="de", choices=["en", "de", "fr", "cs"])
    data.add_argument(
        "--data-dir",
        default=os.environ.get("NMT_DATA_DIR"),
        help="Multi30k directory (default $NMT_DATA_DIR; unset = download into the cache)",
    )
    for split in ("train", "valid"):
        data.add_argument(f"--{split}-src", help=f"plain-text {split} source file (optionally .gz)")
        data.add_argument(f"--{split}-tgt", help=f"plain-text {split} target file (optionally .gz)")
    data.add_argument("--train-limit", type=int, help="use only the first N training pairs")
    data.add_argument("--valid-limit", type=int, help="use only the first N validation pairs")
    data.add_argument("--vocab-size", type=int, default=8000, help="SentencePiece joint vocabulary size")
    data.add_argument("--tokenizer", help="an existing SentencePiece model instead of training one")
    data.add_argument("--init-from", help="start from this checkpoint's weights, model config and tokenizer")
    data.add_argument("--max-len", type=int, default=256, help="drop training pairs longer than this (tokens)")
    opt = p.add_argument_group("optimization")
    opt.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch (per side, padded)")
    opt.add_argument("--accum-steps", type=int, default=1, help="batches per optimizer step")
    opt.add_argument("--max-epochs", type=int, default=100)
    opt.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    opt.add_argument("--time-limit", type=float, help="stop at the first epoch end after this many minutes")
    opt.add_argument("--warmup", type=int, default=4000, help="warmup steps of the inverse-square-root schedule")
    opt.add_argument("--lr", type=float, help="peak learning rate (default: the paper's d_model^-0.5 * warmup^-0.5)")
    opt.add_argument("--label-smoothing", type=float, default=0.1)
    opt.add_argument("--clip-norm", type=float, default=1.0, help="gradient-norm clip; 0 disables")
    opt.add_argument("--seed", type=int, default=1)
    opt.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    opt.add_argument(
        "--amp",
        default="auto",
        choices=["auto", "none", "bf16", "bf16-output", "fp16"],
        help="mixed precision: bf16 = autocast; bf16-output = only the output layer in bf16; "
        "auto = bf16 on CUDA and on CPUs with AMX or AVX-512 BF16, none on other CPUs",
    )
    opt.add_argument("--compile", action="store_true", help="torch.compile the model")
    run = p.add_argument_group("validation and checkpoints")
    run.add_argument(
        "--patience", type=int, default=10, help="stop after this many epochs without a better BLEU; 0 = never"
    )
    run.add_argument(
        "--average-last", type=int, default=5, help="average the last N epoch checkpoints at the end; 0/1 = off"
    )
    run.add_argument("--valid-beam", type=int, default=1, help="beam size for validation BLEU (1 = greedy)")
    run.add_argument(
        "--valid-bleu-every",
        type=int,
        default=1,
        help="validation BLEU every N epochs (and at the last); loss is computed every epoch",
    )
    run.add_argument("--beam", type=int, default=4, help="inference beam size stored in the checkpoints")
    run.add_argument(
        "--length-penalty",
        type=float,
        default=0.6,
        help="inference length penalty (GNMT alpha) stored in the checkpoints",
    )
    run.add_argument("--save-every-steps", type=int, default=0, help="also save a resumable checkpoint every N steps")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--force", action="store_true", help="delete an existing run directory first")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    return p


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.src_lang == a.tgt_lang:
        parser.error("--src-lang and --tgt-lang must differ")
    train_files = _pair(parser, "train", a.train_src, a.train_tgt)
    valid_files = _pair(parser, "valid", a.valid_src, a.valid_tgt)
    if train_files and not valid_files:
        parser.error("--train-src/--train-tgt need --valid-src/--valid-tgt too")
    if a.force and a.resume:
        parser.error("--force and --resume exclude each other")
    for name in (
        "max_tokens",
        "accum_steps",
        "max_epochs",
        "warmup",
        "vocab_size",
        "max_len",
        "valid_beam",
        "valid_bleu_every",
        "beam",
    ):
        if getattr(a, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    overrides = {
        k: getattr(a, k)
        for k in (
            "d_model",
            "n_heads",
            "d_ff",
            "n_encoder_layers",
            "n_decoder_layers",
            "dropout",
            "attention_dropout",
            "activation_dropout",
        )
        if getattr(a, k) is not None
    }
    if a.init_from:
        if a.tokenizer:
            parser.error("--init-from brings its own tokenizer; drop --tokenizer")
        model = _checkpoint_model(parser, a.init_from, overrides)
        a.tokenizer = str(Path(a.init_from) / "spm.model")
    else:
        model = _preset_model(parser, a, overrides)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    shared = {k: v for k, v in vars(a).items() if k in fields}
    return TrainConfig(
        **shared,
        out_dir=a.out,
        model=model,
        train_files=train_files,
        valid_files=valid_files,
        progress=not a.no_progress,
    )


def _preset_model(parser: argparse.ArgumentParser, a: argparse.Namespace, overrides: dict) -> ModelConfig:
    try:
        return preset(
            a.preset, vocab_size=a.vocab_size, pre_norm=a.pre_norm, max_positions=max(1024, a.max_len + 64), **overrides
        )
    except ValueError as e:
        parser.error(str(e))


def _checkpoint_model(parser: argparse.ArgumentParser, directory: str, overrides: dict) -> ModelConfig:
    from .checkpoint import read_config

    try:
        saved = read_config(directory)["model"]
        if set(overrides) - {"dropout", "attention_dropout", "activation_dropout"}:
            parser.error("--init-from fixes the model's shape; only the dropout rates may be overridden")
        return ModelConfig.from_dict({**saved, **overrides})
    except ValueError as e:
        parser.error(str(e))


def _pair(parser: argparse.ArgumentParser, split: str, src: str | None, tgt: str | None) -> tuple[str, str] | None:
    if bool(src) != bool(tgt):
        parser.error(f"--{split}-src and --{split}-tgt go together")
    return (src, tgt) if src else None
