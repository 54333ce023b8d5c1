"""Sessions: bundle verification, variant and provider choice, threads, loose graph files."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from nmt.engine.bundle import MANIFEST, BundleError, manifest_variants, write_manifest
from nmt.engine.decoding import DecodeOptions, Decoder
from nmt.engine.runtime import CPU, CUDA, ProviderError, RuntimeConfig, choose_variant, load_sessions, open_sessions

ONE_THREAD = RuntimeConfig(intra_op_threads=1)
HAS_CUDA = CUDA in ort.get_available_providers()
FP32 = {"encoder": "encoder.onnx", "decoder": "decoder.onnx", "providers": [CUDA, CPU], "kv_dtype": "float32"}
FP32_CPU = {"encoder": "encoder.cpu.onnx", "decoder": "decoder.cpu.onnx", "providers": [CPU], "kv_dtype": "float32"}
FP16 = {"encoder": "encoder.fp16.onnx", "decoder": "decoder.fp16.onnx", "providers": [CUDA], "kv_dtype": "float16"}
INT8 = {"encoder": "encoder.int8.onnx", "decoder": "decoder.int8.onnx", "providers": [CPU], "kv_dtype": "float32"}


def rewritten(bundle: Path, out: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of `bundle` whose manifest fields were edited (and re-hashed, so it verifies)."""
    shutil.copytree(bundle, out)
    fields = json.loads((out / MANIFEST).read_text())
    for key in ("format", "format_version", "files", "manifest_sha256"):
        fields.pop(key)
    edit(fields)
    write_manifest(out, fields)
    return out


def test_cpu_default_is_the_optimized_variant(sessions, server_bundle):
    assert (sessions.variant, sessions.provider) == ("fp32-cpu", CPU)
    assert (sessions.n_layers, sessions.n_heads, sessions.d_head, sessions.vocab_size) == (2, 4, 8, 600)
    assert sessions.kv_dtype == np.float32 and sessions.max_positions == 1024
    assert sessions.manifest is not None and sessions.manifest["src_lang"] == "en"
    assert sessions.decoder.get_providers() == [CPU]


def test_load_logs_the_active_variant(server_bundle, caplog):
    with caplog.at_level(logging.INFO, logger="nmt.engine.runtime"):
        load_sessions(server_bundle, ONE_THREAD)
    assert any("variant fp32-cpu on CPUExecutionProvider" in r.getMessage() for r in caplog.records)


def test_legacy_graphs_table_and_variants_table_are_both_read(server_bundle, tmp_path):
    def legacy_graphs(fields: dict[str, Any]) -> None:  # what the exporter wrote before "variants"
        fields.pop("variants", None)
        fields["graphs"] = {
            "encoder": "encoder.onnx",
            "decoder": "decoder.onnx",
            "encoder_cpu": "encoder.cpu.onnx",
            "decoder_cpu": "decoder.cpu.onnx",
        }

    legacy = rewritten(server_bundle, tmp_path / "legacy", legacy_graphs)
    assert set(manifest_variants(json.loads((legacy / MANIFEST).read_text()))) == {"fp32", "fp32-cpu"}
    assert load_sessions(legacy, ONE_THREAD).variant == "fp32-cpu"

    def only_fp32(fields: dict[str, Any]) -> None:
        fields.pop("graphs", None)
        fields["variants"] = {"fp32": FP32}

    portable = rewritten(server_bundle, tmp_path / "portable", only_fp32)
    assert load_sessions(portable, ONE_THREAD).variant == "fp32"
    with pytest.raises(ValueError, match=r"^the bundle has no int8 variant; it has: fp32$"):
        load_sessions(portable, RuntimeConfig(precision="int8", intra_op_threads=1))


def test_precision_not_in_the_bundle_is_refused():
    variants = {"fp32": FP32, "fp32-cpu": FP32_CPU}
    with pytest.raises(ValueError, match=r"^the bundle has no fp16 variant; it has: fp32, fp32-cpu$"):
        choose_variant(variants, "fp16", [CPU])
    with pytest.raises(ValueError, match=r"no variant of the bundle runs with precision 'fp16' on CPUExecution"):
        choose_variant({**variants, "fp16-cuda": FP16}, "fp16", [CPU])


