"""Our checkpoint as a CTranslate2 model: the same weights, for a side-by-side benchmark.

    python -m nmt.bench.ct2 models/default /tmp/ct2-int8 --quantization int8   (or float32, float16)

The mapping, from training/model.py:
- post-norm layers (`pre_norm=False`: CT2 then normalizes after each residual add), ReLU,
  LayerNorm eps 1e-5 (torch's default; CT2's own default is 1e-6), no final norm;
- embeddings scaled by sqrt(d_model) (CT2's `scale_embeddings`), one matrix shared by the
  source and target embeddings and the output projection, which has no bias;
- sinusoidal positions given as a table: ours interleave sin/cos (PE[:, 0::2] = sin), while
  CT2's built-in table concatenates them, so the built-in one would be wrong;
- self-attention Q, K, V fused into one linear (CT2's layout), cross-attention K and V fused.
The vocabulary is our SentencePiece pieces in id order, so CT2 ids equal ours: "<unk>" 1,
"<s>" 2 (decoding starts from it), "</s>" 3 (decoding stops on it, and `add_source_eos`
appends it to every source, as training/search.py does).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ctranslate2.converters.converter import Converter
from ctranslate2.specs import common_spec, transformer_spec

from nmt.training.checkpoint import load_checkpoint
from nmt.training.model import Transformer
from nmt.training.tokenizer import BOS_ID, EOS_ID, UNK_ID, Tokenizer

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which model.py uses
QUANTIZATIONS = ("float32", "int8", "float16")  # float16: for device cuda (nmt-bench decode --device cuda)
SPECIAL_PIECES = {UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}


def vocabulary(tokenizer: Tokenizer) -> list[str]:
    """Pieces in id order; CT2 looks tokens up by string, so they must be unique."""
    pieces = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    for token_id, piece in SPECIAL_PIECES.items():
        if pieces[token_id] != piece:
            raise ValueError(f"piece {token_id} is {pieces[token_id]!r}, expected {piece!r}")
    if len(set(pieces)) != len(pieces):
        raise ValueError("the SentencePiece vocabulary has duplicate pieces")
    return pieces


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().copy()


def _linear(spec: common_spec.LinearSpec, *layers: torch.nn.Linear) -> None:
    """One CT2 linear from one or more torch linears stacked along the output features."""
    spec.weight = _np(torch.cat([layer.weight for layer in layers]))
    spec.bias = _np(torch.cat([layer.bias for layer in layers]))


def _norm(spec: common_spec.LayerNormSpec, norm: torch.nn.LayerNorm) -> None:
    assert math.isclose(norm.eps, LAYER_NORM_EPS), "model.py's LayerNorm eps changed"
    spec.gamma, spec.beta = _np(norm.weight), _np(norm.bias)


def _ffn(spec, layer) -> None:
    _linear(spec.linear_0, layer.ffn.linear1)
    _linear(spec.linear_1, layer.ffn.linear2)
    _norm(spec.layer_norm, layer.ffn_block.norm)


def build_spec(model: Transformer, pieces: Sequence[str]) -> transformer_spec.TransformerSpec:
    """The TransformerSpec of `model` with every weight set (float32)."""
    cfg = model.cfg
    if cfg.pre_norm:
        raise ValueError("only post-norm models are mapped (the default model is post-norm)")
    spec = transformer_spec.TransformerSpec.from_config(
        (cfg.n_encoder_layers, cfg.n_decoder_layers),
        cfg.n_heads,
        pre_norm=False,
        activation=common_spec.Activation.RELU,
    )
    embedding, positions = _np(model.embedding.weight), _np(model.positions)
    spec.encoder.embeddings[0].weight = embedding
    spec.encoder.position_encodings.encodings = positions
    spec.decoder.embeddings.weight = embedding
    spec.decoder.position_encodings.encodings = positions
    spec.decoder.projection.weight = embedding  # tied, no bias
    for layer_spec, layer in zip(spec.encoder.layer, model.encoder_layers):
        attn = layer.self_attn
        _linear(layer_spec.self_attention.linear[0], attn.q_proj, attn.k_proj, attn.v_proj)
        _linear(layer_spec.self_attention.linear[1], attn.out_proj)
        _norm(layer_spec.self_attention.layer_norm, layer.attn_block.norm)
        _ffn(layer_spec.ffn, layer)
    for layer_spec, layer in zip(spec.decoder.layer, model.decoder_layers):
        own, cross = layer.self_attn, layer.cross_attn
        _linear(layer_spec.self_attention.linear[0], own.q_proj, own.k_proj, own.v_proj)
        _linear(layer_spec.self_attention.linear[1], own.out_proj)
        _norm(layer_spec.self_attention.layer_norm, layer.self_block.norm)
        _linear(layer_spec.attention.linear[0], cross.q_proj)
        _linear(layer_spec.attention.linear[1], cross.k_proj, cross.v_proj)
        _linear(layer_spec.attention.linear[2], cross.out_proj)
        _norm(layer_spec.attention.layer_norm, layer.cross_block.norm)
        _ffn(layer_spec.ffn, layer)
    config = spec.config
    config.layer_norm_epsilon = LAYER_NORM_EPS
    config.unk_token, config.bos_token, config.eos_token = (SPECIAL_PIECES[i] for i in (UNK_ID, BOS_ID, EOS_ID))
    config.decoder_start_token = SPECIAL_PIECES[BOS_ID]
    config.add_source_eos = True
    spec.register_source_vocabulary(list(pieces))
    spec.register_target_vocabulary(list(pieces))
    return spec


class _CheckpointConverter(Converter):
    def __init__(self, checkpoint_dir: Path):
        self.checkpoint_dir = checkpoint_dir

    def _load(self) -> transformer_spec.TransformerSpec:
        loaded = load_checkpoint(self.checkpoint_dir)
        return build_spec(loaded.model.eval(), vocabulary(loaded.tokenizer))


def write_vmap(bundle_dir: Path, pieces: Sequence[str], path: Path) -> Path:
    """The bundle's vocabulary shortlist (engine/shortlist.py) as CT2's vocabulary map: per source
    piece, its target list and the piece itself; the empty key lists the special and frequent pieces.
    CT2 then scores the same union per batch as our engine (its special ids are always in)."""
    from nmt.engine.bundle import read_manifest, shortlist_file
    from nmt.engine.shortlist import SPECIAL_IDS, load

    name = shortlist_file(read_manifest(bundle_dir))
    if name is None:
        raise ValueError(f"{bundle_dir} has no vocabulary shortlist")
    table = load(bundle_dir / name, len(pieces))
    lines = ["\t" + " ".join(pieces[i] for i in [*range(SPECIAL_IDS), *table.frequent.tolist()])]
    for source in range(len(pieces)):
        lines.append(f"{pieces[source]}\t" + " ".join(pieces[i] for i in [source, *table.targets_of(source).tolist()]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def convert_checkpoint(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    quantization: str = "float32",
    force: bool = False,
    vmap: Path | None = None,
) -> Path:
    """Write a CTranslate2 model directory (model.bin, config.json, vocabularies; vmap.txt when given)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise ValueError(f"{out_dir} exists; pass force=True (--force) to replace it")
    _CheckpointConverter(Path(checkpoint_dir)).convert(
        str(out_dir), quantization=quantization, force=force, vmap=None if vmap is None else str(vmap)
    )
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nmt.bench.ct2", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="training checkpoint directory")
    parser.add_argument("out_dir", help="CTranslate2 model directory to write")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="float32")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    try:
        convert_checkpoint(args.checkpoint, args.out_dir, args.quantization, args.force)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    print(args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
