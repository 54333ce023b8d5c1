"""decoder.step.onnx: the decoder step written from the weights, with an in-place KV cache.

The traced decoder (export/export.py) concatenates each layer's past keys/values with the new ones
into fresh present tensors every step, the search then copies them again to reorder beams, and
its attention goes through ~20 Reshape/Transpose/Concat nodes per layer. This graph is built
node by node from the checkpoint's weights instead, for one new token per row:

    tokens        (batch,) int64        the token each row appends (batch = sentences x beam)
    past_sequence_length (1,) int32     the cached positions, the same for every row (static batching)
    beam_width    (1,) int32            rows per sentence (1: greedy)
    cache_indirection (sentences, beam, capacity) int32: for each beam and cached position, the beam of
                  the same sentence whose row holds that key/value
    past_key_i, past_value_i (batch, n_heads, capacity, d_head) float32: per-layer buffers, bound
                  (IO binding) to the same memory as present_key_i / present_value_i: the new key and
                  value are written in place at position past_sequence_length
    cross_key_i, cross_value_i (sentences, n_heads, src_len, d_head), src_mask (sentences, src_len):
                  the encoder's outputs as they are, once per sentence (not repeated per beam)
    vocab_ids, top_k: as in the traced decoder, but required (IO binding cannot bind an input that
                  has a default)
    -> log_probs, present_*, top_log_probs, top_ids, eos_log_probs (export/decoder_head.py)

Self-attention is com.microsoft.DecoderMaskedMultiHeadAttention with past_present_share_buffer
(nothing is concatenated) and cache_indirection (beam search reorders no keys: engine/step_cache.py
updates the indirection instead). Cross-attention is com.microsoft.MultiHeadAttention with a
sentence's beams as its query positions: each sentence's source keys and values are read once per
step, not once per beam (the traced decoder takes them repeated beam times). States stay
(batch, d_model) and every projection is one MatMul (+ Add, fused to Gemm by ORT), Q, K and V in one.

models/default: 77 nodes after ORT's offline optimization, against 178 in the traced decoder.
Continuous batching (rows at different lengths, mixed beam sizes) runs build(per_row=True)'s form,
decoder.rows.*.onnx (engine/row_cache.py). docs/engine-speed.md has the measurements.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nmt.engine import bundle
from nmt.engine.bundle import BEAM_WIDTH, CACHE_INDIRECTION, PAST_LENGTH, SEQLENS_K, TOKENS, TOTAL_LENGTH

from . import decoder_head

if TYPE_CHECKING:
    from nmt.training.model import Transformer

MSFT = "com.microsoft"
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which training/model.py keeps


class _Graph:
    """Nodes and initializers being written."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def weight(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], output: str | list[str], domain: str = "", **attrs) -> str:
        outputs = [output] if isinstance(output, str) else output
        self.nodes.append(
            helper.make_node(
                op, inputs, outputs, output if isinstance(output, str) else outputs[0], domain=domain, **attrs
            )
        )
        return outputs[0]

    def linear(self, x: str, weight: np.ndarray, bias: np.ndarray | None, name: str) -> str:
        """x (rows, in) @ weight.T + bias: MatMul and Add, which ORT fuses into one Gemm at load
        (and the int8 quantizer turns into DynamicQuantizeMatMul with its bias; it skips Gemm)."""
        product = self.node(
            "MatMul", [x, self.weight(f"{name}.weight", weight.T)], f"{name}.matmul" if bias is not None else name
        )
        return product if bias is None else self.node("Add", [product, self.weight(f"{name}.bias", bias)], name)

    def residual(self, x: str, sublayer, weights: dict[str, np.ndarray], prefix: str, pre_norm: bool, name: str) -> str:
        """Add & Norm around `sublayer(h, with_bias) -> output`: post-norm LayerNorm(x + sublayer(x)), one
        SkipLayerNormalization that also adds the sublayer's last bias; pre-norm x + sublayer(LayerNorm(x))."""
        gamma = self.weight(f"{prefix}.weight", weights[f"{prefix}.weight"])
        beta = self.weight(f"{prefix}.bias", weights[f"{prefix}.bias"])
        if pre_norm:
            normed = self.node("LayerNormalization", [x, gamma, beta], f"{name}.pre", axis=-1, epsilon=LAYER_NORM_EPS)
            return self.node("Add", [x, sublayer(normed, True)], name)
        output, bias = sublayer(x, False)
        return self.node(
            "SkipLayerNormalization",
            [x, output, gamma, beta, self.weight(f"{name}.bias", bias)],
            name,
            domain=MSFT,
            epsilon=LAYER_NORM_EPS,
        )


