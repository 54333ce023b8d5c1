from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Test models are tiny: one thread is as fast, and it keeps the subprocesses that some tests
# start (torchrun workers) from fighting over the cores.
torch.set_num_threads(1)

# Model and bundle fixtures shared by tests/engine, tests/server and tests/export.
pytest_plugins = ["model_fixtures", "export_fixtures"]

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "multi30k"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The local Multi30k copy ($NMT_DATA_DIR, else the shared one beside the checkout)."""
    path = Path(os.environ.get("NMT_DATA_DIR") or SHARED_DATA)
    if not (path / "train.en.gz").is_file():
        pytest.skip(f"Multi30k not found at {path}; set NMT_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def tiny_bundle(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1+1-layer random model exported fp32-only without parity: fast, for server-level tests."""
    from model_fixtures import tiny_checkpoint

    from nmt.export.export import ExportOptions, export_checkpoint

    root = tmp_path_factory.mktemp("tiny_model")
    ckpt = tiny_checkpoint(root, data_dir, layers=1)
    export_checkpoint(ckpt, root / "bundle", options=ExportOptions(variants=("fp32",), validate=False, shortlist=False))
    return root / "bundle"
