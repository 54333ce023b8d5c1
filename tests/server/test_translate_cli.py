"""Translator (text in, text out, model info) and the nmt-translate CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nmt.engine.decoding import DecodeOptions
from nmt.engine.runtime import CPU, RuntimeConfig
from nmt.engine.translator import Translation, Translator
from nmt.server.translate import main

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["A dog runs through the grass.", "", "Two men are playing football in a park near the river.", "Hi"]


@pytest.fixture(scope="module")
def translator(server_bundle: Path) -> Translator:
    return Translator.from_bundle(server_bundle, RuntimeConfig(intra_op_threads=1))


def test_model_info(translator, server_bundle):
    manifest = json.loads((server_bundle / "manifest.json").read_text())
    info = translator.info
    name = manifest.get("name", "tiny-en-de")  # the bundle directory's name unless the manifest has one
    assert (info.name, info.src_lang, info.tgt_lang, info.vocab_size) == (name, "en", "de", 600)
    assert info.version == str(manifest.get("version") or manifest["source_checkpoint"]["sha256"][:12])
    assert info.bundle_sha256 == manifest["manifest_sha256"]
    assert (info.precision, info.provider) == ("fp32-cpu", CPU)


def test_translate_returns_n_best_texts_in_order(translator):
    options = DecodeOptions(beam_size=4, n_best=3, max_len_extra=6)
    found = translator.translate(TEXTS, options)
    real = [text for text in TEXTS if text]
    search = translator.search(translator.tokenize(real), options).hypotheses
    assert len(found) == len(TEXTS)
    assert found[TEXTS.index("")] == [Translation("", 0, 0.0, 0.0)]  # blank: no engine, one empty translation
    for translations, hyps in zip([f for f, text in zip(found, TEXTS) if text], search):
        assert len(translations) == 3 and all(isinstance(t, Translation) for t in translations)
        assert [t.text for t in translations] == translator.detokenize([h.tokens for h in hyps])
        assert [t.tokens for t in translations] == [len(h.tokens) for h in hyps]
        assert [t.normalized_score for t in translations] == [h.normalized_score for h in hyps]
    assert translator.translate([], options) == []
    assert translator.translate(["\u200b\ufeff\x00", " \t"], options) == [[Translation("", 0, 0.0, 0.0)]] * 2
    assert translator.detokenize(translator.tokenize(["A dog."])) == ["A dog."]


def run_main(
    argv: list[str], stdin: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_translates_stdin_in_order(translator, server_bundle, monkeypatch, capsys):
    args = [
        "--bundle",
        str(server_bundle),
        "--beam",
        "3",
        "--max-len-extra",
        "6",
        "--threads",
        "1",
        "--batch-size",
        "3",
        "--quiet",
    ]
    code, out, err = run_main(args, "\n".join(TEXTS) + "\n", monkeypatch, capsys)
    assert code == 0 and err == ""
    expected = [t[0].text for t in translator.translate(TEXTS, DecodeOptions(beam_size=3, max_len_extra=6))]
    assert out.split("\n")[:-1] == expected


def test_cli_n_best_format(translator, server_bundle, monkeypatch, capsys):
    args = [
        "--bundle",
        str(server_bundle),
        "--beam",
        "2",
        "--n-best",
        "2",
        "--length-penalty",
        "1.0",
        "--max-len-extra",
        "4",
        "--threads",
        "1",
        "--quiet",
    ]
    code, out, _ = run_main(args, "A dog.\nA cat.\n", monkeypatch, capsys)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4
    assert [line.split("\t")[0] for line in lines] == ["0", "0", "1", "1"]
    best = translator.translate(["A dog."], DecodeOptions(2, 1.0, 4, 2))[0]
    assert lines[0] == f"0\t{best[0].normalized_score:.4f}\t{best[0].text}"


def test_cli_bad_bundle_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    code, out, err = run_main(["--bundle", str(tmp_path), "--quiet"], "A dog.\n", monkeypatch, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("nmt-translate: error: not a bundle")


def test_cli_bad_options_exit_2(server_bundle, monkeypatch, capsys):
    for args in (["--beam", "2", "--n-best", "3"], ["--batch-size", "0"], ["--device", "tpu"]):
        with pytest.raises(SystemExit) as exit_info:
            run_main(["--bundle", str(server_bundle), *args], "", monkeypatch, capsys)
        assert exit_info.value.code == 2


def test_console_script_end_to_end(server_bundle):
    """A real process: stdin lines in, the same number of lines out, log line on stderr."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "nmt.server.translate",
            "--bundle",
            str(server_bundle),
            "--beam",
            "2",
            "--max-len-extra",
            "4",
            "--threads",
            "1",
        ],
        input="A dog runs.\n\nTwo men.\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3
    assert "variant fp32-cpu on CPUExecutionProvider" in result.stderr
