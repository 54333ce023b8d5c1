"""Session fixtures for the engine tests: a tiny checkpoint that stops at varied lengths, its bundle,
the torch model (the reference), and ORT sessions on the bundle (one thread).

A random tiny model almost never emits EOS (1 of 600 tokens), so every hypothesis would run to
the length limit and the beam's finalize rule would go untested. Scaling the EOS embedding row
(tied with the output projection) makes EOS likely at some steps and not others: hypotheses
then end at many lengths, and the length penalty reorders them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nmt.export.export import ExportOptions, export_checkpoint
from nmt.engine.decoding import Decoder
from nmt.engine.runtime import RuntimeConfig, Sessions, load_sessions
from nmt.training.checkpoint import CheckpointMeta, load_checkpoint, write_checkpoint
from nmt.training.data import multi30k
from nmt.training.model import ModelConfig, Transformer
from nmt.training.tokenizer import EOS_ID, Tokenizer

VOCAB = 600
EOS_SCALE = 3.0
ONE_THREAD = RuntimeConfig(device="cpu", intra_op_threads=1, inter_op_threads=1)


@pytest.fixture(scope="session")
def server_checkpoint(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("server_ckpt")
    corpus = multi30k("train", "en", "de", data_dir)
    Tokenizer.train(corpus.src[:300] + corpus.tgt[:300], root / "spm.model", vocab_size=VOCAB)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2,
                      dropout=0.0)
    model = Transformer(cfg)
    with torch.no_grad():
        model.embedding.weight[EOS_ID] *= EOS_SCALE
    return write_checkpoint(root / "ckpt", model, root / "spm.model", CheckpointMeta("en", "de"))


@pytest.fixture(scope="session")
def server_bundle(server_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Never modified: tests that damage or rewrite a bundle copy it first."""
    out = tmp_path_factory.mktemp("server_bundle") / "tiny-en-de"
    export_checkpoint(server_checkpoint, out, options=ExportOptions(validate=False))
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
