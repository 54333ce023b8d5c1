"""Session fixtures: a tiny checkpoint (SentencePiece trained here on Multi30k lines) and its bundle."""

from __future__ import annotations

from pathlib import Path

import pytest
from model_fixtures import tiny_checkpoint

from nmt.export.export import ExportOptions, export_checkpoint
from nmt.training.checkpoint import load_checkpoint
from nmt.training.model import Transformer

N_ENC = 2  # encoder and decoder layers


@pytest.fixture(scope="session")
def checkpoint(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("export_ckpt"), data_dir, layers=N_ENC)


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
