"""`nmt-bench decode` end to end on a tiny checkpoint: every engine runs and gets a row."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

pytest.importorskip("ctranslate2")

from nmt.bench import cli, ct2, decode, engines  # noqa: E402
from nmt.bench.flops import encoder_flops  # noqa: E402
from nmt.engine import bundle  # noqa: E402
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
    cfg = ModelConfig(
        vocab_size=600, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2, dropout=0.0
    )
    return write_checkpoint(root / "ckpt", Transformer(cfg), root / "spm.model", CheckpointMeta("en", "de"))


def _args(checkpoint: Path, data_dir: Path, root: Path, *extra: str) -> list[str]:
    return [
        "--checkpoint",
        str(checkpoint),
        "--data-dir",
        str(data_dir),
        "--sentences",
        str(SENTENCES),
        "--batch-sizes",
        "1,4",
        "--max-len-extra",
        "4",
        "--threads",
        "1",
        "--sgemm-size",
        "256",
        "--no-parity",
        "--cache-dir",
        str(root / "cache"),
        "--out",
        str(root / "results"),
        *extra,
    ]


def test_decode_bench_end_to_end(tiny_checkpoint: Path, data_dir: Path, tmp_path: Path) -> None:
    assert cli.main(["decode", *_args(tiny_checkpoint, data_dir, tmp_path)]) == 0
    out = tmp_path / "results"
    results = json.loads((out / "decode.json").read_text())
    assert results["skipped"] == {}
    assert results["engines"] == list(decode.ENGINES)
    assert results["variants"]["ort-fp32"] == "fp32-cpu, step decoder"
    assert results["variants"]["ort-int8"] == "int8-cpu, step decoder"
    cells = {(r["engine"], r["mode"], r["batch_size"]): r for r in results["decode"]}
    assert set(cells) == {(e, m, b) for e in decode.ENGINES for m in ("greedy", "beam4") for b in (1, 4)}
    for row in cells.values():
        assert row["sentences"] == SENTENCES and row["tokens_per_s"] > 0 and row["p50_ms"] > 0
    # Same rules in fp32: the same outputs (CT2's beam differs at the length limit, which this
    # random model reaches).
    for engine, modes in {
        "ort-fp32": ("greedy", "beam4"),
        "ort-fp32-unfused": ("greedy", "beam4"),
        "ct2-float32": ("greedy",),
    }.items():
        for mode in modes:
            assert cells[(engine, mode, 4)]["identical_to_torch"] == SENTENCES, (engine, mode)
    # The shortlist and CT2's vocabulary map built from it score the same ids: the same greedy outputs.
    assert results["variants"]["ort-fp32-shortlist"] == "fp32-cpu, step decoder, shortlist"
    assert results["variants"]["ct2-float32-vmap"] == "float32, vmap"
    for size in (1, 4):
        assert (
            cells[("ort-fp32-shortlist", "greedy", size)]["identical_to_torch"]
            == cells[("ct2-float32-vmap", "greedy", size)]["identical_to_torch"]
        )
    assert {(r["engine"], r["batch_size"]) for r in results["encoder"]} == {
        (e, b) for e in decode.ENGINES for b in (1, 4)
    }
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


# --- --device cuda -------------------------------------------------------------------------------


def _no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctranslate2
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(ctranslate2, "get_cuda_device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cuda_without_cuda_exits_2_in_one_line(
    tiny_checkpoint: Path,
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _no_cuda(monkeypatch)
    assert cli.main(["decode", *_args(tiny_checkpoint, data_dir, tmp_path, "--device", "cuda")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("error: --device cuda cannot run here: no CUDA device is visible")
    assert "has no CUDAExecutionProvider" in err and err.endswith("use --device cpu")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "results").exists()  # before any work


def test_cuda_problem_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctranslate2

    _no_cuda(monkeypatch)
    assert "no CUDA device is visible" in engines.cuda_problem(("torch",))
    monkeypatch.setattr(ctranslate2, "get_cuda_device_count", lambda: 1)
    assert engines.cuda_problem(("ct2-float16",)) is None  # CT2 alone needs no onnxruntime-gpu
    assert engines.cuda_problem(("ort-fp16", "ct2-float16")).startswith("onnxruntime ")


def test_engine_selection_per_device() -> None:
    assert decode.DecodeBenchConfig().engines == decode.ENGINES  # the CPU default is unchanged
    cuda = decode.DecodeBenchConfig(device="cuda").engines
    assert {"ort-fp32", "ort-fp16", "ct2-float16", "ct2-float32"} <= set(cuda)
    assert not {"ort-int8", "ort-int8-shortlist"} & set(cuda)
    assert decode.ORT_ENGINES["ort-fp16"] == ("fused", "fp16", False, True)
    assert decode.CT2_ENGINES["ct2-float16"] == ("float16", False)
    # The cuda bundle must carry fp16-cuda; fp32 on CUDA is the portable fp32 variant every bundle has.
    assert decode.needed_variants(cuda, "fused") == ("fp16-cuda",)
    assert decode.needed_variants(decode.ENGINES, "fused") == ("int8-cpu",)
    assert decode.needed_variants(("ort-fp32", "ct2-float32"), "fused") == ()
    with pytest.raises(ValueError, match=r"^engines not for device cpu: ort-fp16 \(cuda only\), ct2-float16 \(cuda"):
        decode.DecodeBenchConfig(engines=("torch", "ort-fp16", "ct2-float16"))
    with pytest.raises(ValueError, match=r"^engines not for device cuda: ort-int8 \(cpu only\)$"):
        decode.DecodeBenchConfig(device="cuda", engines=("ort-fp32", "ort-int8"))
    with pytest.raises(ValueError, match=r"^device must be one of cpu, cuda, got 'tpu'$"):
        decode.DecodeBenchConfig(device="tpu")


def test_runtime_picks_the_variants_the_cuda_engines_name() -> None:
    from nmt.engine.runtime import CUDA, choose_variant

    variants = {
        "fp32": {"providers": [CUDA, "CPUExecutionProvider"]},
        "fp16-cuda": {"providers": [CUDA]},
        "fp32-cpu": {"providers": ["CPUExecutionProvider"]},
    }
    assert choose_variant(variants, "fp32", [CUDA]) == ("fp32", CUDA)
    assert choose_variant(variants, "fp16", [CUDA]) == ("fp16-cuda", CUDA)


def test_ct2_float16_conversion(tiny_checkpoint: Path, tmp_path: Path) -> None:
    assert "float16" in ct2.QUANTIZATIONS
    out = ct2.convert_checkpoint(tiny_checkpoint, tmp_path / "ct2-float16", "float16")
    assert (out / "model.bin").stat().st_size > 0


def _has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers() and engines._ct2_cuda_devices() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs onnxruntime's CUDAExecutionProvider and a GPU CTranslate2 sees")
def test_decode_bench_on_cuda(tiny_checkpoint: Path, data_dir: Path, tmp_path: Path) -> None:
    names = ["ort-fp32", "ort-fp16", "ct2-float32", "ct2-float16"]
    names = (["torch"] if torch.cuda.is_available() else []) + names
    args = _args(tiny_checkpoint, data_dir, tmp_path, "--device", "cuda", "--engines", ",".join(names))
    assert cli.main(["decode", *args]) == 0
    results = json.loads((tmp_path / "results" / "decode.json").read_text())
    assert results["engines"] == names and results["skipped"] == {}
    assert results["variants"]["ort-fp32"] == "fp32 on CUDA" and results["variants"]["ort-fp16"] == "fp16-cuda on CUDA"
    assert results["variants"]["ct2-float16"] == "float16 on cuda"
    assert results["machine"]["device"] == "cuda" and results["sgemm_gflops"] is None
    assert {r["engine"] for r in results["decode"]} == set(names)
    assert all(r["tokens_per_s"] > 0 and r["fraction_of_peak"] is None for r in results["encoder"])
    assert "ORT fp16 / CT2 float16" in (tmp_path / "results" / "decode.md").read_text()


def test_cached_bundle_is_reused_while_it_has_the_variants(
    tiny_checkpoint: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fused"
    decode.ensure_bundle(tiny_checkpoint, out, None, ("fp16-cuda",), parity=False, data_dir=data_dir)
    assert "exporting" in capsys.readouterr().err
    decode.ensure_bundle(tiny_checkpoint, out, None, ("fp16-cuda", "int8-cpu"), parity=False, data_dir=data_dir)
    assert "exporting" not in capsys.readouterr().err  # every variant is exported: reused
    manifest = json.loads((out / bundle.MANIFEST).read_text())
    manifest["variants"].pop("fp16-cuda")  # re-hashed as nmt-export writes it (tests/bundle_edit.py)
    bundle.write_manifest(
        out, {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files", bundle.SELF_HASH)}
    )
    bundle.verify_bundle(out)  # still a valid bundle: only the missing variant calls for a new export
    decode.ensure_bundle(tiny_checkpoint, out, None, ("fp16-cuda",), parity=False, data_dir=data_dir)
    assert "exporting" in capsys.readouterr().err


def test_report_of_a_cuda_run(tmp_path: Path) -> None:
    from nmt.bench.report import write_report

    names = ["ort-fp32", "ort-fp16", "ct2-float16"]
    decode_rows = [
        {
            "engine": e,
            "mode": "greedy",
            "batch_size": 1,
            "sentences": 2,
            "batches": 2,
            "tokens": 20,
            "seconds": 0.1,
            "tokens_per_s": 200.0 + i,
            "p50_ms": 50.0,
            "identical_to_torch": None,
        }
        for i, e in enumerate(names)
    ]
    encoder_rows = [
        {
            "engine": e,
            "batch_size": 1,
            "gflop": 0.1,
            "seconds": 0.01,
            "gflops_per_s": 10.0,
            "fraction_of_peak": None,
            "includes_first_decoder_step": e.startswith("ct2"),
        }
        for e in names
    ]
    config = asdict(decode.DecodeBenchConfig(device="cuda", engines=tuple(names)))
    results = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in config.items()},
        "split_sentences": 1000,
        "sentences": 2,
        "source_tokens": 20,
        "engines": names,
        "skipped": {},
        "variants": {"ort-fp32": "fp32 on CUDA", "ort-fp16": "fp16-cuda on CUDA", "ct2-float16": "float16 on cuda"},
        "machine": {
            "device": "cuda",
            "gpu": "NVIDIA H200",
            "cpu": "x86",
            "cpu_flags": [],
            "logical_cpus": 16,
            "threads": 1,
            "load_average_start": [0.1],
            "load_average_end": [0.2],
            "other_processes_cores": 0.0,
            "versions": {},
        },
        "sgemm_gflops": None,
        "seconds": 1.0,
        "decode": decode_rows,
        "encoder": encoder_rows,
    }
    text = write_report(results, tmp_path)
    assert "Device: cuda, GPU NVIDIA H200 (host CPU: x86" in text and "no matmul peak" in text
    assert "| ORT fp16 / CT2 float16 | ≥ 1 | 0.99 ✗ |" in text and "ORT int8 / torch" not in text
    assert "| ct2-float16 * | 10.0 |" in text
    assert json.loads((tmp_path / "decode.json").read_text())["ratios"][0]["ratio"] == "ORT fp16 / CT2 float16"
