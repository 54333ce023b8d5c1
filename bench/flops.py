"""Matrix-multiply FLOPs of the encoder, and the machine's measured sgemm peak.

Counted: the matrix products (2·m·n·k each) for the shapes actually run, padding included,
since every engine computes the padded positions. Embeddings, LayerNorm, softmax, bias and
ReLU are left out (a few percent at d_model 256).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from nmt.training.model import ModelConfig


def encoder_flops(cfg: ModelConfig, batch: int, src_len: int) -> float:
    """What the encoder graph computes: the encoder layers, then the cross K/V of every decoder layer."""
    tokens, d = batch * src_len, cfg.d_model
    projections = 4 * 2 * tokens * d * d  # Q, K, V, output
    attention = 2 * 2 * batch * src_len * src_len * d  # Q·Kᵀ and weights·V over all heads
    ffn = 2 * 2 * tokens * d * cfg.d_ff
    cross_kv = cfg.n_decoder_layers * 2 * 2 * tokens * d * d
    return float(cfg.n_encoder_layers * (projections + attention + ffn) + cross_kv)


def first_step_flops(cfg: ModelConfig, batch: int, src_len: int) -> float:
    """One decoder step at past length 0 (what CT2's encoder-only measurement also runs)."""
    d = cfg.d_model
    self_attn = 4 * 2 * batch * d * d
    cross = 2 * 2 * batch * d * d + 2 * 2 * batch * src_len * d  # Q and output projections, attention
    ffn = 2 * 2 * batch * d * cfg.d_ff
    return float(cfg.n_decoder_layers * (self_attn + cross + ffn) + 2 * batch * d * cfg.vocab_size)


def _best_seconds(run, repeats: int) -> float:
    run()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def torch_sgemm_gflops(threads: int, n: int = 2048, repeats: int = 10) -> float:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        return 2 * n**3 / _best_seconds(lambda: torch.mm(a, b), repeats) / 1e9
    finally:
        torch.set_num_threads(previous)


def ort_sgemm_gflops(threads: int, n: int = 2048, repeats: int = 10) -> float:
    """ONNX Runtime's own MatMul kernel (MLAS), the one its graphs use."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from nmt.engine.runtime import session_options

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "sgemm",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    # IR 10 as the bundles use: newer onnx writes an IR that older onnxruntime (-gpu 1.31) refuses.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    options = session_options(threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sgemm.onnx"
        onnx.save(model, str(path))
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {x: rng.standard_normal((n, n), dtype=np.float32) for x in ("a", "b")}
    return 2 * n**3 / _best_seconds(lambda: session.run(None, feeds), repeats) / 1e9


def sgemm_peaks(threads: int, n: int = 2048, earlier: dict[str, float] | None = None) -> dict[str, float]:
    """Measured fp32 matmul GFLOP/s at `threads` threads (the best of this and `earlier`, a
    measurement made before: on a shared machine the best one is the least disturbed);
    "peak" is the best of the kernels."""
    peaks = {"torch_mm": torch_sgemm_gflops(threads, n), "ort_matmul": ort_sgemm_gflops(threads, n)}
    if earlier:
        peaks = {k: max(v, earlier[k]) for k, v in peaks.items()}
    return {**{k: round(v, 1) for k, v in peaks.items()}, "peak": round(max(peaks.values()), 1)}
