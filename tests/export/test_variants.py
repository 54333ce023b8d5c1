from __future__ import annotations

import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from nmt.engine import bundle
from nmt.export.export import ExportOptions
from nmt.export.fuse import op_counts
from nmt.export.validate import OnnxGraphs, cpu_session, graph_greedy, open_graphs
from nmt.export.variants import (
    FP16_CUDA,
    FP32,
    FP32_CPU,
    INT8_CPU,
    SPECS,
    VARIANTS,
    FusionCounts,
    build,
    check_io_dtypes,
    parse_variants,
    steps,
)
from nmt.training.data import multi30k
from nmt.training.search import pad_batch
from nmt.training.tokenizer import BOS_ID, EOS_ID, Tokenizer

N_ENC, N_DEC = 2, 2  # the conftest model
COUNTS = FusionCounts("onnx", N_ENC, 2 * N_DEC)


def _graphs(directory: Path, variant: str, provider: str = "CPUExecutionProvider") -> OnnxGraphs:
    spec = SPECS[variant]
    return OnnxGraphs.of(open_graphs(directory / spec.encoder, directory / spec.decoder, provider))


def _pad(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = pad_batch(seqs)
    return ids.numpy(), mask.numpy()


def _teacher_forced(graphs: OnnxGraphs, sources: list[list[int]], targets: list[list[int]]) -> np.ndarray:
    """Log-probs (B, T, V) at every target position, fed one token at a time through the KV cache."""
    ids, mask = _pad([s + [EOS_ID] for s in sources])
    tgt, _ = _pad([[BOS_ID] + t for t in targets])
    cross, past, steps = graphs.encode(ids, mask), graphs.empty_past(len(sources)), []
    for t in range(tgt.shape[1]):
        log_probs, past = graphs.step(tgt[:, t : t + 1], mask, past, cross)
        steps.append(log_probs)
    return np.stack(steps, axis=1)


@pytest.fixture(scope="module")
def fp32_log_probs(bundle_dir: Path, data_dir: Path) -> tuple[list[list[int]], list[list[int]], np.ndarray]:
    """Sources, the fp32 graphs' greedy outputs, and fp32 log-probs along them."""
    tokenizer = Tokenizer.load(bundle_dir / bundle.TOKENIZER)
    sources = tokenizer.encode(multi30k("val", "en", "de", data_dir).src[:16])
    spec = SPECS[FP32]
    sessions = open_graphs(bundle_dir / spec.encoder, bundle_dir / spec.decoder)
    targets = graph_greedy(sessions, sources, max_len_extra=5)
    return sources, targets, _teacher_forced(OnnxGraphs.of(sessions), sources, targets)


def test_the_manifest_lists_every_variant_as_agreed(bundle_dir: Path) -> None:
    manifest = bundle.verify_bundle(bundle_dir)
    variants = manifest["variants"]
    assert list(variants) == list(VARIANTS)
    assert {k: v for k, v in variants[INT8_CPU].items() if k != "validated"} == {
        "encoder": "encoder.int8.onnx",
        "decoder": "decoder.int8.onnx",
        "providers": ["CPUExecutionProvider"],
        "kv_dtype": "float32",
        "step_decoder": "decoder.step.int8.onnx",
        "rows_decoder": "decoder.rows.int8.onnx",
    }
    assert variants[FP32_CPU]["step_decoder"] == "decoder.step.cpu.onnx"
    assert "step_decoder" not in variants[FP32] and "step_decoder" not in variants[FP16_CUDA]
    assert variants[FP32]["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert (variants[FP16_CUDA]["providers"], variants[FP16_CUDA]["kv_dtype"]) == (["CUDAExecutionProvider"], "float16")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert variants[FP16_CUDA]["validated"] == {"skipped": "no CUDA execution provider"}
    assert "graphs" not in manifest  # format 2: "variants" replaced it


def test_int8_loads_keeps_fused_attention_and_quantizes_the_weights(bundle_dir: Path) -> None:
    for name, expected in ((bundle.ENCODER_INT8, N_ENC), (bundle.DECODER_INT8, 2 * N_DEC)):
        counts = op_counts(onnx.load(str(bundle_dir / name)))
        assert counts["Attention"] == expected and counts["Softmax"] == 0
        assert counts["com.microsoft::QAttention"] == 0  # the quantizer must leave Attention-23 alone
        assert counts["MatMulInteger"] > 0 and counts["MatMul"] == 0
        cpu_session(bundle_dir / name)
    assert (bundle_dir / bundle.DECODER_INT8).stat().st_size < (bundle_dir / bundle.DECODER_CPU).stat().st_size


def test_int8_log_probs_stay_close_to_fp32(bundle_dir: Path, fp32_log_probs: tuple) -> None:
    sources, targets, reference = fp32_log_probs
    got = _teacher_forced(_graphs(bundle_dir, INT8_CPU), sources, targets)
    assert np.abs(got - reference).max() < 0.5  # 0.13 measured (random weights, near-flat distributions)
    assert (got.argmax(-1) == reference.argmax(-1)).mean() >= 0.9  # 0.96 measured


def test_fp16_graphs_pass_the_checker_with_float16_kv(bundle_dir: Path) -> None:
    for name in (bundle.ENCODER_FP16, bundle.DECODER_FP16):
        model = onnx.load(str(bundle_dir / name))
        onnx.checker.check_model(model, full_check=True)
        check_io_dtypes(model, "float16", name)
        assert op_counts(model)["Attention"] == (N_ENC if name == bundle.ENCODER_FP16 else 2 * N_DEC)
    decoder = onnx.load(str(bundle_dir / bundle.DECODER_FP16)).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*decoder.input, *decoder.output]}
    assert types["past_key_0"] == types["cross_value_1"] == types["present_key_1"] == TensorProto.FLOAT16
    assert (types["tgt_ids"], types["src_mask"], types["log_probs"]) == (
        TensorProto.INT64,
        TensorProto.BOOL,
        TensorProto.FLOAT,
    )
    producer = next(n for n in decoder.node if "log_probs" in n.output)
    assert producer.op_type != "Cast"  # the log-softmax's fp32 result is not rounded through fp16


