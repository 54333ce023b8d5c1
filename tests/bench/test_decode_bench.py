"""`nmt-bench decode` end to end on a tiny checkpoint: every engine runs and gets a row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("ctranslate2")

from nmt.bench import cli, decode  # noqa: E402
from nmt.bench.flops import encoder_flops  # noqa: E402
from nmt.training.checkpoint import CheckpointMeta, write_checkpoint  # noqa: E402
from nmt.training.data import multi30k  # noqa: E402
from nmt.training.model import ModelConfig, Transformer  # noqa: E402
from nmt.training.tokenizer import Tokenizer  # noqa: E402

SENTENCES = 6


@pytest.fixture(scope="module")
def tiny_checkpoint(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench_tiny")
    corpus = multi30k("train", "en", "de", data_dir)
    Tokenizer.train(corpus.src[:300] + corpus.tgt[:300], root / "spm.model", vocab_size=600)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=600, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2,
                      dropout=0.0)
    return write_checkpoint(root / "ckpt", Transformer(cfg), root / "spm.model", CheckpointMeta("en", "de"))


def _args(checkpoint: Path, data_dir: Path, root: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--data-dir", str(data_dir), "--sentences", str(SENTENCES),
            "--batch-sizes", "1,4", "--max-len-extra", "4", "--threads", "1", "--sgemm-size", "256", "--no-parity",
            "--cache-dir", str(root / "cache"), "--out", str(root / "results"), *extra]


def test_decode_bench_end_to_end(tiny_checkpoint: Path, data_dir: Path, tmp_path: Path) -> None:
    assert cli.main(["decode", *_args(tiny_checkpoint, data_dir, tmp_path)]) == 0
    out = tmp_path / "results"
    results = json.loads((out / "decode.json").read_text())
    assert results["skipped"] == {}
    assert results["engines"] == list(decode.ENGINES)
    assert results["variants"]["ort-fp32"] == "fp32-cpu" and results["variants"]["ort-int8"] == "int8-cpu"
    cells = {(r["engine"], r["mode"], r["batch_size"]): r for r in results["decode"]}
    assert set(cells) == {(e, m, b) for e in decode.ENGINES for m in ("greedy", "beam4") for b in (1, 4)}
    for row in cells.values():
        assert row["sentences"] == SENTENCES and row["tokens_per_s"] > 0 and row["p50_ms"] > 0
    # Same rules in fp32: the same outputs (CT2's beam differs at the length limit, which this
    # random model reaches).
    for engine, modes in {"ort-fp32": ("greedy", "beam4"), "ort-fp32-unfused": ("greedy", "beam4"),
                          "ct2-float32": ("greedy",)}.items():
        for mode in modes:
            assert cells[(engine, mode, 4)]["identical_to_torch"] == SENTENCES, (engine, mode)
    # The shortlist and CT2's vocabulary map built from it score the same ids: the same greedy outputs.
    assert results["variants"]["ort-fp32-shortlist"] == "fp32-cpu, shortlist"
    assert results["variants"]["ct2-float32-vmap"] == "float32, vmap"
    for size in (1, 4):
        assert (cells[("ort-fp32-shortlist", "greedy", size)]["identical_to_torch"]
                == cells[("ct2-float32-vmap", "greedy", size)]["identical_to_torch"])
    assert {(r["engine"], r["batch_size"]) for r in results["encoder"]} == {(e, b) for e in decode.ENGINES for b in (1, 4)}
    table = (out / "decode.md").read_text()
    for engine in decode.ENGINES:
        assert f"| {engine} |" in table
    assert "ORT fp32 fused / torch" in table and (out / "decode.png").stat().st_size > 0
    # A second run reuses the cached bundles, and refuses to replace the results without --force.
    assert cli.main(["decode", *_args(tiny_checkpoint, data_dir, tmp_path)]) == 2


def test_bad_arguments_exit_2(tiny_checkpoint: Path, data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["decode", *_args(tiny_checkpoint, data_dir, tmp_path, "--engines", "torch,tensorrt")])
    assert exit_info.value.code == 2


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown engines: tensorrt"):
        decode.DecodeBenchConfig(engines=("tensorrt",))
    with pytest.raises(ValueError, match=r"batch sizes must be at least 1, got \[0\]"):
        decode.DecodeBenchConfig(batch_sizes=(0,))


def test_encoder_flops_counts_every_matmul() -> None:
    cfg = ModelConfig(vocab_size=10, d_model=4, n_heads=2, d_ff=8, n_encoder_layers=1, n_decoder_layers=1)
    # B=1, S=2, d=4, d_ff=8: projections 4·2·2·16, attention 2·2·1·4·4, FFN 2·2·2·4·8, cross K/V 2·2·2·16
    assert encoder_flops(cfg, 1, 2) == 256 + 64 + 256 + 128
