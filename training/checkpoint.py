"""Checkpoints: a directory any consumer rebuilds the model from alone.

    model.safetensors   weights (never pickle)
    config.json         model config, languages, special ids, tokenizer file name, provenance
    spm.model           the SentencePiece model
    train_state.*       (training checkpoints only) optimizer, schedule, RNG and loop position

A directory is written beside its destination and swapped in at the end, so an interrupted
save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import dataclasses
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
WEIGHTS, CONFIG, STATE_TENSORS, STATE_JSON = (
    "model.safetensors",
    "config.json",
    "train_state.safetensors",
    "train_state.json",
)


class CheckpointError(ValueError):
    """A checkpoint directory is missing a file or does not match its config."""


@dataclass(frozen=True)
class InferenceSettings:
    """How this model is meant to be decoded: chosen on the validation set, stored in the checkpoint
    and the bundle, and the default of nmt-eval, nmt-translate and the server."""

    beam_size: int = 4
    length_penalty: float = 0.6  # GNMT alpha
    max_len_extra: int = 50  # a hypothesis holds at most len(source) + this many tokens

    def __post_init__(self) -> None:
        if self.beam_size < 1 or self.max_len_extra < 1:
            raise ValueError(
                f"beam_size and max_len_extra must be at least 1, got {self.beam_size}, {self.max_len_extra}"
            )
        if not 0.0 <= self.length_penalty <= 10.0:
            raise ValueError(f"length_penalty must be between 0 and 10, got {self.length_penalty}")

    def to_dict(self) -> dict:
        return {"beam_size": self.beam_size, "length_penalty": self.length_penalty, "max_len_extra": self.max_len_extra}

    @classmethod
    def from_dict(cls, values: dict | None) -> InferenceSettings:
        values = values or {}
        known = {"beam_size", "length_penalty", "max_len_extra"}
        if set(values) - known:
            raise ValueError(f"unknown inference settings: {', '.join(sorted(set(values) - known))}")
        return cls(**values)


@dataclass(frozen=True)
class CheckpointMeta:
    src_lang: str
    tgt_lang: str
    info: dict = field(default_factory=dict)  # provenance: command, epoch, scores
    inference: InferenceSettings = field(default_factory=InferenceSettings)


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
        "inference": meta.inference.to_dict(),
        "info": meta.info,
    }
    (staging / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if train_state is not None:
        tensors, state = train_state
        save_file({k: v.contiguous() for k, v in tensors.items()}, staging / STATE_TENSORS)
        (staging / STATE_JSON).write_text(json.dumps(state, indent=2) + "\n")
    swap_in(staging, directory)
    return directory


def swap_in(staging: Path, directory: Path) -> None:
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


def update_inference(directory: str | Path, inference: InferenceSettings, **info) -> None:
    """Store new inference settings (and provenance) in a checkpoint's config.json, atomically."""
    path = Path(directory) / CONFIG
    config = read_config(directory)
    config["inference"] = inference.to_dict()
    config.setdefault("info", {}).update(info)
    staging = path.with_name(CONFIG + ".partial")
    staging.write_text(json.dumps(config, indent=2) + "\n")
    staging.replace(path)


@dataclass
class LoadedCheckpoint:
    model: Transformer
    tokenizer: Tokenizer
    config: dict
    directory: Path

    @property
    def meta(self) -> CheckpointMeta:
        return CheckpointMeta(
            self.config["src_lang"], self.config["tgt_lang"], self.config.get("info", {}), self.inference
        )

    @property
    def inference(self) -> InferenceSettings:
        """The stored settings; checkpoints written before they were stored get the old defaults."""
        return InferenceSettings.from_dict(self.config.get("inference"))


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    directory = Path(directory)
    config = read_config(directory)
    if not isinstance(config.get("tokenizer"), str):
        raise CheckpointError(
            f"checkpoint {directory} was imported with a Marian tokenizer (nmt-import): such "
            "checkpoints are not exported yet"
        )
    for name in (WEIGHTS, config["tokenizer"]):
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} is missing {name}")
    model = load_model(directory, config)
    tokenizer = Tokenizer.load(directory / config["tokenizer"])
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise CheckpointError(
            f"tokenizer has {tokenizer.vocab_size} pieces but the model expects {model.cfg.vocab_size}"
        )
    return LoadedCheckpoint(model.to(device).eval(), tokenizer, config, directory)


def load_model(directory: Path, config: dict) -> Transformer:
    """The Transformer of a checkpoint directory from its config.json (as read) and its weights."""
    model = Transformer(ModelConfig.from_dict(config["model"]))
    try:
        model.load_state_dict(load_file(directory / WEIGHTS))  # copies fp16 weights into the fp32 parameters
    except RuntimeError as e:
        raise CheckpointError(f"{directory / WEIGHTS} does not match its config.json: {e}") from e
    return model


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
    """Copy a checkpoint, optionally casting its weights (fp16 halves the file) or changing its
    inference settings."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m nmt.training.checkpoint", description=main.__doc__)
    parser.add_argument("source", help="checkpoint directory")
    parser.add_argument("dest", help="new checkpoint directory")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--beam", type=int, help="store this inference beam size")
    parser.add_argument("--length-penalty", type=float, help="store this inference length penalty (GNMT alpha)")
    parser.add_argument("--force", action="store_true", help="replace an existing destination")
    args = parser.parse_args(argv)
    if Path(args.dest).exists() and not args.force:
        print(f"error: {args.dest} exists; pass --force to replace it", file=sys.stderr)
        return 2
    try:
        loaded = load_checkpoint(args.source)
        inference = loaded.inference.to_dict()
        inference.update(
            {k: v for k, v in (("beam_size", args.beam), ("length_penalty", args.length_penalty)) if v is not None}
        )
        meta = dataclasses.replace(loaded.meta, inference=InferenceSettings.from_dict(inference))
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_checkpoint(
        args.dest, loaded.model, loaded.directory / loaded.config["tokenizer"], meta, dtype=getattr(torch, args.dtype)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
