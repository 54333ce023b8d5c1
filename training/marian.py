"""A Hugging Face Marian directory (OPUS-MT's layout) -> one of our checkpoints, without transformers.

    nmt-import SRC DST [--force]

SRC holds config.json, generation_config.json (optional), model.safetensors or pytorch_model.bin,
source.spm, target.spm, vocab.json and, for separate vocabularies, target_vocab.json. DST gets:

    model.safetensors   the weights under our names (training/model.py)
    config.json         our model config (every Marian difference named: activation, output bias,
                        embedding scale, sinusoid layout, separate embeddings, depths, LayerNorm
                        epsilon), the special ids, the tokenizer files, the generation settings and
                        the provenance (source path, sha256 of every input file, importer version)
    source.spm target.spm vocab.json [target_vocab.json]   copied as they are

Every field is read from the config, never assumed. A config the engine cannot run, a missing file or
weights that disagree with the config stop the import with one line naming the file and the field
(exit 2); DST is written beside itself and swapped in at the end, so nothing half-written remains.
pytorch_model.bin is read with torch.load(weights_only=True): a pickle that needs code is refused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nmt.engine.bundle import sha256_file
from nmt.engine.marian_tokenizer import target_languages

from .checkpoint import CONFIG, FORMAT, FORMAT_VERSION, WEIGHTS, load_model, read_config, swap_in
from .model import ModelConfig, Transformer, sinusoidal_table

TOKENIZER_FILES = ("source.spm", "target.spm", "vocab.json")
TARGET_VOCAB = "target_vocab.json"
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "swish": "swish", "silu": "swish"}  # Marian name -> ours


class MarianImportError(ValueError):
    """The source directory cannot become a checkpoint: the message names the file and the field."""


@dataclass(frozen=True)
class Imported:
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    special_ids: dict[str, int]
    target_languages: list[str]
    generation: dict


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise MarianImportError(f"{path}: missing")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MarianImportError(f"{path}: not JSON ({e})") from e
    if not isinstance(value, dict):
        raise MarianImportError(f"{path}: not a JSON object")
    return value


def _field(config: dict, path: Path, name: str, kind: type | tuple[type, ...], default: object = None) -> object:
    value = config.get(name, default)
    numeric = kind is not bool and kind != (bool,)
    if value is None or (numeric and isinstance(value, bool)) or not isinstance(value, kind):
        wanted = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise MarianImportError(f"{path}: field {name!r} is {value!r}, expected {wanted}")
    return value


def model_config(config: dict, path: Path) -> ModelConfig:
    """Our ModelConfig from a Marian config.json (errors name the field)."""
    if config.get("model_type") != "marian":
        raise MarianImportError(f"{path}: field 'model_type' is {config.get('model_type')!r}, expected 'marian'")
    get = lambda name, kind=int, default=None: _field(config, path, name, kind, default)  # noqa: E731
    for ours, enc, dec in (
        ("n_heads", "encoder_attention_heads", "decoder_attention_heads"),
        ("d_ff", "encoder_ffn_dim", "decoder_ffn_dim"),
    ):
        if get(enc) != get(dec):
            raise MarianImportError(
                f"{path}: fields {enc!r} ({get(enc)}) and {dec!r} ({get(dec)}) differ; the engine "
                f"runs one {ours} for both stacks"
            )
    activation = get("activation_function", str)
    if activation not in ACTIVATIONS:
        raise MarianImportError(
            f"{path}: field 'activation_function' is {activation!r}; the engine runs {', '.join(sorted(ACTIVATIONS))}"
        )
    for name, unsupported in (
        ("normalize_before", True),
        ("normalize_embedding", True),
        ("add_final_layer_norm", True),
    ):
        if config.get(name) is unsupported:
            raise MarianImportError(f"{path}: field {name!r} is {unsupported}: not a layout the engine runs")
    vocab_size, decoder_vocab = get("vocab_size"), config.get("decoder_vocab_size")
    shared = bool(get("share_encoder_decoder_embeddings", bool, True))
    separate_vocab = decoder_vocab is not None and decoder_vocab != vocab_size
    if separate_vocab and shared:
        raise MarianImportError(
            f"{path}: field 'decoder_vocab_size' ({decoder_vocab}) differs from 'vocab_size' "
            f"({vocab_size}) with shared embeddings"
        )
    try:
        return ModelConfig(
            vocab_size=vocab_size,
            d_model=get("d_model"),
            n_heads=get("encoder_attention_heads"),
            d_ff=get("encoder_ffn_dim"),
            n_encoder_layers=get("encoder_layers"),
            n_decoder_layers=get("decoder_layers"),
            dropout=float(get("dropout", (int, float), 0.0)),
            attention_dropout=float(get("attention_dropout", (int, float), 0.0)),
            activation_dropout=float(get("activation_dropout", (int, float), 0.0)),
            max_positions=get("max_position_embeddings"),
            pad_id=get("pad_token_id"),
            activation=ACTIVATIONS[activation],
            scale_embedding=bool(get("scale_embedding", bool, False)),
            position_layout="halves",
            output_bias=True,
            shared_embeddings=shared,
            decoder_vocab_size=decoder_vocab if separate_vocab else None,
            layer_norm_eps=float(get("layer_norm_eps", (int, float), 1e-5)),
        )
    except ValueError as e:
        raise MarianImportError(f"{path}: {e}") from e


def _layer_names(prefix: str, ours: str, cross: bool) -> dict[str, str]:
    names = {f"{prefix}.self_attn.{p}": f"{ours}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    names[f"{prefix}.self_attn_layer_norm"] = f"{ours}.{'self_block' if cross else 'attn_block'}.norm"
    if cross:
        names |= {
            f"{prefix}.encoder_attn.{p}": f"{ours}.cross_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")
        }
        names[f"{prefix}.encoder_attn_layer_norm"] = f"{ours}.cross_block.norm"
    names |= {
        f"{prefix}.fc1": f"{ours}.ffn.linear1",
        f"{prefix}.fc2": f"{ours}.ffn.linear2",
        f"{prefix}.final_layer_norm": f"{ours}.ffn_block.norm",
    }
    return names


def map_weights(theirs: dict[str, torch.Tensor], cfg: ModelConfig, path: Path) -> dict[str, torch.Tensor]:
    """Marian's state dict under our names; every tensor accounted for, the shapes our config's."""
    theirs = {k.removeprefix("model."): v for k, v in theirs.items()}
    names: dict[str, str] = {}
    for i in range(cfg.n_encoder_layers):
        names |= _layer_names(f"encoder.layers.{i}", f"encoder_layers.{i}", cross=False)
    for i in range(cfg.n_decoder_layers):
        names |= _layer_names(f"decoder.layers.{i}", f"decoder_layers.{i}", cross=True)
    ours: dict[str, torch.Tensor] = {}
    for their, our in names.items():
        for suffix in ("weight", "bias"):
            if f"{their}.{suffix}" not in theirs:
                raise MarianImportError(f"{path}: tensor {their}.{suffix} is missing")
            ours[f"{our}.{suffix}"] = theirs.pop(f"{their}.{suffix}")
    target = theirs.pop("decoder.embed_tokens.weight", None)
    source = theirs.pop("encoder.embed_tokens.weight", None)
    shared = theirs.pop("shared.weight", None)
    if cfg.shared_embeddings:
        target = shared if shared is not None else target if target is not None else source
    elif source is None or target is None:
        raise MarianImportError(
            f"{path}: separate embeddings need encoder.embed_tokens.weight and decoder.embed_tokens.weight"
        )
    if target is None:
        raise MarianImportError(f"{path}: tensor shared.weight (the embeddings) is missing")
    ours["embedding.weight"] = target
    if not cfg.shared_embeddings:
        ours["src_embedding.weight"] = source
    lm_head = theirs.pop("lm_head.weight", None)
    if lm_head is not None and not torch.equal(lm_head, target):
        raise MarianImportError(
            f"{path}: tensor lm_head.weight differs from the decoder's embeddings; the engine ties them"
        )
    bias = theirs.pop("final_logits_bias", None)
    ours["output_bias"] = torch.zeros(cfg.target_vocab_size) if bias is None else bias.reshape(-1)
    for name in ("encoder.embed_positions.weight", "decoder.embed_positions.weight"):
        if (table := theirs.pop(name, None)) is not None:
            _check_positions(table, cfg, path, name)
    if theirs:
        raise MarianImportError(f"{path}: tensors the engine cannot run: {', '.join(sorted(theirs)[:5])}")
    with torch.device("meta"):  # the shapes, without the memory
        expected = Transformer(cfg).state_dict()
    for name, tensor in ours.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise MarianImportError(
                f"{path}: tensor for {name} has shape {tuple(tensor.shape)}; config.json "
                f"says {tuple(expected[name].shape)}"
            )
    return {name: tensor.float().contiguous() for name, tensor in ours.items()}


def _check_positions(table: torch.Tensor, cfg: ModelConfig, path: Path, name: str) -> None:
    want = sinusoidal_table(table.shape[0], cfg.d_model, cfg.position_layout)
    if table.shape != want.shape or not torch.allclose(table.float(), want, atol=1e-4):
        raise MarianImportError(
            f"{path}: tensor {name} is not Marian's sinusoid table (learned positions are not supported)"
        )


def read_weights(src: Path) -> tuple[dict[str, torch.Tensor], Path]:
    safetensors, pickle = src / "model.safetensors", src / "pytorch_model.bin"
    if safetensors.is_file():
        try:
            return load_file(safetensors), safetensors
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise MarianImportError(f"{safetensors}: not a safetensors file ({e})") from e
    if pickle.is_file():
        try:
            loaded = torch.load(pickle, map_location="cpu", weights_only=True)  # runs no code from the file
        except Exception as e:  # noqa: BLE001 - UnpicklingError and friends: refused
            raise MarianImportError(f"{pickle}: refused: not plain tensors ({str(e).splitlines()[0]})") from e
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise MarianImportError(f"{pickle}: not a state dict of tensors")
        return loaded, pickle
    raise MarianImportError(f"{src}: neither model.safetensors nor pytorch_model.bin")


def read_vocab(path: Path, size: int) -> dict[str, int]:
    vocab = _read_json(path)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in vocab.values()):
        raise MarianImportError(f"{path}: ids must be integers")
    if len(vocab) != size or set(vocab.values()) != set(range(size)):
        raise MarianImportError(
            f"{path}: {len(vocab)} pieces with ids up to {max(vocab.values(), default=-1)}; the "
            f"weights have {size} rows"
        )
    return vocab


def special_ids(config: dict, vocab: dict[str, int], path: Path, vocab_path: Path) -> dict[str, int]:
    ids = {
        "eos": _field(config, path, "eos_token_id", int),
        "pad": _field(config, path, "pad_token_id", int),
        "decoder_start": _field(config, path, "decoder_start_token_id", int, config.get("pad_token_id")),
    }
    if "<unk>" not in vocab:
        raise MarianImportError(f"{vocab_path}: no '<unk>' piece")
    ids["unk"] = vocab["<unk>"]
    return ids


def generation_settings(src: Path, config: dict) -> dict:
    """What generate() would use: the generation config's values, else config.json's, else its defaults."""
    path = src / "generation_config.json"
    stored = _read_json(path) if path.is_file() else {}
    pick = lambda name, default: stored.get(name, config.get(name, default))  # noqa: E731
    return {
        "num_beams": int(pick("num_beams", 1)),
        "length_penalty": float(pick("length_penalty", 1.0)),
        "max_length": int(pick("max_length", 512)),
        "bad_words_ids": pick("bad_words_ids", None),
    }


def read_marian(src: Path) -> Imported:
    config_path = src / "config.json"
    config = _read_json(config_path)
    cfg = model_config(config, config_path)
    for name in TOKENIZER_FILES + ((TARGET_VOCAB,) if cfg.decoder_vocab_size else ()):
        if not (src / name).is_file():
            raise MarianImportError(f"{src / name}: missing")
    theirs, weights_path = read_weights(src)
    weights = map_weights(theirs, cfg, weights_path)
    vocab = read_vocab(src / "vocab.json", cfg.vocab_size)
    if cfg.decoder_vocab_size:
        read_vocab(src / TARGET_VOCAB, cfg.decoder_vocab_size)
    ids = special_ids(config, vocab, config_path, src / "vocab.json")
    return Imported(cfg, weights, ids, target_languages(vocab), generation_settings(src, config))


def write_imported(src: Path, dst: Path, imported: Imported) -> Path:
    staging = dst.with_name(dst.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_file(imported.weights, staging / WEIGHTS, metadata={"format": FORMAT})
        files = [*TOKENIZER_FILES, *((TARGET_VOCAB,) if imported.config.decoder_vocab_size else ())]
        for name in files:
            shutil.copyfile(src / name, staging / name)
        inputs = sorted(p.name for p in src.iterdir() if p.is_file())
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": imported.config.to_dict(),
            "src_lang": "",
            "tgt_lang": "",
            "tokenizer": {
                "kind": "marian",
                "source": "source.spm",
                "target": "target.spm",
                "vocab": "vocab.json",
                "target_vocab": TARGET_VOCAB if imported.config.decoder_vocab_size else "vocab.json",
            },
            "special_ids": imported.special_ids,
            "target_languages": imported.target_languages,
            "generation": imported.generation,
            "info": {
                "imported_from": str(src.resolve()),
                "importer": f"nmt-import {_version()}",
                "input_sha256": {name: sha256_file(src / name) for name in inputs},
            },
        }
        (staging / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    swap_in(staging, dst)
    return dst


def load_imported(directory: str | Path) -> tuple[Transformer, dict]:
    """The torch model of an imported checkpoint (eval mode) and its config.json."""
    directory = Path(directory)
    config = read_config(directory)
    return load_model(directory, config).eval(), config


def _version() -> str:
    try:
        return metadata.version("nmt-service")
    except metadata.PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nmt-import", description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="a Hugging Face Marian model directory")
    p.add_argument("dst", type=Path, help="the checkpoint directory to write")
    p.add_argument("--force", action="store_true", help="replace DST when it exists")
    a = p.parse_args(argv)
    try:
        if a.dst.exists() and not a.force:
            raise MarianImportError(f"{a.dst}: exists (use --force to replace it)")
        if not a.src.is_dir():
            raise MarianImportError(f"{a.src}: not a directory")
        write_imported(a.src, a.dst, read_marian(a.src))
    except MarianImportError as e:
        print(f"nmt-import: {e}", file=sys.stderr)
        return 2
    print(f"imported {a.src} -> {a.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
