from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Test models are tiny: one thread is as fast, and it keeps the subprocesses that some tests
# start (torchrun workers) from fighting over the cores.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "multi30k"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The local Multi30k copy ($NMT_DATA_DIR, else the shared one beside the checkout)."""
    path = Path(os.environ.get("NMT_DATA_DIR") or SHARED_DATA)
    if not (path / "train.en.gz").is_file():
        pytest.skip(f"Multi30k not found at {path}; set NMT_DATA_DIR")
    return path
