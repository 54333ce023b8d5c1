"""The decoder graph's output head: a vocabulary shortlist, the projection, log-softmax, per-row top-k.

    vocab_ids (V',) int64   the vocabulary ids to score, ascending, the special ids 0..3 included;
                            default (an initializer): the whole vocabulary, so a caller that does
                            not feed it gets the log-probabilities of every token, as before
    top_k     (1,) int64    how many candidates per row come back; default DEFAULT_TOP_K
    ->
    log_probs      (batch, V') float32  log-softmax over the V' scored tokens (V' = V by default)
    top_log_probs  (batch, k) float32   each row's k best log-probs, best first (ties: lower id first)
    top_ids        (batch, k) int64     their vocabulary ids (mapped back through vocab_ids)
    eos_log_probs  (batch,) float32     each row's EOS log-prob, for the EOS forced at the length limit

The projection is an If: with every id in vocab_ids (the default) it multiplies by the constant
embedding, which ORT packs once; else it gathers the rows vocab_ids of the tied embedding first,
so its cost scales with V' (Marian's lexical shortlist, CTranslate2's vocabulary map;
engine/shortlist.py picks V' per batch). ORT runs every node of a graph whatever outputs are
fetched, so both projections could not simply sit side by side. Per-row top-k is exact for beam
search: a row's previous score is one constant added to all its candidates, so a sentence's best
2·beam candidates are among its rows' best 2·beam each; only (rows, k) values come back instead
of (rows, V) (engine/decoding.py). top_k defaults to 0, so callers that do not ask for
candidates pay nothing for TopK (~0.5 ms over (128, 8000)).

`log_probs()` is traced with the rest of the decoder (export.DecoderGraph); `add_top_k()` then
writes the If, the TopK part and the two defaults into the exported ONNX graph, because the
exporter has no form for a tensor-valued k or for an input with a default.

Measured on 2 AMD EPYC (Zen 5) cores, ORT 1.32, 2 threads: the (rows, 128) x (128, V')
projection plus log-softmax alone, ms per call at 1 / 4 / 32 / 128 rows:
    constant weight, V' = 8000 (before this head)   0.049 / 0.061 / 0.223 / 0.687
    this If, vocab_ids not fed                      0.056 / 0.058 / 0.222 / 0.695
    this If, V' = 1000                              0.033 / 0.043 / 0.071 / 0.135
    gathered weight always, V' = 8000 (tried)       -     / 0.196 / 0.41  / 0.87
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nmt.engine.bundle import EOS_LOG_PROBS, TOP_IDS, TOP_K, TOP_LOG_PROBS, VOCAB_IDS, VOCAB_SIZE_KEY
from nmt.engine.tokenizer import EOS_ID

if TYPE_CHECKING:  # torch only where the graph is traced: export/variants.py imports this module too
    import torch

    from nmt.training.model import Transformer

# 0: callers that do not ask for candidates pay nothing for TopK (ORT runs every node, fetched or not;
# TopK over (128, 8000) takes ~0.5 ms).
DEFAULT_TOP_K = 0
PREFIX = "head/"  # names of the nodes add_top_k writes (kept fp32 by the fp16 conversion)
BLOCK = 64  # ids per block of the two-stage top-k (_block_top_k)


def log_probs(model: Transformer, states: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
    """states (B, d_model) at the last position -> log-softmax over the tokens vocab_ids (B, V')."""
    import torch.nn.functional as F

    weight = model.embedding.weight.index_select(0, vocab_ids)  # (V', d_model), tied with the embedding
    return F.log_softmax(F.linear(states, weight).float(), dim=-1)


def example_vocab_ids(vocab_size: int) -> torch.Tensor:
    """A traced example: every other id (a length no other example axis has)."""
    import torch

    return torch.arange(0, vocab_size, 2)


def node_names() -> list[str]:
    return [f"{PREFIX}{name}" for name in ("topk", "ids", "eos")]


def _branch_on_full_vocabulary(graph: onnx.GraphProto, vocab_size: int) -> None:
    """The traced projection Gemm(states, Gather(embedding, vocab_ids)) becomes If(vocab_ids has
    every id: Gemm(states, embedding), whose constant weight ORT packs once; else: the traced nodes)."""
    producers = {out: node for node in graph.node for out in node.output}
    softmax = producers["log_probs"]
    gemm = producers[softmax.input[0]]
    gather = producers[gemm.input[1]]
    assert (softmax.op_type, gemm.op_type, gather.op_type) == ("LogSoftmax", "Gemm", "Gather"), "unexpected head"
    traced = [node for node in (producers.get(gather.input[1]), gather, gemm) if node is not None]
    for node in traced:
        graph.node.remove(node)
    position = list(graph.node).index(softmax)
    logits, attributes = gemm.output[0], {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    full = helper.make_node(
        "Gemm", [gemm.input[0], gather.input[0]], [f"{PREFIX}full_logits"], f"{PREFIX}full_projection", **attributes
    )
    gemm.output[0] = f"{PREFIX}shortlist_logits"
    logits_info = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "vocab"])  # noqa: E731
    branch = helper.make_node(
        "If",
        [f"{PREFIX}is_full"],
        [logits],
        f"{PREFIX}projection",
        then_branch=helper.make_graph([full], "full_vocabulary", [], [logits_info(f"{PREFIX}full_logits")]),
        else_branch=helper.make_graph(traced, "shortlist", [], [logits_info(f"{PREFIX}shortlist_logits")]),
    )
    graph.initializer.append(numpy_helper.from_array(np.array([vocab_size], dtype=np.int64), f"{PREFIX}vocab_size"))
    condition = [
        helper.make_node("Shape", [VOCAB_IDS], [f"{PREFIX}scored"], f"{PREFIX}scored"),
        helper.make_node("Equal", [f"{PREFIX}scored", f"{PREFIX}vocab_size"], [f"{PREFIX}is_full"], f"{PREFIX}is_full"),
    ]
    for offset, node in enumerate([*condition, branch]):
        graph.node.insert(position + offset, node)