def build(model: Transformer, per_row: bool = False) -> onnx.ModelProto:
    """The step graph of `model` (post-norm or pre-norm), its weights copied in. per_row: the graph
    for continuous batching (decoder.rows.*.onnx), whose rows each sit at their own position:
    seqlens_k (batch,) int32 (each row's cached tokens) and total_sequence_length () int32 (their
    maximum + 1) replace past_sequence_length, beam_width and cache_indirection; self-attention is
    GroupQueryAttention (each row attends to its own seqlens_k + 1 keys of the shared buffer, written
    in place at seqlens_k); cross-attention is per row (batch, n_heads, src_len, d_head), as rows of
    sentences with different beam sizes mix. Beams are reordered by moving buffer rows."""
    cfg = model.cfg
    w = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    w["positions"] = model.positions.detach().float().cpu().numpy()
    L, H, D, Dh = cfg.n_decoder_layers, cfg.n_heads, cfg.d_model, cfg.d_head
    g = _Graph()
    # Embedding * sqrt(d_model) + the position of each row's new token (its cached count).
    positions = g.node("Cast", [SEQLENS_K if per_row else PAST_LENGTH], "positions", to=TensorProto.INT64)
    embedded = g.node("Gather", [g.weight("embedding.weight", w["embedding.weight"]), TOKENS], "embedded")
    scaled = g.node("Mul", [embedded, g.weight("embed_scale", np.array(math.sqrt(D), np.float32))], "scaled")
    x = g.node(
        "Add",
        [scaled, g.node("Gather", [g.weight("position_table", w["positions"]), positions], "position")],
        "x_embedded",
    )
    padding = g.node("Cast", ["src_mask"], "key_padding_mask", to=TensorProto.INT32)
    rows_1_d = g.weight("rows_1_d", np.array([0, 1, -1], np.int64))  # (rows, D) <-> (rows, 1, D)
    if per_row:
        sentences_beam_d = rows_1_d  # every row its own sentence
    else:
        beam = g.node("Cast", [BEAM_WIDTH], "beam_width_64", to=TensorProto.INT64)
        sentences_beam_d = g.node(
            "Concat",
            [g.weight("minus_one", np.array([-1], np.int64)), beam, g.weight("d_model", np.array([D], np.int64))],
            "sentences_beam_d",
            axis=0,
        )
    rows_d = g.weight("rows_d", np.array([-1, D], np.int64))
    for i in range(L):
        p = f"decoder_layers.{i}"
        sa, ca, ffn = f"{p}.self_attn", f"{p}.cross_attn", f"{p}.ffn"

        def projected(attended: str, prefix: str, name: str, with_bias: bool):
            """The attention output (rows, 1, D) through out_proj; post-norm leaves its bias to the norm."""
            flat = g.node("Reshape", [attended, rows_d], f"{name}_2d")
            bias = w[f"{prefix}.out_proj.bias"]
            out = g.linear(flat, w[f"{prefix}.out_proj.weight"], bias if with_bias else None, f"{name}_out")
            return out if with_bias else (out, bias)

        def self_attention(h: str, with_bias: bool, i=i, sa=sa):
            qkv_w = np.concatenate([w[f"{sa}.{n}_proj.weight"] for n in "qkv"])
            qkv_b = np.concatenate([w[f"{sa}.{n}_proj.bias"] for n in "qkv"])
            qkv = g.node("Reshape", [g.linear(h, qkv_w, qkv_b, f"l{i}.qkv"), rows_1_d], f"l{i}.qkv_3d")
            if per_row:
                attended = g.node(
                    "GroupQueryAttention",
                    [qkv, "", "", f"past_key_{i}", f"past_value_{i}", SEQLENS_K, TOTAL_LENGTH],
                    [f"l{i}.self", f"present_key_{i}", f"present_value_{i}"],
                    domain=MSFT,
                    num_heads=H,
                    kv_num_heads=H,
                )
                return projected(attended, sa, f"l{i}.self", with_bias)
            # ORT's CPU kernel takes q, k and v apart (packed QKV fails its shape check)
            q, k, v = (f"l{i}.{n}" for n in "qkv")
            g.node("Split", [qkv], [q, k, v], axis=2, num_outputs=3)
            attended = g.node(
                "DecoderMaskedMultiHeadAttention",
                [q, k, v, "", "", f"past_key_{i}", f"past_value_{i}", PAST_LENGTH, BEAM_WIDTH, CACHE_INDIRECTION],
                [f"l{i}.self", f"present_key_{i}", f"present_value_{i}"],
                domain=MSFT,
                num_heads=H,
                past_present_share_buffer=1,
            )
            return projected(attended, sa, f"l{i}.self", with_bias)

        def cross_attention(h: str, with_bias: bool, i=i, ca=ca):
            # A sentence's beams are the query positions of one row of the (sentences, ...) source keys.
            query = g.node(
                "Reshape",
                [g.linear(h, w[f"{ca}.q_proj.weight"], w[f"{ca}.q_proj.bias"], f"l{i}.cross_q"), sentences_beam_d],
                f"l{i}.cross_q_3d",
            )
            attended = g.node(
                "MultiHeadAttention",
                [query, f"cross_key_{i}", f"cross_value_{i}", "", padding],
                f"l{i}.cross",
                domain=MSFT,
                num_heads=H,
            )
            return projected(attended, ca, f"l{i}.cross", with_bias)

        def feed_forward(h: str, with_bias: bool, i=i, ffn=ffn):
            hidden = g.node(
                "Relu", [g.linear(h, w[f"{ffn}.linear1.weight"], w[f"{ffn}.linear1.bias"], f"l{i}.ffn1")], f"l{i}.relu"
            )
            bias = w[f"{ffn}.linear2.bias"]
            out = g.linear(hidden, w[f"{ffn}.linear2.weight"], bias if with_bias else None, f"l{i}.ffn2")
            return out if with_bias else (out, bias)

        x = g.residual(x, self_attention, w, f"{p}.self_block.norm", cfg.pre_norm, f"l{i}.self_norm")
        x = g.residual(x, cross_attention, w, f"{p}.cross_block.norm", cfg.pre_norm, f"l{i}.cross_norm")
        x = g.residual(x, feed_forward, w, f"{p}.ffn_block.norm", cfg.pre_norm, f"l{i}.ffn_norm")
    if cfg.pre_norm:  # pre-norm stacks end in a final norm (training/model.py)
        x = g.node(
            "LayerNormalization",
            [
                x,
                g.weight("decoder_norm.weight", w["decoder_norm.weight"]),
                g.weight("decoder_norm.bias", w["decoder_norm.bias"]),
            ],
            "decoder_norm",
            axis=-1,
            epsilon=LAYER_NORM_EPS,
        )
    # The head in the traced form decoder_head.add_top_k rewrites: Gather(embedding, vocab_ids), Gemm, LogSoftmax.
    scored = g.node("Gather", ["embedding.weight", bundle.VOCAB_IDS], "head/scored_weight")
    logits = g.node("Gemm", [x, scored], "head/logits", transB=1)
    g.node("LogSoftmax", [logits], "log_probs", axis=-1)
    return _model(g, cfg.vocab_size, L, H, Dh, per_row)