@pytest.mark.parametrize(
    ("precision", "providers", "expected"),
    [
        ("auto", [CPU], ("fp32-cpu", CPU)),
        ("fp32", [CPU], ("fp32-cpu", CPU)),
        ("int8", [CPU], ("int8-cpu", CPU)),
        ("auto", [CUDA, CPU], ("fp16-cuda", CUDA)),
        ("fp32", [CUDA, CPU], ("fp32", CUDA)),
        ("int8", [CUDA, CPU], ("int8-cpu", CPU)),  # auto device: int8 exists for the CPU only
        ("fp16", [CUDA], ("fp16-cuda", CUDA)),
    ],
)
def test_variant_choice(precision, providers, expected):
    variants = {"fp32": FP32, "fp32-cpu": FP32_CPU, "int8-cpu": INT8, "fp16-cuda": FP16}
    assert choose_variant(variants, precision, providers) == expected
    assert choose_variant({"fp32": FP32}, "auto", providers) == ("fp32", providers[0])


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA")
def test_cuda_without_the_cuda_provider(server_bundle, caplog):
    with pytest.raises(ValueError, match=r"^device 'cuda' needs onnxruntime's CUDAExecutionProvider, but this"):
        load_sessions(server_bundle, RuntimeConfig(device="cuda"))
    with caplog.at_level(logging.WARNING, logger="nmt.engine.runtime"):
        sessions = load_sessions(server_bundle, RuntimeConfig(device="auto", intra_op_threads=1))
    assert sessions.provider == CPU
    assert any("falling back to CPUExecutionProvider" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA")
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names")
def test_cuda_listed_but_not_starting(server_bundle, monkeypatch, caplog):
    """As when onnxruntime-gpu is installed but the CUDA libraries are missing: ORT starts the CPU provider."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    with pytest.raises(ProviderError, match=r"could not start CUDAExecutionProvider"):
        load_sessions(server_bundle, RuntimeConfig(device="cuda"))
    with caplog.at_level(logging.WARNING, logger="nmt.engine.runtime"):
        sessions = load_sessions(server_bundle, RuntimeConfig(device="auto", intra_op_threads=1))
    assert (sessions.variant, sessions.provider) == ("fp32-cpu", CPU)
    assert any("falling back" in r.getMessage() for r in caplog.records)


def test_a_corrupted_bundle_is_refused_naming_the_file(server_bundle, tmp_path):
    bundle = shutil.copytree(server_bundle, tmp_path / "bundle")
    with open(bundle / "decoder.cpu.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match=r"decoder\.cpu\.onnx: sha256 .* does not match the manifest"):
        load_sessions(bundle, ONE_THREAD)
    with pytest.raises(BundleError, match="not a bundle"):
        load_sessions(tmp_path, ONE_THREAD)


def test_a_graph_onnxruntime_cannot_load_is_a_bundle_error(server_bundle, tmp_path):
    def garbage(fields: dict[str, Any]) -> None:
        (tmp_path / "bundle" / "decoder.cpu.onnx").write_bytes(b"not a model")

    bundle = rewritten(server_bundle, tmp_path / "bundle", garbage)
    with pytest.raises(BundleError, match=r"^decoder\.cpu\.onnx: onnxruntime cannot load it"):
        load_sessions(bundle, ONE_THREAD)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "tpu"}, "device must be one of cpu, cuda, auto, got 'tpu'"),
        ({"precision": "bf16"}, "precision must be one of auto, fp32, int8, fp16, got 'bf16'"),
        ({"intra_op_threads": -1}, "intra_op_threads must be >= 0, got -1"),
        ({"inter_op_threads": -2}, "inter_op_threads must be >= 0, got -2"),
    ],
)
def test_runtime_config_is_validated(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        RuntimeConfig(**kwargs)


def test_loose_graph_files_decode_like_the_bundle(server_bundle, decoder, sources):
    loose = open_sessions(server_bundle / "encoder.onnx", server_bundle / "decoder.onnx", [CPU], ONE_THREAD)
    assert (loose.variant, loose.manifest, loose.n_layers) == ("loose", None, 2)
    options = DecodeOptions(beam_size=4, n_best=2, max_len_extra=6)
    expected = decoder.search(sources, options).hypotheses  # fp32-cpu: the optimized graphs
    got = Decoder(loose).search(sources, options).hypotheses
    assert [[h.tokens for h in hs] for hs in got] == [[h.tokens for h in hs] for hs in expected]
    with pytest.raises(ValueError, match="provider must be"):
        open_sessions(server_bundle / "encoder.onnx", server_bundle / "decoder.onnx", "TensorrtExecutionProvider")


def test_threads_reach_the_session_options(server_bundle):
    sessions = load_sessions(server_bundle, RuntimeConfig(intra_op_threads=2, inter_op_threads=1))
    options = sessions.decoder.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime's CUDAExecutionProvider")
@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_cuda_decodes_like_the_cpu(server_bundle, decoder, sources, precision):
    """IO-binding path: KV stays on the GPU between steps. Outputs must match the CPU's, but for
    a near-tie or two (other kernels; fp16 when the bundle has it and precision is auto)."""
    cuda = load_sessions(server_bundle, RuntimeConfig(device="cuda", precision=precision))
    assert cuda.provider == CUDA
    options = DecodeOptions(beam_size=4, n_best=2, max_len_extra=8)
    expected = decoder.search(sources, options).hypotheses
    got = Decoder(cuda).search(sources, options).hypotheses
    same = sum(g[0].tokens == e[0].tokens for g, e in zip(got, expected))
    assert same >= len(sources) - (1 if cuda.variant == "fp32" else 3)  # near-ties may flip on other kernels
    greedy = DecodeOptions(beam_size=1, max_len_extra=8)
    assert len(Decoder(cuda).search(sources, greedy).hypotheses) == len(sources)
