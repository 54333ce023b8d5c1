from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from export import bundle
from export.cli import main


def test_cli_verifies_a_bundle(bundle_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--verify", str(bundle_dir)]) == 0
    assert capsys.readouterr().out == f"{bundle_dir}: 5 files verified\n"


def test_cli_reports_a_damaged_bundle(bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    damaged = Path(shutil.copytree(bundle_dir, tmp_path / "b"))
    (damaged / bundle.TOKENIZER).write_bytes(b"not a model")
    assert main(["--verify", str(damaged)]) == 1
    assert f"  {bundle.TOKENIZER}: size 11 bytes, manifest says" in capsys.readouterr().err


def test_cli_refuses_to_overwrite(checkpoint: Path, bundle_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(checkpoint), str(bundle_dir)]) == 2
    assert capsys.readouterr().err == f"error: {bundle_dir} already exists; pass force=True (--force) to replace it\n"


def test_cli_needs_both_paths(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["only-one"])
    assert e.value.code == 2
    assert "CHECKPOINT and OUT are required (or --verify BUNDLE)" in capsys.readouterr().err