def _model(g: _Graph, vocab_size: int, L: int, H: int, Dh: int, per_row: bool) -> onnx.ModelProto:
    kv = lambda name, length, rows="batch": helper.make_tensor_value_info(  # noqa: E731
        name, TensorProto.FLOAT, [rows, H, length, Dh]
    )
    sentences = "batch" if per_row else "sentences"
    if per_row:
        position = [
            helper.make_tensor_value_info(SEQLENS_K, TensorProto.INT32, ["batch"]),
            helper.make_tensor_value_info(TOTAL_LENGTH, TensorProto.INT32, []),
        ]
    else:
        position = [
            helper.make_tensor_value_info(PAST_LENGTH, TensorProto.INT32, [1]),
            helper.make_tensor_value_info(BEAM_WIDTH, TensorProto.INT32, [1]),
            helper.make_tensor_value_info(CACHE_INDIRECTION, TensorProto.INT32, ["sentences", "beam", "capacity"]),
        ]
    inputs = [
        helper.make_tensor_value_info(TOKENS, TensorProto.INT64, ["batch"]),
        *position,
        helper.make_tensor_value_info("src_mask", TensorProto.BOOL, [sentences, "src_len"]),
        *(kv(name, "capacity") for name in bundle.past_names(L)),
        *(kv(name, "src_len", sentences) for name in bundle.cross_names(L)),
        helper.make_tensor_value_info(bundle.VOCAB_IDS, TensorProto.INT64, ["vocab"]),
    ]
    outputs = [
        helper.make_tensor_value_info("log_probs", TensorProto.FLOAT, ["batch", "vocab"]),
        *(kv(name, "capacity") for name in bundle.present_names(L)),
    ]
    graph = helper.make_graph(g.nodes, "step_decoder", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MSFT, 1)])
    model.ir_version = 10
    decoder_head.add_top_k(model, vocab_size, blocks=True)
    # IO binding cannot bind an input that has a default (ORT 1.32: "Failed to find NodeArg"), and
    # every step is bound: vocab_ids and top_k become required inputs.
    required = {bundle.VOCAB_IDS, bundle.TOP_K}
    kept = [t for t in model.graph.initializer if t.name not in required]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    return model


def export_step_decoder(model: Transformer, path: Path, per_row: bool = False) -> onnx.ModelProto:
    """Write decoder.step.onnx (or with per_row, decoder.rows.onnx): fp32, for ORT's CPU provider
    (build() has checked it)."""
    step = build(model, per_row)
    onnx.save(step, str(path))
    return step
