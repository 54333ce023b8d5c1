"""Parity of the exported graphs against the torch model, on real sentences.

Checked, all in fp32 with the tolerance TOLERANCE (max absolute difference):
- encoder: every cross-attention key/value tensor;
- decoder, incremental: log-probabilities at every position when the target (BOS + torch's
  greedy output) is fed one token at a time through the KV cache, starting from an empty past;
- decoder, whole prefix at once (past_len 0, tgt_len > 1): log-probabilities at the last position;
- greedy search (a numpy loop over the ONNX graphs, training/search.py's rules) gives exactly
  the tokens of training.search.greedy_search.
The graphs output log-probabilities (log-softmax of the logits), so those are compared.
Every mismatch is collected, and one ParityError lists them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from training.model import Transformer
from training.search import greedy_search, pad_batch
from training.tokenizer import BOS_ID, EOS_ID, Tokenizer

from . import bundle

TOLERANCE = 1e-4  # fp32, max absolute difference of log-probs and cross K/V

DEFAULT_SENTENCES: dict[str, list[str]] = {
    "en": [
        "A man in an orange hat starring at something.",
        "Two young, White males are outside near many bushes.",
        "A little girl climbing into a wooden playhouse.",
        "Several men in hard hats are operating a giant pulley system.",
        "A dog runs through the grass.",
    ],
    "de": [
        "Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt.",
        "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
        "Ein kleines Mädchen klettert in ein Spielhaus aus Holz.",
        "Mehrere Männer mit Schutzhelmen bedienen ein Antriebsradsystem.",
        "Ein Hund rennt durch das Gras.",
    ],
}


class ParityError(RuntimeError):
    """The exported graphs disagree with the torch model; the message lists every mismatch."""


def cpu_session(path: Path, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxGraphs:
    """The encoder and decoder sessions, fed by name (bundle.py declares the names)."""

    def __init__(self, encoder: ort.InferenceSession, decoder: ort.InferenceSession, n_layers: int):
        self.encoder, self.decoder, self.n_layers = encoder, decoder, n_layers
        past_key = {i.name: i for i in decoder.get_inputs()}[bundle.past_names(n_layers)[0]]
        _, n_heads, _, d_head = past_key.shape  # (batch, n_heads, past_len, d_head)
        self.n_heads, self.d_head = int(n_heads), int(d_head)

    def encode(self, src_ids: np.ndarray, src_mask: np.ndarray) -> list[np.ndarray]:
        return self.encoder.run(bundle.cross_names(self.n_layers), {"src_ids": src_ids, "src_mask": src_mask})

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.n_heads, 0, self.d_head), np.float32) for _ in range(2 * self.n_layers)]

    def step(self, tgt_ids: np.ndarray, src_mask: np.ndarray, past: list[np.ndarray],
             cross: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """-> log-probs (B, V) at the last position, present K/V."""
        L = self.n_layers
        feeds = {"tgt_ids": tgt_ids, "src_mask": src_mask,
                 **dict(zip(bundle.past_names(L), past)), **dict(zip(bundle.cross_names(L), cross))}
        log_probs, *present = self.decoder.run(bundle.decoder_outputs(L), feeds)
        return log_probs, present


def _pad(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = pad_batch(seqs)
    return ids.numpy(), mask.numpy()


def onnx_greedy(graphs: OnnxGraphs, sources: list[list[int]], max_len_extra: int) -> list[list[int]]:
    """Greedy search over the graphs, with training/search.py's rules (EOS forced at the limit,
    finished rows leave the batch)."""
    src_ids, src_mask = _pad([s + [EOS_ID] for s in sources])
    cross = graphs.encode(src_ids, src_mask)
    past = graphs.empty_past(len(sources))
    max_lens = np.array([len(s) + max_len_extra for s in sources])
    active = np.arange(len(sources))
    last = np.full(len(sources), BOS_ID, dtype=np.int64)
    outputs: list[list[int]] = [[] for _ in sources]
    step = 0
    while active.size:
        log_probs, past = graphs.step(last[:, None], src_mask, past, cross)
        at_limit = step + 1 >= max_lens[active]
        log_probs[at_limit] = np.where(np.arange(log_probs.shape[1]) == EOS_ID, log_probs[at_limit], -np.inf)
        last = log_probs.argmax(axis=1)
        for row, token in zip(active.tolist(), last.tolist()):
            if token != EOS_ID:
                outputs[row].append(token)
        keep = np.flatnonzero(last != EOS_ID)
        active, last, src_mask = active[keep], last[keep], src_mask[keep]
        past, cross = [t[keep] for t in past], [t[keep] for t in cross]
        step += 1
    return outputs


def _max_diff(a: np.ndarray, b: torch.Tensor) -> float:
    return float(np.abs(a - b.numpy()).max()) if a.size else 0.0


@torch.no_grad()
def _log_prob_checks(model: Transformer, graphs: OnnxGraphs, sources: list[list[int]],
                     targets: list[list[int]]) -> dict[str, float]:
    """Max abs differences: cross K/V, incremental log-probs, whole-prefix log-probs."""
    src, src_mask = pad_batch([s + [EOS_ID] for s in sources])
    tgt, _ = pad_batch([[BOS_ID] + t for t in targets])  # pads decode harmlessly: both sides see them
    cross_ref = model.cross_kv(model.encode(src, src_mask))
    logits, _ = model.decode(tgt, cross_ref, src_mask)
    ref = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    cross = graphs.encode(src.numpy(), src_mask.numpy())
    diffs = {"cross_kv": max(_max_diff(c, r) for c, r in zip(cross, (t for kv in cross_ref for t in kv)))}
    past, step_diff = graphs.empty_past(len(sources)), 0.0
    for t in range(tgt.shape[1]):
        log_probs, past = graphs.step(tgt[:, t : t + 1].numpy(), src_mask.numpy(), past, cross)
        step_diff = max(step_diff, _max_diff(log_probs, ref[:, t]))
    diffs["log_probs_incremental"] = step_diff
    whole, _ = graphs.step(tgt.numpy(), src_mask.numpy(), graphs.empty_past(len(sources)), cross)
    diffs["log_probs_whole_prefix"] = _max_diff(whole, ref[:, -1])
    return diffs


def validate(model: Transformer, tokenizer: Tokenizer, encoder_path: Path, decoder_path: Path,
             sentences: list[str], max_len_extra: int = 20) -> dict[str, Any]:
    """Check the graphs against `model`; raise ParityError listing every mismatch, else a summary."""
    if not sentences:
        raise ValueError("validate needs at least one sentence")
    model.eval()
    graphs = OnnxGraphs(cpu_session(encoder_path), cpu_session(decoder_path), model.cfg.n_decoder_layers)
    sources = tokenizer.encode(sentences)
    expected = [h.tokens for h in greedy_search(model, sources, max_len_extra=max_len_extra)]
    got = onnx_greedy(graphs, sources, max_len_extra)
    mismatches = [f"greedy output differs for sentence {i} ({sentences[i]!r}): torch {e}, onnx {g}"
                  for i, (e, g) in enumerate(zip(expected, got)) if e != g]
    diffs = _log_prob_checks(model, graphs, sources, expected)
    mismatches += [f"{name}: max abs diff {value:.3g} > {TOLERANCE:g}"
                   for name, value in diffs.items() if value > TOLERANCE]
    if mismatches:
        raise ParityError(f"{encoder_path.name} + {decoder_path.name}: parity failed:\n  " + "\n  ".join(mismatches))
    return {"sentences": len(sentences), "tolerance": TOLERANCE, "greedy_identical": len(sentences),
            "max_abs_diff": {k: float(f"{v:.3g}") for k, v in diffs.items()}}
