"""The graph variants of a bundle, built from the portable fp32 graphs (encoder.onnx, decoder.onnx).

    fp32       the portable graphs: any ORT provider.
    fp32-cpu   ORT's offline CPU optimization of fp32 (export/fuse.py), CPU provider only.
    int8-cpu   dynamic quantization of fp32-cpu: int8 weights, activations quantized at run time.
    fp16-cuda  fp16 conversion of fp32 for CUDA: KV tensors float16; ids, masks and log_probs as in fp32.

int8-cpu. Only MatMul and Gather are quantized: ORT's quantizer would turn any node called
"Attention" (ONNX Attention-23 included) into its contrib QAttention, which has other inputs.
The optimized graph is quantized rather than the portable one because there the tied output
projection is a constant, so it is quantized too: the portable source leaves that
(256 x 8000) MatMul in fp32 and its decoder step was slower than fp32-cpu's (14.3 vs 12.8 ms).
Re-optimizing the quantized graph offline changes nothing (ORT makes the same fusions,
DynamicQuantizeMatMul / MatMulIntegerToFloat, when it loads it). Per-channel weights with
reduce_range (7-bit, no u8s8 saturation on CPUs without VNNI) kept BLEU best; all settings
tried were within noise of fp32. The decoder's full-vocabulary projection sits in an If branch
(export/decoder_head.py): EnableSubgraph quantizes it too (without it the int8 decoder kept an
fp32 copy of the weight and was larger than fp32-cpu's). Static (QDQ) quantization calibrated
on training sentences lost 4-5 BLEU for no speed: export/quantize.py.

Measured with the trained default model (preset small: d_model 256, 4+4 layers, vocab 8000) on
this machine (2 shared AMD EPYC cores, AVX2 without VNNI; ORT 1.32, 1 intra-op thread,
ORT_ENABLE_ALL at load), median (min) ms over 20-40 rounds, the graphs taking turns; encoder
at batch 32 on 32 real sentences (src_len 30), decoder step at batch 32, past_len 12:

    | variant                  | encoder       | decoder step  | files (MB)  | test_2016 greedy BLEU | same as fp32 |
    |--------------------------|---------------|---------------|-------------|-----------------------|--------------|
    | fp32-cpu                 | 134.3 (127.0) | 13.75 (12.17) | 24.0 + 32.2 | 20.11                 | 1.000        |
    | int8-cpu (chosen)        |  91.9 ( 83.2) |  9.76 ( 8.21) |  6.9 +  9.0 | 20.31                 | 0.860        |
    | int8, per-tensor         |  92.0 ( 85.5) |  9.74 ( 9.04) |  6.9 +  8.9 | 20.03                 | 0.864        |
    | int8, per-tensor, MatMul |  90.8 ( 81.3) |  9.60 ( 8.17) | 13.0 + 15.1 | 20.12                 | 0.863        |
    | int8 from portable graph |  91.8 ( 71.5) | 14.27 (11.26) |  7.1 +  7.2 | 20.26                 | 0.814        |

(last row: per-channel without reduce_range, MatMul and Gather, from an earlier run in which
fp32-cpu took 132.7 (113.5) and 12.79 (10.49) ms). A re-run on the final bundle,
under heavier load, gave the same ratios: encoder 167.3 vs 117.3 ms, decoder step 17.0 vs 11.4.
So int8 is ~1.45x faster on the encoder and ~1.4x on a decoder step, 3.5x smaller, and loses
no BLEU on test_2016_flickr. The fp16 graphs, run on the CPU provider (ORT inserts casts, so
this shows fp16 rounding, not speed), gave BLEU 20.17 and 98.5% outputs identical to fp32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from nmt.engine import bundle

from . import decoder_head, fuse

FP32, FP32_CPU, INT8_CPU, FP16_CUDA = "fp32", "fp32-cpu", "int8-cpu", "fp16-cuda"
VARIANTS: tuple[str, ...] = (FP32, FP32_CPU, INT8_CPU, FP16_CUDA)
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
# Kept in fp32 by the fp16 conversion: the final log-softmax (a sum over the whole vocabulary).
FP16_OP_BLOCK_LIST = ("LogSoftmax",)
INT8_OP_TYPES = ["MatMul", "Gather"]  # never "Attention": see the module docstring
# The output head (export/decoder_head.py) has the same types in every variant: its TopK and EOS
# nodes stay fp32 in fp16-cuda (node_block_list), so beam scores add up unrounded log-probs.
HEAD_IO_TYPES = {
    bundle.VOCAB_IDS: TensorProto.INT64,
    bundle.TOP_K: TensorProto.INT64,
    bundle.TOP_LOG_PROBS: TensorProto.FLOAT,
    bundle.TOP_IDS: TensorProto.INT64,
    bundle.EOS_LOG_PROBS: TensorProto.FLOAT,
}
FP32_OUTPUTS = ["log_probs", bundle.TOP_LOG_PROBS, bundle.EOS_LOG_PROBS]


@dataclass(frozen=True)
class VariantSpec:
    name: str
    encoder: str
    decoder: str
    providers: tuple[str, ...]
    kv_dtype: str  # "float32" | "float16"
    exact: bool  # checked against torch within the fp32 tolerance; else by BLEU against fp32
    step_decoder: str | None = None  # the in-place-cache decoder for static search (export/step_decoder.py)
    rows_decoder: str | None = None  # its per-row form, for continuous batching

    def manifest_entry(self, directory: Path) -> dict[str, Any]:
        """The variant's manifest entry; step_decoder and rows_decoder only when `directory` has them."""
        entry = {
            "encoder": self.encoder,
            "decoder": self.decoder,
            "providers": list(self.providers),
            "kv_dtype": self.kv_dtype,
        }
        for role in ("step_decoder", "rows_decoder"):
            if self.path(role, directory) is not None:
                entry[role] = getattr(self, role)
        return entry

    def path(self, role: str, directory: Path) -> Path | None:
        """The variant's step_decoder or rows_decoder in `directory`, when it has one."""
        name = getattr(self, role)
        return None if name is None or not (directory / name).exists() else directory / name


