from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest

from nmt.engine import bundle
from nmt.export.cli import main, options_from_args, parser
from nmt.export.export import ExportOptions, Progress


def test_cli_verifies_a_bundle(bundle_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--verify", str(bundle_dir)]) == 0
    assert (
        capsys.readouterr().out == f"{bundle_dir}: 14 files verified\n"
    )  # 8 graphs, 4 step decoders, spm.model, shortlist.npz


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


def _options(*flags: str) -> ExportOptions:
    return options_from_args(parser().parse_args(["ckpt", "out", *flags]))


def test_cli_flags_become_export_options(tmp_path: Path) -> None:
    assert _options() == ExportOptions(progress=True)
    assert _options("--variants", "int8-cpu", "--quiet").variants == ("fp32", "int8-cpu")
    assert _options("--quiet").progress is False
    assert _options("--no-optimize").variants == ("fp32",)
    assert _options("--no-shortlist").shortlist is False
    assert _options("--shortlist-corpus", "a.en", "a.de").shortlist_corpus == ("a.en", "a.de")
    options = _options(
        "--data-dir", "/d", "--parity-limit", "7", "--max-len-extra", "9", "--no-validate", "--attention", "mha"
    )
    assert (options.data_dir, options.parity_limit, options.max_len_extra) == ("/d", 7, 9)
    assert (options.validate, options.attention) == (False, "mha")
    (tmp_path / "s.txt").write_text("One.\n\nTwo.\n")
    assert _options("--sentences", str(tmp_path / "s.txt")).sentences == ("One.", "Two.")


def test_cli_refuses_bad_variants_and_limits(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "b")
    assert main([str(checkpoint), out, "--variants", "int4"]) == 2
    assert capsys.readouterr().err == (
        "error: unknown variant 'int4'; choose from fp32, fp32-cpu, int8-cpu, fp16-cuda (or all)\n"
    )
    assert main([str(checkpoint), out, "--parity-limit", "0"]) == 2
    assert capsys.readouterr().err == "error: parity_limit must be at least 1, got 0\n"
    with pytest.raises(SystemExit):
        main([str(checkpoint), out, "--variants", "int8-cpu", "--no-optimize"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run_steps(progress: Progress) -> None:
    for label in ("export encoder", "write manifest"):
        with progress.step(label):
            pass
    progress.close()


def test_the_progress_bar_shows_on_a_terminal_only_unless_quiet() -> None:
    terminal, pipe, quiet = _Terminal(), io.StringIO(), _Terminal()
    _run_steps(Progress(2, enabled=True, stream=terminal))
    _run_steps(Progress(2, enabled=True, stream=pipe))
    _run_steps(Progress(2, enabled=_options("--quiet").progress, stream=quiet))
    assert "2/2" in terminal.getvalue() and "write manifest" in terminal.getvalue()
    assert pipe.getvalue() == quiet.getvalue() == ""
