"""Session fixtures for the engine tests: a tiny checkpoint that stops at varied lengths, its bundle
(and the same bundle as format 2 wrote it, without past_mask), the torch model (the reference), and
ORT sessions on the bundle (one thread).

A random tiny model almost never emits EOS (1 of 600 tokens), so every hypothesis would run to
the length limit and the beam's finalize rule would go untested. Scaling the EOS embedding row
(tied with the output projection) makes EOS likely at some steps and not others: hypotheses
then end at many lengths, and the length penalty reorders them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from nmt.engine import bundle
from nmt.engine.decoding import Decoder
from nmt.engine.runtime import RuntimeConfig, Sessions, load_sessions
from nmt.export.export import ExportOptions, export_checkpoint
from nmt.training.checkpoint import CheckpointMeta, load_checkpoint, write_checkpoint
from nmt.training.data import multi30k
from nmt.training.model import ModelConfig, Transformer
from nmt.training.tokenizer import EOS_ID, Tokenizer

VOCAB = 600
EOS_SCALE = 3.0
# per_row_decoder: the engine tests' running batches use the per-row step decoder, as nmt-serve --batching continuous
ONE_THREAD = RuntimeConfig(device="cpu", intra_op_threads=1, inter_op_threads=1, per_row_decoder=True)


def tiny_checkpoint(root: Path, data_dir: Path, layers: int = 2, eos_scale: float = 1.0) -> Path:
    """A random d_model-32 model (seed 0) with a 600-piece SentencePiece trained on 600 Multi30k lines."""
    corpus = multi30k("train", "en", "de", data_dir)
    Tokenizer.train(corpus.src[:300] + corpus.tgt[:300], root / "spm.model", vocab_size=VOCAB)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=VOCAB, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=layers, n_decoder_layers=layers, dropout=0.0
    )
    model = Transformer(cfg)
    with torch.no_grad():
        model.embedding.weight[EOS_ID] *= eos_scale
    return write_checkpoint(root / "ckpt", model, root / "spm.model", CheckpointMeta("en", "de"))


@pytest.fixture(scope="session")
def server_checkpoint(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("server_ckpt"), data_dir, eos_scale=EOS_SCALE)


@pytest.fixture(scope="session")
def server_bundle(server_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Never modified: tests that damage or rewrite a bundle copy it first."""
    out = tmp_path_factory.mktemp("server_bundle") / "tiny-en-de"
    # No shortlist: these tests compare the engine with torch over the whole vocabulary.
    export_checkpoint(server_checkpoint, out, options=ExportOptions(validate=False, shortlist=False))
    return out


@pytest.fixture(scope="session")
def torch_model(server_checkpoint: Path) -> Transformer:
    return load_checkpoint(server_checkpoint).model.eval()


@pytest.fixture(scope="session")
def tokenizer(server_checkpoint: Path) -> Tokenizer:
    return Tokenizer.load(server_checkpoint / "spm.model")


@pytest.fixture(scope="session")
def sessions(server_bundle: Path) -> Sessions:
    return load_sessions(server_bundle, ONE_THREAD)


@pytest.fixture(scope="session")
def decoder(sessions: Sessions) -> Decoder:
    return Decoder(sessions)


@pytest.fixture(scope="session")
def sources(tokenizer: Tokenizer, data_dir: Path) -> list[list[int]]:
    """Real sentences of many lengths, a one-token source and an empty one."""
    lines = multi30k("val", "en", "de", data_dir).src[:10]
    return [*tokenizer.encode(lines), [17], []]


def without_past_mask(decoder: onnx.ModelProto) -> onnx.ModelProto:
    """The format-2 interface: past_mask computed inside (all True) instead of taken as an input."""
    graph = decoder.graph
    inputs = [i for i in graph.input if i.name != bundle.PAST_MASK]
    del graph.input[:]
    graph.input.extend(inputs)
    true = helper.make_tensor("true", TensorProto.BOOL, [1], [True])
    nodes = [
        helper.make_node("Shape", ["tgt_ids"], ["pm_batch"], start=0, end=1),
        helper.make_node("Shape", ["tgt_ids"], ["pm_tgt"], start=1, end=2),
        helper.make_node("Shape", ["past_key_0"], ["pm_past"], start=2, end=3),
        helper.make_node("Add", ["pm_past", "pm_tgt"], ["pm_width"]),
        helper.make_node("Concat", ["pm_batch", "pm_width"], ["pm_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["pm_shape"], [bundle.PAST_MASK], value=true),
    ]
    for node in reversed(nodes):
        graph.node.insert(0, node)
    return decoder


@pytest.fixture(scope="session")
def format2_bundle(server_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test bundle as format 2 wrote it: every decoder without past_mask, manifest version 2."""
    out = Path(shutil.copytree(server_bundle, tmp_path_factory.mktemp("format2") / "bundle"))
    manifest = json.loads((out / bundle.MANIFEST).read_text())
    for entry in manifest["variants"].values():
        for role in ("step_decoder", "rows_decoder"):  # format 2 had neither
            if role in entry:
                (out / entry[role]).unlink()
                manifest["files"].pop(entry.pop(role))
        path = out / entry["decoder"]
        onnx.save(without_past_mask(onnx.load(str(path))), str(path))
        manifest["files"][entry["decoder"]] = {"sha256": bundle.sha256_file(path), "size": path.stat().st_size}
    manifest["format_version"] = 2
    manifest["interface"]["decoder"]["inputs"].pop(bundle.PAST_MASK)
    manifest[bundle.SELF_HASH] = bundle.content_hash(manifest)
    (out / bundle.MANIFEST).write_text(json.dumps(manifest))
    return out
