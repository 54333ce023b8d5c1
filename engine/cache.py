"""The decoder's state between steps: source side and KV cache of the rows still being decoded.

HostCache keeps it in numpy arrays (CPU); CudaCache keeps the KV cache on the GPU with IO binding.
Both feed the decoder graph by the bundle's names (engine/bundle.py) and ask its output head
(export/decoder_head.py) for top-k candidates or log-probs; engine/decoding.py's searches and
engine/continuous.py drive them.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .bundle import PAST_MASK, TOP_K, VOCAB_IDS, cross_names, decoder_outputs, head_outputs, past_names, takes_past_mask
from .runtime import Sessions
from .tokenizer import EOS_ID


def compact(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """array[rows] for ascending `rows`, written in place (runs of rows move down) -> a prefix view."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for start, end in zip([0, *breaks.tolist()], [*breaks.tolist(), len(rows)]):
        gap = int(rows[start]) - start  # >= 0: rows only move down
        if not gap:
            continue
        # Chunks of `gap` rows never overlap their destination, so numpy needs no temporary copy.
        for dest in range(start, end, gap):
            chunk = min(gap, end - dest)
            array[dest : dest + chunk] = array[dest + gap : dest + gap + chunk]
    return array[: len(rows)]


class HostCache:
    """Source side and KV cache of the rows still being decoded, in host memory (numpy)."""

    def __init__(
        self,
        sessions: Sessions,
        src_ids: np.ndarray,
        src_mask: np.ndarray,
        repeat: int,
        vocab_ids: np.ndarray | None = None,
    ):
        self.sessions, L = sessions, sessions.n_layers
        self.cross_names, self.past_names, self.outputs = cross_names(L), past_names(L), decoder_outputs(L)
        self.head = sessions.has_head  # feed vocab_ids and top_k, read the top-k outputs
        self.vocab_ids = vocab_ids  # None: every id (the graph's default)
        self.feeds_mask = takes_past_mask([i.name for i in sessions.decoder.get_inputs()])  # format 3
        cross = sessions.run_encoder(
            self.cross_names, {"src_ids": src_ids, "src_mask": src_mask}, rows=len(src_ids) * repeat
        )
        self.cross = [np.repeat(c, repeat, axis=0) for c in cross] if repeat > 1 else cross
        self.src_mask = np.repeat(src_mask, repeat, axis=0) if repeat > 1 else src_mask
        rows = len(self.src_mask)
        empty = np.zeros((rows, sessions.n_heads, 0, sessions.d_head), sessions.kv_dtype)
        self.past = [empty] * (2 * L)

    def _feeds(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {
            "tgt_ids": tokens[:, None],
            "src_mask": self.src_mask,
            **dict(zip(self.past_names, self.past)),
            **dict(zip(self.cross_names, self.cross)),
        }
        if self.feeds_mask:
            feeds[PAST_MASK] = self.full_mask(len(tokens))
        return feeds

    def _head_feeds(self, k: int) -> dict[str, np.ndarray]:
        if not self.head:
            return {}
        scored = self.sessions.vocab_size if self.vocab_ids is None else len(self.vocab_ids)
        feeds = {TOP_K: np.array([min(k, scored)], dtype=np.int64)}
        return feeds if self.vocab_ids is None else {**feeds, VOCAB_IDS: self.vocab_ids}

    def _run(self, tokens: np.ndarray, k: int, host_outputs: list[str]) -> list[np.ndarray]:
        """One decoder step: `host_outputs`, and the present K/V become the past."""
        found = self.sessions.run_decoder(
            [*host_outputs, *self.outputs[1:]], {**self._feeds(tokens), **self._head_feeds(k)}, len(tokens)
        )
        self.past = found[len(host_outputs) :]
        return found[: len(host_outputs)]

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (R,) -> log-probabilities (R, V) of the next token (V' columns, those of
        vocab_ids, with a shortlist); the cache grows by one."""
        return self._run(tokens, 0, self.outputs[:1])[0]

    def step_top(self, tokens: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """tokens (R,) -> each row's k best log-probs and their ids (R, k), best first, and its EOS
        log-prob (R,). k > 1: the graph's TopK, ~3x faster than np.argpartition over (R, V); k = 1:
        np.argmax over log_probs, ~10x faster than ORT's TopK or ArgMax (the graph's TopK gets k 0)."""
        if k > 1 and self.head:
            values, ids, eos = self._run(tokens, k, head_outputs())
            return values, ids, eos
        values, ids, eos = row_top_k(self.step(tokens), k)  # EOS's column: vocab_ids is ascending, 0..3 in it
        return values, (ids if self.vocab_ids is None else self.vocab_ids[ids]), eos

    def full_mask(self, rows: int) -> np.ndarray:
        """past_mask when every row started together: every cached slot is real (static batching)."""
        past = self.past[0]
        past_len = past.shape[2] if isinstance(past, np.ndarray) else past.shape()[2]  # ndarray or OrtValue
        return np.ones((rows, past_len + 1), dtype=bool)

    def select(self, rows: np.ndarray, source_rows: np.ndarray | None) -> None:
        """Keep cache rows `rows`, in that order; the source side keeps `source_rows` (None: unchanged).

        `source_rows` (and `rows`, when it is the same array) are ascending: those tensors are
        compacted in place, which spares a fresh allocation (and its page faults) per finished sentence.
        """
        if rows is source_rows:
            self.past = [compact(p, rows) for p in self.past]
        else:
            self.past = [p[rows] for p in self.past]
        if source_rows is not None:
            self.cross = [compact(c, source_rows) for c in self.cross]
            self.src_mask = self.src_mask[source_rows]


class CudaCache(HostCache):
    """The same state kept on the GPU between steps (IO binding).

    Present K/V stay where ORT wrote them (ort-owned CUDA outputs) and are bound back as the next
    past; cross K/V and the mask are uploaded once per row set. numpy cannot index device memory,
    so a row change (beam reordering, finished sentences) copies the past through the host.
    Only log-probabilities come to the host every step. IO binding cannot bind inputs that have
    defaults (ORT 1.32: "Failed to find NodeArg ... in the def list"), so this path feeds neither
    vocab_ids nor top_k: it scores every id and ranks on the host, as before the top-k head.
    """

    DEVICE = "cuda"  # ORT device name of the KV tensors (tests run this class with "cpu")

    def __init__(
        self,
        sessions: Sessions,
        src_ids: np.ndarray,
        src_mask: np.ndarray,
        repeat: int,
        vocab_ids: np.ndarray | None = None,
    ):
        super().__init__(sessions, src_ids, src_mask, repeat)  # encoder outputs once through host: small
        self.head = False  # see the class docstring
        self._upload_source()

    def _upload_source(self) -> None:
        upload = lambda a: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.DEVICE, 0)  # noqa: E731
        self.cross_ov, self.src_mask_ov = [upload(c) for c in self.cross], upload(self.src_mask)

    def _run(self, tokens: np.ndarray, k: int, host_outputs: list[str]) -> list[np.ndarray]:
        """One step with IO binding: `host_outputs` come back as numpy, the present K/V stay on the device."""
        binding = self.sessions.decoder.io_binding()
        for name, value in self._head_feeds(k).items():
            binding.bind_cpu_input(name, value)
        binding.bind_cpu_input("tgt_ids", np.ascontiguousarray(tokens[:, None]))
        binding.bind_ortvalue_input("src_mask", self.src_mask_ov)
        if self.feeds_mask:
            binding.bind_cpu_input(PAST_MASK, self.full_mask(len(tokens)))
        for name, value in zip(self.cross_names, self.cross_ov):
            binding.bind_ortvalue_input(name, value)
        for name, value in zip(self.past_names, self.past):
            if isinstance(value, np.ndarray):  # first step, or rows just changed: copied to the GPU here
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        for name in host_outputs:
            binding.bind_output(name, "cpu")
        for name in self.outputs[1:]:
            binding.bind_output(name, self.DEVICE, 0)
        with self.sessions.turns.step(len(tokens), self.sessions.threads_for(len(tokens)), shrinks=False):
            self.sessions.decoder.run_with_iobinding(binding)
        found = binding.get_outputs()
        self.past = found[len(host_outputs) :]
        return [value.numpy() for value in found[: len(host_outputs)]]

    def select(self, rows: np.ndarray, source_rows: np.ndarray | None) -> None:
        self.past = [p if isinstance(p, np.ndarray) else p.numpy() for p in self.past]  # device -> host
        super().select(rows, source_rows)
        if source_rows is not None:
            self._upload_source()


def row_top_k(log_probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the graph's top-k head returns, from log_probs (R, V): values, ids (R, k), EOS (R,)."""
    if k == 1:
        ids = log_probs.argmax(axis=1)[:, None]  # the first of equal maxima, as TopK
    else:
        part = np.argpartition(log_probs, -k, axis=1)[:, -k:]
        values = np.take_along_axis(log_probs, part, axis=1)
        ids = np.take_along_axis(part, np.lexsort((part, -values), axis=1), axis=1)  # best first, ties by id
        # (which of several values equal to the k-th gets in is np.argpartition's choice, as before the head)
    return np.take_along_axis(log_probs, ids, axis=1), ids, log_probs[:, EOS_ID].copy()