def test_fp16_numerics_on_the_cpu_provider(bundle_dir: Path, fp32_log_probs: tuple) -> None:
    """The CPU provider runs the fp16 graphs by inserting casts: fp16 rounding, not fp16 speed."""
    sources, targets, reference = fp32_log_probs
    got = _teacher_forced(_graphs(bundle_dir, FP16_CUDA), sources, targets)
    assert got.dtype == np.float32
    assert np.abs(got - reference).max() < 0.05  # 0.004 measured
    assert (got.argmax(-1) == reference.argmax(-1)).mean() >= 0.98


@pytest.mark.gpu
def test_fp16_on_cuda(bundle_dir: Path, fp32_log_probs: tuple) -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider")
    sources, targets, reference = fp32_log_probs
    graphs = _graphs(bundle_dir, FP16_CUDA, "CUDAExecutionProvider")
    assert graphs.encoder.get_providers()[0] == "CUDAExecutionProvider"
    got = _teacher_forced(graphs, sources, targets)
    assert np.abs(got - reference).max() < 0.05
    assert (got.argmax(-1) == reference.argmax(-1)).mean() >= 0.98


def test_parse_variants() -> None:
    assert parse_variants("all") == VARIANTS
    assert parse_variants("int8-cpu") == (FP32, INT8_CPU)
    assert parse_variants("fp16-cuda, fp32-cpu,fp32") == (FP32, FP32_CPU, FP16_CUDA)
    with pytest.raises(ValueError) as e:
        parse_variants("fp32-cpu,int4")
    assert str(e.value) == "unknown variant 'int4'; choose from fp32, fp32-cpu, int8-cpu, fp16-cuda (or all)"


@pytest.mark.parametrize(
    "variants, message",
    [
        ((FP32_CPU,), "variants must include fp32 (every other variant is built from it)"),
        ((FP32, "bf16"), "unknown variant 'bf16'; choose from fp32, fp32-cpu, int8-cpu, fp16-cuda"),
        ((FP32, INT8_CPU, FP32_CPU), "variants must be distinct and in the order fp32, fp32-cpu, int8-cpu, fp16-cuda"),
    ],
)
def test_bad_variant_options_are_refused(variants: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError) as e:
        ExportOptions(variants=variants)
    assert str(e.value) == message


@pytest.mark.parametrize(
    "selected, files",
    [
        ((FP32, INT8_CPU), {bundle.ENCODER_INT8, bundle.DECODER_INT8}),  # fp32-cpu built, used, removed
        ((FP32, FP16_CUDA), {bundle.ENCODER_FP16, bundle.DECODER_FP16}),
        ((FP32,), set()),
    ],
)
def test_build_writes_only_the_selected_variants(
    bundle_dir: Path, tmp_path: Path, selected: tuple[str, ...], files: set[str]
) -> None:
    for name in (bundle.ENCODER, bundle.DECODER):
        shutil.copyfile(bundle_dir / name, tmp_path / name)
    labels: list[str] = []

    def step(label: str) -> nullcontext[None]:  # stands in for Progress.step
        labels.append(label)
        return nullcontext()

    build(tmp_path, selected, COUNTS, step)
    assert {p.name for p in tmp_path.iterdir()} == {bundle.ENCODER, bundle.DECODER} | files
    assert len(labels) == steps(selected)