def _block_top_k(graph: onnx.GraphProto, name: str) -> onnx.NodeProto:
    """TopK of log_probs in two stages, as an If on top_k > 0 (else TopK with k 0, which costs nothing).

    ORT's TopK scans (rows, V') at ~1.2 ms for (128, 8000) on 2 Xeon cores, whatever k. Instead: the
    maximum of each block of BLOCK ids (ReduceMax, vectorized), the top_k best blocks, the top_k of
    their top_k * BLOCK ids: 0.54-0.63 ms, the same values and ids (tests/export/test_decoder_head.py).
    Exact, ties included: a token of the true top k lies in one of the top k blocks (each chosen block
    holds a maximum that ranks before it, ties going to the lower block, so lower ids), and the chosen
    blocks are gathered in id order, so the second TopK breaks ties by id as a single TopK would.
    When BLOCK does not divide V' (a shortlist), the last block is padded with -inf first (a copy of
    log_probs; log_probs are finite, so padding never ranks above a token); the full vocabulary of
    the models here (8000) needs none."""

    def const(name: str, value) -> str:
        graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.int64), f"{PREFIX}{name}"))
        return f"{PREFIX}{name}"

    n = lambda name: f"{PREFIX}{name}"  # noqa: E731
    node = helper.make_node
    block, two, zero = const("block", [BLOCK]), const("axis2", [2]), const("zero", [0])
    rows_blocks_block, rows_any = const("rows_blocks_block", [0, -1, BLOCK]), const("rows_any", [0, -1])
    in_block = const("in_block", np.arange(BLOCK))
    graph.initializer.append(numpy_helper.from_array(np.array(-np.inf, dtype=np.float32), n("minus_inf")))
    sizes = [
        node("Shape", ["log_probs"], [n("scored_width")], start=1, end=2),
        node("Add", [n("scored_width"), const("block_minus_one", [BLOCK - 1])], [n("ceil_numerator")]),
        node("Div", [n("ceil_numerator"), block], [n("blocks")]),
        node("Mul", [n("blocks"), block], [n("padded_width")]),
        node("Sub", [n("padded_width"), n("scored_width")], [n("pad")]),
        node("Equal", [n("pad"), zero], [n("divisible_1d")]),
        node("Squeeze", [n("divisible_1d")], [n("divisible")]),
        node("Min", [TOP_K, n("blocks")], [n("top_blocks")]),
    ]

    def stages(source: str, tag: str) -> list[onnx.NodeProto]:
        t = lambda name: n(f"{tag}/{name}")  # noqa: E731
        return [
            node("Reshape", [source, rows_blocks_block], [t("by_block")]),
            node("ReduceMax", [t("by_block"), two], [t("block_max")], keepdims=0),
            node("TopK", [t("block_max"), n("top_blocks")], [t("best_max"), t("best_blocks")], axis=-1),
            node("Neg", [t("best_blocks")], [t("negated_blocks")]),  # largest of -index: the blocks in id order
            node("TopK", [t("negated_blocks"), n("top_blocks")], [t("negated_sorted"), t("unused")], axis=-1),
            node("Neg", [t("negated_sorted")], [t("chosen_blocks")]),
            node("Unsqueeze", [t("chosen_blocks"), two], [t("chosen_3d")]),
            node("Mul", [t("chosen_3d"), block], [t("block_starts")]),
            node("Add", [t("block_starts"), in_block], [t("candidate_ids_3d")]),
            node("Reshape", [t("candidate_ids_3d"), rows_any], [t("candidate_ids")]),
            node("GatherElements", [source, t("candidate_ids")], [t("candidates")], axis=1),
            node("TopK", [t("candidates"), TOP_K], [t("values"), t("position")], axis=-1),
            node("GatherElements", [t("candidate_ids"), t("position")], [t("index")], axis=1),
        ]

    def outputs(tag: str) -> list[onnx.ValueInfoProto]:
        return [
            helper.make_tensor_value_info(n(f"{tag}/values"), TensorProto.FLOAT, ["batch", TOP_K]),
            helper.make_tensor_value_info(n(f"{tag}/index"), TensorProto.INT64, ["batch", TOP_K]),
        ]

    pad = [
        node("Concat", [zero, zero, zero, n("pad")], [n("pads")], axis=0),
        node("Pad", ["log_probs", n("pads"), n("minus_inf")], [n("padded")]),
    ]
    by_width = node(
        "If",
        [n("divisible")],
        [n("two_stage/values"), n("two_stage/index")],
        n("by_width"),
        then_branch=helper.make_graph(stages("log_probs", "whole"), "whole_blocks", [], outputs("whole")),
        else_branch=helper.make_graph(pad + stages(n("padded"), "padded"), "padded_blocks", [], outputs("padded")),
    )
    plain = node("TopK", ["log_probs", TOP_K], [n("plain/values"), n("plain/index")], axis=-1)
    graph.initializer.append(numpy_helper.from_array(np.array([0], dtype=np.int64), n("no_k")))
    graph.node.extend(
        [
            node("Greater", [TOP_K, n("no_k")], [n("wants_top_1d")]),
            node("Squeeze", [n("wants_top_1d")], [n("wants_top")]),
        ]
    )
    return node(
        "If",
        [n("wants_top")],
        [TOP_LOG_PROBS, n("index")],
        name,
        then_branch=helper.make_graph([*sizes, by_width], "block_top_k", [], outputs("two_stage")),
        else_branch=helper.make_graph([plain], "no_top_k", [], outputs("plain")),
    )


