"""Checkpoints: a directory any consumer rebuilds the model from alone.

    model.safetensors   weights (never pickle)
    config.json         model config, languages, special ids, tokenizer file name, provenance
    spm.model           the SentencePiece model
    train_state.*       (training checkpoints only) optimizer, schedule, RNG and loop position

A directory is written beside its destination and swapped in at the end, so an interrupted
save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .model import ModelConfig, Transformer
from .tokenizer import BOS_ID, EOS_ID, MODEL_FILENAME, PAD_ID, UNK_ID, Tokenizer

FORMAT = "nmt-checkpoint"
FORMAT_VERSION = 1
WEIGHTS, CONFIG, STATE_TENSORS, STATE_JSON = "model.safetensors", "config.json", "train_state.safetensors", "train_state.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing a file or does not match its config."""


@dataclass(frozen=True)
class CheckpointMeta:
    src_lang: str
    tgt_lang: str
    info: dict = field(default_factory=dict)  # provenance: command, epoch, scores


def write_checkpoint(
    directory: str | Path,
    model: Transformer,
    tokenizer_file: str | Path,
    meta: CheckpointMeta,
    train_state: tuple[dict[str, torch.Tensor], dict] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    directory = Path(directory)
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    weights = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, staging / WEIGHTS, metadata={"format": FORMAT})
    shutil.copyfile(tokenizer_file, staging / MODEL_FILENAME)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.cfg.to_dict(),
        "src_lang": meta.src_lang,
        "tgt_lang": meta.tgt_lang,
        "tokenizer": MODEL_FILENAME,
        "special_ids": {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID},
        "info": meta.info,
    }
    (staging / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if train_state is not None:
        tensors, state = train_state
        save_file({k: v.contiguous() for k, v in tensors.items()}, staging / STATE_TENSORS)
        (staging / STATE_JSON).write_text(json.dumps(state, indent=2) + "\n")
    _swap_in(staging, directory)
    return directory


def _swap_in(staging: Path, directory: Path) -> None:
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    staging.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"not a checkpoint: {path} is missing")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format is {config.get('format')!r}, expected {FORMAT!r}")
    return config


@dataclass
class LoadedCheckpoint:
    model: Transformer
    tokenizer: Tokenizer
    config: dict
    directory: Path

    @property
    def meta(self) -> CheckpointMeta:
        return CheckpointMeta(self.config["src_lang"], self.config["tgt_lang"], self.config.get("info", {}))


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    directory = Path(directory)
    config = read_config(directory)
    for name in (WEIGHTS, config["tokenizer"]):
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} is missing {name}")
    model = Transformer(ModelConfig.from_dict(config["model"]))
    weights = load_file(directory / WEIGHTS)
    try:
        model.load_state_dict(weights)  # copies fp16 weights into the fp32 parameters
    except RuntimeError as e:
        raise CheckpointError(f"{directory / WEIGHTS} does not match its config.json: {e}") from e
    tokenizer = Tokenizer.load(directory / config["tokenizer"])
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise CheckpointError(
            f"tokenizer has {tokenizer.vocab_size} pieces but the model expects {model.cfg.vocab_size}"
        )
    return LoadedCheckpoint(model.to(device).eval(), tokenizer, config, directory)


def read_train_state(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    directory = Path(directory)
    for name in (STATE_TENSORS, STATE_JSON):
        if not (directory / name).is_file():
            raise CheckpointError(f"cannot resume: {directory / name} is missing")
    return load_file(directory / STATE_TENSORS), json.loads((directory / STATE_JSON).read_text())


def average_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of several weight files (the paper averages the last checkpoints)."""
    if not files:
        raise ValueError("no checkpoints to average")
    total: dict[str, torch.Tensor] = {}
    for path in files:
        for name, tensor in load_file(path).items():
            total[name] = total.get(name, 0) + tensor.double()
    return {name: (t / len(files)).float() for name, t in total.items()}


def main(argv: list[str] | None = None) -> int:
    """Copy a checkpoint, optionally casting its weights (fp16 halves the file)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m training.checkpoint", description=main.__doc__)
    parser.add_argument("source", help="checkpoint directory")
    parser.add_argument("dest", help="new checkpoint directory")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--force", action="store_true", help="replace an existing destination")
    args = parser.parse_args(argv)
    if Path(args.dest).exists() and not args.force:
        print(f"error: {args.dest} exists; pass --force to replace it", file=sys.stderr)
        return 2
    try:
        loaded = load_checkpoint(args.source)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_checkpoint(args.dest, loaded.model, loaded.directory / loaded.config["tokenizer"], loaded.meta,
                     dtype=getattr(torch, args.dtype))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