SPECS: dict[str, VariantSpec] = {
    FP32: VariantSpec(FP32, bundle.ENCODER, bundle.DECODER, (CUDA, CPU), "float32", True),
    FP32_CPU: VariantSpec(
        FP32_CPU,
        bundle.ENCODER_CPU,
        bundle.DECODER_CPU,
        (CPU,),
        "float32",
        True,
        bundle.STEP_DECODER_CPU,
        bundle.ROWS_DECODER_CPU,
    ),
    INT8_CPU: VariantSpec(
        INT8_CPU,
        bundle.ENCODER_INT8,
        bundle.DECODER_INT8,
        (CPU,),
        "float32",
        False,
        bundle.STEP_DECODER_INT8,
        bundle.ROWS_DECODER_INT8,
    ),
    FP16_CUDA: VariantSpec(FP16_CUDA, bundle.ENCODER_FP16, bundle.DECODER_FP16, (CUDA,), "float16", False),
}


def parse_variants(text: str) -> tuple[str, ...]:
    """'fp32-cpu,int8-cpu' or 'all' -> the variants in bundle order; fp32 is always included."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return VARIANTS
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)} (or all)")
    return tuple(name for name in VARIANTS if name == FP32 or name in names)


def check_variants(variants: tuple[str, ...]) -> None:
    """The rules ExportOptions enforces: known names, fp32 included, bundle order, no repeats."""
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    if FP32 not in variants:
        raise ValueError("variants must include fp32 (every other variant is built from it)")
    if list(variants) != [name for name in VARIANTS if name in variants]:
        raise ValueError(f"variants must be distinct and in the order {', '.join(VARIANTS)}")


@dataclass(frozen=True)
class FusionCounts:
    """How many fused attention nodes each graph must keep, for fuse.check_fused."""

    attention: str
    encoder: int  # one per encoder layer
    decoder: int  # self- and cross-attention per decoder layer

    def check(self, spec: VariantSpec, encoder: onnx.ModelProto, decoder: onnx.ModelProto) -> None:
        fuse.check_fused(encoder, self.attention, self.encoder, spec.encoder)
        fuse.check_fused(decoder, self.attention, self.decoder, spec.decoder)


def build_fp32_cpu(directory: Path, counts: FusionCounts) -> None:
    """ORT offline CPU optimization of the portable graphs; the fused attention must survive."""
    spec, source = SPECS[FP32_CPU], SPECS[FP32]
    encoder = fuse.optimize_for_cpu(directory / source.encoder, directory / spec.encoder)
    decoder = fuse.optimize_for_cpu(directory / source.decoder, directory / spec.decoder)
    counts.check(spec, encoder, decoder)
    for raw, optimized in ((bundle.STEP_DECODER, spec.step_decoder), (bundle.ROWS_DECODER, spec.rows_decoder)):
        if (directory / raw).exists():  # export_checkpoint writes them (export/step_decoder.py)
            fuse.optimize_for_cpu(directory / raw, directory / optimized)


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """quantize_dynamic logs a pre-processing hint on the root logger at every call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def build_int8_cpu(directory: Path, counts: FusionCounts) -> None:
    """Dynamic int8 quantization of the fp32-cpu graphs (which must already be in `directory`)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    spec, source = SPECS[INT8_CPU], SPECS[FP32_CPU]
    with _quiet_root_logger():
        pairs = [(source.encoder, spec.encoder), (source.decoder, spec.decoder)]
        pairs += [
            (getattr(source, role), getattr(spec, role))
            for role in ("step_decoder", "rows_decoder")
            if source.path(role, directory) is not None
        ]
        for src, dest in pairs:
            # EnableSubgraph: the output head's full-vocabulary projection sits in an If branch.
            quantize_dynamic(
                directory / src,
                directory / dest,
                op_types_to_quantize=INT8_OP_TYPES,
                per_channel=True,
                reduce_range=True,
                weight_type=QuantType.QInt8,
                # DefaultTensorType: ONNX shape inference gives no type to contrib ops' outputs
                # (the step decoder's attention); every float here is float32.
                extra_options={"EnableSubgraph": True, "DefaultTensorType": TensorProto.FLOAT},
            )
    encoder, decoder = onnx.load(str(directory / spec.encoder)), onnx.load(str(directory / spec.decoder))
    counts.check(spec, encoder, decoder)


def _drop_cast_round_trips(model: onnx.ModelProto) -> None:
    """Cast(fp32 -> fp16) -> Cast(-> fp32) becomes Identity: the converter writes this pair after
    a blocked op that feeds kept-fp32 outputs or blocked nodes (log_probs feeds the head's TopK),
    which would round log_probs to fp16. The first Cast goes once nothing reads it."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}
    firsts = []
    for node in graph.node:
        first = producers.get(node.input[0]) if node.op_type == "Cast" and node.input else None
        if (
            first is None
            or first.op_type != "Cast"
            or _cast_to(node) != TensorProto.FLOAT
            or _cast_to(first) != TensorProto.FLOAT16
            or first.output[0] in outputs
        ):
            continue
        node.op_type, node.input[0] = "Identity", first.input[0]
        del node.attribute[:]
        firsts.append(first)
    read = {name for node in graph.node for name in node.input}
    for node in {id(n): n for n in firsts}.values():
        if node.output[0] not in read:
            graph.node.remove(node)


def _cast_to(node: onnx.NodeProto) -> int:
    return next(a.i for a in node.attribute if a.name == "to")


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    values = list(model.graph.input) + list(model.graph.output)
    return {v.name: v.type.tensor_type.elem_type for v in values}


def check_io_dtypes(model: onnx.ModelProto, kv_dtype: str, name: str) -> None:
    """KV tensors have kv_dtype; ids int64, masks bool, log_probs float32 in every variant."""
    kv = TensorProto.FLOAT16 if kv_dtype == "float16" else TensorProto.FLOAT
    fixed = {
        "src_ids": TensorProto.INT64,
        "tgt_ids": TensorProto.INT64,
        "src_mask": TensorProto.BOOL,
        "past_mask": TensorProto.BOOL,
        "log_probs": TensorProto.FLOAT,
        **HEAD_IO_TYPES,
    }
    wrong = [
        f"{io} is {TensorProto.DataType.Name(dtype)}"
        for io, dtype in _elem_types(model).items()
        if dtype != fixed.get(io, kv)
    ]
    if wrong:
        raise ValueError(f"{name}: wrong input/output types for kv_dtype {kv_dtype}: " + ", ".join(wrong))


def build_fp16_cuda(directory: Path, counts: FusionCounts) -> None:
    """fp16 conversion of the portable graphs; checked by onnx.checker and for its I/O types."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    spec, source = SPECS[FP16_CUDA], SPECS[FP32]
    converted = []
    for src, dest in ((source.encoder, spec.encoder), (source.decoder, spec.decoder)):
        model = convert_float_to_float16(
            onnx.load(str(directory / src)),
            keep_io_types=FP32_OUTPUTS,
            op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP16_OP_BLOCK_LIST],
            node_block_list=decoder_head.node_names(),
        )
        OnnxModel(model).topological_sort()  # the converter appends its Cast nodes at the end
        _drop_cast_round_trips(model)
        onnx.checker.check_model(model, full_check=True)
        check_io_dtypes(model, spec.kv_dtype, dest)
        onnx.save(model, str(directory / dest))
        converted.append(model)
    counts.check(spec, *converted)


def build(
    directory: Path,
    variants: tuple[str, ...],
    counts: FusionCounts,
    step: Callable[[str], AbstractContextManager[None]],
) -> None:
    """Write every selected variant beside the portable graphs; `step(label)` is a context
    manager (the progress bar). int8-cpu without fp32-cpu builds fp32-cpu and removes it after."""
    if FP32_CPU in variants or INT8_CPU in variants:
        with step("optimize for CPU (fp32-cpu)"):
            build_fp32_cpu(directory, counts)
    if INT8_CPU in variants:
        with step("quantize (int8-cpu)"):
            build_int8_cpu(directory, counts)
        if FP32_CPU not in variants:
            cpu = SPECS[FP32_CPU]
            for name in (cpu.encoder, cpu.decoder, cpu.step_decoder, cpu.rows_decoder):
                (directory / name).unlink(missing_ok=True)
    if FP16_CUDA in variants:
        with step("convert to fp16 (fp16-cuda)"):
            build_fp16_cuda(directory, counts)
    for raw in (bundle.STEP_DECODER, bundle.ROWS_DECODER):  # intermediates: only the CPU variants' stay
        (directory / raw).unlink(missing_ok=True)


def steps(variants: tuple[str, ...]) -> int:
    """How many build steps `build` takes (for the progress bar's total)."""
    return int(FP32_CPU in variants or INT8_CPU in variants) + int(INT8_CPU in variants) + int(FP16_CUDA in variants)
