"""nmt-train / nmt-eval end to end on a slice of Multi30k with a very small model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nmt.training import checkpoint, evaluate, train, tune_inference
from nmt.training.checkpoint import InferenceSettings
from nmt.training.data import multi30k
from nmt.training.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "--d-model",
    "32",
    "--n-heads",
    "2",
    "--d-ff",
    "64",
    "--n-encoder-layers",
    "1",
    "--n-decoder-layers",
    "1",
    "--dropout",
    "0.1",
    "--max-tokens",
    "512",
    "--warmup",
    "20",
    "--no-progress",
]


@pytest.fixture(scope="module")
def corpus(data_dir, tmp_path_factory) -> dict[str, str]:
    """Plain-text slices of Multi30k and a tokenizer trained on them."""
    folder = tmp_path_factory.mktemp("corpus")
    files = {}
    for split, n in (("train", 240), ("val", 16)):
        pairs = multi30k(split, "en", "de", data_dir)
        for lang, lines in (("en", pairs.src[:n]), ("de", pairs.tgt[:n])):
            path = folder / f"{split}.{lang}"
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
            files[f"{split}.{lang}"] = str(path)
    train_pairs = multi30k("train", "en", "de", data_dir)
    Tokenizer.train(train_pairs.src[:2000] + train_pairs.tgt[:2000], folder / "spm.model", vocab_size=600)
    files["spm"] = str(folder / "spm.model")
    return files


def run_args(corpus: dict[str, str], out: Path, *extra: str) -> list[str]:
    return [
        "--out",
        str(out),
        "--train-src",
        corpus["train.en"],
        "--train-tgt",
        corpus["train.de"],
        "--valid-src",
        corpus["val.en"],
        "--valid-tgt",
        corpus["val.de"],
        "--tokenizer",
        corpus["spm"],
        "--vocab-size",
        "600",
        *SMALL,
        *extra,
    ]


def epochs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"epoch"' in line]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def test_a_run_writes_checkpoints_metrics_and_plot(corpus, tmp_path):
    out = tmp_path / "run"
    assert train.main(run_args(corpus, out, "--max-epochs", "2", "--average-last", "2")) == 0
    for name in ("last", "best", "averaged", "final"):
        assert (out / name / "model.safetensors").is_file() and (out / name / "spm.model").is_file()
    records = epochs(out)
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [1, 2]
    assert records[1]["train_loss"] < records[0]["train_loss"] - 0.2  # a short run on a slice learns
    assert all({"train_loss", "valid_loss", "valid_bleu", "lr", "tokens_per_s"} <= r.keys() for r in records)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = checkpoint.load_checkpoint(out / "final")
    assert loaded.model.cfg.d_model == 32 and loaded.meta.src_lang == "en"


@pytest.mark.parametrize("interrupt", [["--max-epochs", "1"], ["--max-steps", "3"]], ids=["epoch-end", "mid-epoch"])
def test_resumed_run_equals_uninterrupted_run(corpus, tmp_path, interrupt):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train.main(run_args(corpus, whole, "--max-epochs", "2")) == 0
    assert train.main(run_args(corpus, parts, *interrupt)) == 0
    assert train.main(run_args(corpus, parts, "--max-epochs", "2", "--resume")) == 0
    last_whole, last_parts = epochs(whole)[-1], epochs(parts)[-1]
    assert last_parts["epoch"] == last_whole["epoch"] == 2 and last_parts["step"] == last_whole["step"]
    assert last_parts["valid_loss"] == pytest.approx(last_whole["valid_loss"], abs=1e-6)
    a, b = weights(whole / "last"), weights(parts / "last")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_refuses_to_overwrite_a_run_without_force(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert train.main(run_args(corpus, out, "--max-epochs", "1")) == 2
    assert f"run directory {out} is not empty; pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_data_errors_reach_the_user(corpus, tmp_path, capsys):
    short = tmp_path / "short.de"
    short.write_text("nur eine Zeile\n")
    args = run_args(corpus, tmp_path / "run", "--max-epochs", "1")
    args[args.index("--train-tgt") + 1] = str(short)
    assert train.main(args) == 2
    assert f"line-count mismatch: {corpus['train.en']} has 240 lines but {short} has 1" in capsys.readouterr().err


def test_eval_prints_sacrebleu_scores_and_signatures(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(run_args(corpus, out, "--max-epochs", "1")) == 0
    capsys.readouterr()
    hyps = tmp_path / "hyps.txt"
    code = evaluate.main(
        [
            "--checkpoint",
            str(out / "final"),
            "--src",
            corpus["val.en"],
            "--ref",
            corpus["val.de"],
            "--beam",
            "2",
            "--json",
            "--output",
            str(hyps),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert {"bleu", "bleu_lowercase", "chrf"} <= result.keys()
    assert "case:mixed" in result["bleu_signature"] and "tok:13a" in result["bleu_signature"]
    assert "case:lc" in result["bleu_lowercase_signature"]
    assert len(hyps.read_text().splitlines()) == 16


def test_fp16_copy_of_a_checkpoint_loads_close_to_fp32(corpus, tmp_path):
    out = tmp_path / "run"
    assert train.main(run_args(corpus, out, "--max-epochs", "1")) == 0
    assert checkpoint.main([str(out / "final"), str(tmp_path / "half"), "--dtype", "float16"]) == 0
    assert checkpoint.main([str(out / "final"), str(tmp_path / "half"), "--dtype", "float16"]) == 2  # no --force
    full, half = checkpoint.load_checkpoint(out / "final"), checkpoint.load_checkpoint(tmp_path / "half")
    assert next(iter(weights(tmp_path / "half").values())).dtype == torch.float16
    src = torch.tensor([[10, 11, 12, 3]])
    with torch.no_grad():
        a = full.model(src, src != 0, torch.tensor([[2, 20]]))
        b = half.model(src, src != 0, torch.tensor([[2, 20]]))
    torch.testing.assert_close(a, b, rtol=0, atol=5e-2)


def test_torchrun_two_process_gloo_smoke(corpus, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "nmt.training.train",
        *run_args(corpus, out, "--max-epochs", "1", "--device", "cpu"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world 2" in done.stderr
    assert [r["epoch"] for r in epochs(out)] == [1]
    assert (out / "final" / "model.safetensors").is_file()


def test_inference_settings_travel_with_the_checkpoint(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(run_args(corpus, out, "--max-epochs", "1", "--beam", "3", "--length-penalty", "1.2")) == 0
    assert checkpoint.load_checkpoint(out / "final").inference == InferenceSettings(3, 1.2)
    capsys.readouterr()
    common = ["--checkpoint", str(out / "final"), "--src", corpus["val.en"], "--ref", corpus["val.de"], "--json"]
    assert evaluate.main(common) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["beam"], result["alpha"]) == (3, 1.2)  # the checkpoint's settings are the defaults
    assert evaluate.main([*common, "--beam", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["beam"] == 1  # a flag overrides them


def test_tune_inference_stores_the_best_setting_of_the_sweep(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(run_args(corpus, out, "--max-epochs", "1")) == 0
    data = Path(corpus["val.en"]).parent  # holds val.en / val.de: any split name in a directory works
    args = [
        "--checkpoint",
        str(out / "final"),
        "--data-dir",
        str(data),
        "--beams",
        "1,2",
        "--alphas",
        "0.6,1.0",
        "--json",
        str(tmp_path / "sweep.json"),
    ]
    assert tune_inference.main([*args, "--write"]) == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert [(r["beam"], r["alpha"]) for r in sweep["rows"]] == [(1, 0.6), (2, 0.6), (2, 1.0)]
    best = max(sweep["rows"], key=lambda r: (r["bleu"], -r["beam"], -r["alpha"]))
    config = checkpoint.read_config(out / "final")
    assert config["inference"] == {"beam_size": best["beam"], "length_penalty": best["alpha"], "max_len_extra": 50}
    assert config["info"]["inference_tuned_on"] == "val"
    with pytest.raises(SystemExit) as refused:
        tune_inference.main([*args[:4], "--split", "test_2016_flickr"])
    assert refused.value.code == 2  # never tuned on a test set
    assert "tune on a validation split, not a test set" in capsys.readouterr().err


def test_checkpoints_without_inference_settings_get_the_old_defaults(corpus, tmp_path):
    out = tmp_path / "run"
    assert train.main(run_args(corpus, out, "--max-epochs", "1")) == 0
    config_path = out / "final" / "config.json"
    config = json.loads(config_path.read_text())
    del config["inference"]
    config_path.write_text(json.dumps(config))
    assert checkpoint.load_checkpoint(out / "final").inference == InferenceSettings(4, 0.6, 50)