def add_top_k(model: onnx.ModelProto, vocab_size: int, blocks: bool = False) -> None:
    """Write the top-k outputs and the defaults of vocab_ids and top_k into an exported decoder (in place).
    blocks: the two-stage top-k of _block_top_k (the step decoder) instead of one TopK."""
    graph = model.graph
    _branch_on_full_vocabulary(graph, vocab_size)
    outputs = [o.name for o in graph.output]
    assert outputs[0] == "log_probs" and VOCAB_IDS in [i.name for i in graph.input], outputs
    graph.input.append(helper.make_tensor_value_info(TOP_K, TensorProto.INT64, [1]))
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.arange(vocab_size, dtype=np.int64), VOCAB_IDS),
            numpy_helper.from_array(np.array([DEFAULT_TOP_K], dtype=np.int64), TOP_K),
            numpy_helper.from_array(np.array(EOS_ID, dtype=np.int64), f"{PREFIX}eos_id"),
        ]
    )
    top_name, ids_name, eos_name = node_names()
    if blocks:
        top = _block_top_k(graph, top_name)
    else:
        top = helper.make_node("TopK", ["log_probs", TOP_K], [TOP_LOG_PROBS, f"{PREFIX}index"], top_name, axis=-1)
    graph.node.extend(
        [
            top,
            helper.make_node("Gather", [VOCAB_IDS, f"{PREFIX}index"], [TOP_IDS], ids_name, axis=0),
            # vocab_ids is ascending with 0..3 in it, so EOS's column is EOS_ID; a scalar index drops the axis.
            helper.make_node("Gather", ["log_probs", f"{PREFIX}eos_id"], [EOS_LOG_PROBS], eos_name, axis=1),
        ]
    )
    graph.output.extend(
        [
            helper.make_tensor_value_info(TOP_LOG_PROBS, TensorProto.FLOAT, ["batch", TOP_K]),
            helper.make_tensor_value_info(TOP_IDS, TensorProto.INT64, ["batch", TOP_K]),
            helper.make_tensor_value_info(EOS_LOG_PROBS, TensorProto.FLOAT, ["batch"]),
        ]
    )
    # log_probs has V' columns: the vocabulary size is stated apart (engine/runtime.py reads it).
    props = {p.key: p.value for p in model.metadata_props}
    helper.set_model_props(model, {**props, VOCAB_SIZE_KEY: str(vocab_size)})
    onnx.checker.check_model(model)
