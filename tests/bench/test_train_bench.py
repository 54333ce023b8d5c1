"""`nmt-bench train` end to end on a slice: every row trains, the report names the CPU."""

from __future__ import annotations

import json

from nmt.bench.cli import main
from nmt.training.cpu import cpu_summary


def test_train_bench_writes_rows_and_cpu(data_dir, tmp_path, capsys):
    out = tmp_path / "results"
    args = [
        "train",
        "--presets",
        "tiny",
        "--budgets",
        "1024",
        "--precisions",
        "fp32,bf16-out",
        "--no-compile",
        "--steps",
        "1",
        "--warmup-steps",
        "1",
        "--sentences",
        "2000",
        "--vocab-size",
        "500",
        "--threads",
        "1",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    result = json.loads((out / "train.json").read_text())
    assert [(r["step"], r["precision"]) for r in result["rows"]] == [
        ("legacy", "fp32"),
        ("current", "fp32"),
        ("current", "bf16-out"),
    ]
    assert all(r["tokens_per_s"] > 0 and r["steps"] == 1 for r in result["rows"])
    report = (out / "train.md").read_text()
    assert f"CPU: {cpu_summary()}" in report and "| tiny | 1024 | legacy | fp32 | no |" in report
    assert not (out / "bench-spm-500.model").exists()  # the scratch tokenizer is removed
