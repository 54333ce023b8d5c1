"""Session fixtures: a tiny checkpoint (SentencePiece trained here on Multi30k lines) and its bundle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nmt.export.export import ExportOptions, export_checkpoint
from nmt.training.checkpoint import CheckpointMeta, load_checkpoint, write_checkpoint
from nmt.training.data import multi30k
from nmt.training.model import ModelConfig, Transformer
from nmt.training.tokenizer import Tokenizer

VOCAB = 600
N_ENC, N_DEC = 2, 2


@pytest.fixture(scope="session")
def checkpoint(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export_ckpt")
    corpus = multi30k("train", "en", "de", data_dir)
    Tokenizer.train(corpus.src[:300] + corpus.tgt[:300], root / "spm.model", vocab_size=VOCAB)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=N_ENC,
                      n_decoder_layers=N_DEC, dropout=0.0)
    return write_checkpoint(root / "ckpt", Transformer(cfg), root / "spm.model", CheckpointMeta("en", "de"))


@pytest.fixture(scope="session")
def model(checkpoint: Path) -> Transformer:
    return load_checkpoint(checkpoint).model.eval()


PARITY_LIMIT = 16


@pytest.fixture(scope="session")
def bundle_dir(checkpoint: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle every test reads: every variant, parity on the first PARITY_LIMIT sentences of
    Multi30k test_2016_flickr (never modified: tests that damage files copy it first)."""
    out = tmp_path_factory.mktemp("export_bundle") / "bundle"
    options = ExportOptions(max_len_extra=5, data_dir=str(data_dir), parity_limit=PARITY_LIMIT)
    export_checkpoint(checkpoint, out, options=options)
    return out
