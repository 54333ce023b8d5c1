"""The KV cache of the step decoder (export/step_decoder.py): preallocated buffers written in place.

HostCache feeds the traced decoder a past of exactly past_len slots; the graph concatenates the new
keys/values onto it (a copy of the whole cache per layer per step) and beam search then copies it
again to reorder rows (`p[rows]`). Here each layer's keys and values live in one buffer
(rows, n_heads, capacity, d_head) that ORT reads and writes in place through IO binding: the
graph's DecoderMaskedMultiHeadAttention writes the new key/value at position `length`, and a
beam's history is read through `cache_indirection` (sentences, beam, capacity), which says for every
position which beam of the sentence wrote it. A beam-search step then moves no cache memory at all:
the host updates the (sentences, beam, length) indirection instead. Rows move only when sentences
finish (their rows leave: `compact`, the first `length` positions only), and the buffers double
when `length` reaches the capacity.

Measured end to end in `nmt-bench decode` against the traced decoder in the same run (engine
`ort-fp32-traced`): 1.08-1.30x (fp32), 0.96-1.28x (int8), beam 4 outputs 100% identical to torch;
docs/engine-speed.md has the runs and what lost.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .bundle import BEAM_WIDTH, CACHE_INDIRECTION, PAST_LENGTH, TOKENS, TOP_K, VOCAB_IDS, past_names, present_names
from .cache import HostCache, compact
from .runtime import Sessions

INITIAL_CAPACITY = 32  # positions; doubles when full (a Multi30k sentence needs ~15-25)


def kv_buffer(sessions: Sessions, rows: int, length: int) -> np.ndarray:
    """One layer's uninitialised key or value buffer (rows, n_heads, length, d_head)."""
    return np.empty((rows, sessions.n_heads, length, sessions.d_head), sessions.kv_dtype)


def regrown(
    sessions: Sessions, buffers: list[np.ndarray], rows: int, length: int, used: int, capacity_rows: int | None = None
) -> list[np.ndarray]:
    """New buffers of `length` positions (and capacity_rows rows, default `rows`), the first `used`
    positions of the first `rows` rows copied over."""
    grown = []
    for buffer in buffers:
        bigger = kv_buffer(sessions, capacity_rows or rows, length)
        bigger[:rows, :, :used] = buffer[:rows, :, :used]
        grown.append(bigger)
    return grown


def bind_in_place(
    session: ort.InferenceSession,
    feeds: dict[str, np.ndarray],
    buffers: list[np.ndarray],
    rows: int,
    host_outputs: list[str],
) -> ort.IOBinding:
    """A step decoder's binding: `feeds` from host memory, each past_* input and its present_* output
    bound to the first `rows` rows of the same buffer (written in place), `host_outputs` allocated by ORT."""
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    layers = len(buffers) // 2
    for name, present, buffer in zip(past_names(layers), present_names(layers), buffers):
        view = ort.OrtValue.ortvalue_from_numpy(buffer[:rows])  # a contiguous prefix: wrapped, not copied
        binding.bind_ortvalue_input(name, view)
        binding.bind_ortvalue_output(present, view)
    for name in host_outputs:
        binding.bind_output(name)
    return binding


class StepCache(HostCache):
    """Source side and in-place KV buffers of the rows still being decoded, for the step decoder.

    Rows are grouped by sentence: `beam` consecutive rows each (the static search's layout)."""

    def __init__(
        self,
        sessions: Sessions,
        src_ids: np.ndarray,
        src_mask: np.ndarray,
        repeat: int,
        vocab_ids: np.ndarray | None = None,
    ):
        super().__init__(sessions, src_ids, src_mask, 1, vocab_ids)  # the graph takes the source once per sentence
        self.beam, self.length = repeat, 0
        self.vocab_feed = np.arange(sessions.vocab_size, dtype=np.int64) if vocab_ids is None else vocab_ids
        rows = self.rows
        self.buffers = [kv_buffer(sessions, rows, INITIAL_CAPACITY) for _ in self.past_names]
        self.indirection = np.zeros((rows // repeat, repeat, INITIAL_CAPACITY), np.int32)
        self.past = []  # HostCache's concatenated past is not used
        self._bound: tuple | None = None  # (key, binding, arrays it references): _bind

    @property
    def rows(self) -> int:
        return len(self.src_mask) * self.beam

    def _grow(self) -> None:
        """Twice the capacity, the cached positions copied over."""
        capacity = 2 * self.buffers[0].shape[2]
        self.buffers = regrown(self.sessions, self.buffers, self.rows, capacity, self.length)
        indirection = np.zeros((*self.indirection.shape[:2], capacity), np.int32)
        indirection[:, :, : self.length] = self.indirection[:, :, : self.length]
        self.indirection = indirection
        self._bound = None

    def _run(self, tokens: np.ndarray, k: int, host_outputs: list[str]) -> list[np.ndarray]:
        """One step: `host_outputs` come back as numpy; the new keys/values land in the buffers."""
        if self.length == 0 and self.beam > 1:
            return self._first_step(tokens, k, host_outputs)
        if self.length == self.buffers[0].shape[2]:
            self._grow()
        step_feeds = {
            TOKENS: tokens,
            PAST_LENGTH: np.array([self.length], np.int32),
            CACHE_INDIRECTION: self.indirection,
            TOP_K: np.array([min(k, len(self.vocab_feed))], np.int64),
        }
        binding = self.sessions.run_step(lambda session: self._bind(session, step_feeds, host_outputs), len(tokens))
        self.length += 1
        return [value.numpy() for value in binding.get_outputs()[-len(host_outputs) :]]

    def _first_step(self, tokens: np.ndarray, k: int, host_outputs: list[str]) -> list[np.ndarray]:
        """A sentence's beams all start from BOS with nothing cached, so they are the same row: one row
        per sentence runs (beam width 1), its key/value goes to position 0 of every beam's row, and the
        outputs are repeated for each beam (the search expands only the first beam anyway)."""
        K, first = self.beam, tokens[:: self.beam]
        n = len(first)
        alone = [kv_buffer(self.sessions, n, 1) for _ in self.buffers]
        feeds = {
            TOKENS: first,
            PAST_LENGTH: np.array([0], np.int32),
            BEAM_WIDTH: np.array([1], np.int32),
            CACHE_INDIRECTION: np.zeros((n, 1, 1), np.int32),
            "src_mask": self.src_mask,
            VOCAB_IDS: self.vocab_feed,
            TOP_K: np.array([min(k, len(self.vocab_feed))], np.int64),
            **dict(zip(self.cross_names, self.cross)),
        }
        bind = lambda session: bind_in_place(session, feeds, alone, n, host_outputs)  # noqa: E731
        found = self.sessions.run_step(bind, n).get_outputs()[-len(host_outputs) :]
        for buffer, written in zip(self.buffers, alone):
            buffer[: n * K, :, 0] = np.repeat(written[:, :, 0], K, axis=0)
        self.length = 1
        return [np.repeat(value.numpy(), K, axis=0) for value in found]

    def _bind(
        self, session: ort.InferenceSession, step_feeds: dict[str, np.ndarray], host_outputs: list[str]
    ) -> ort.IOBinding:
        """The session's binding: made whole when the rows, buffers or session changed (select, _grow),
        else the last one with this step's feeds rebound (~30 bindings fewer per step)."""
        key = (id(session), len(step_feeds[TOKENS]), self.buffers[0].shape[2], tuple(host_outputs))
        if self._bound is not None and self._bound[0] == key:
            binding = self._bound[1]
            for name, value in step_feeds.items():
                binding.bind_cpu_input(name, value)
            for name in host_outputs:  # unallocated again: top_k may differ from the last step's
                binding.bind_output(name)
            return binding
        fixed = {
            BEAM_WIDTH: np.array([self.beam], np.int32),
            "src_mask": self.src_mask,
            VOCAB_IDS: self.vocab_feed,
            **dict(zip(self.cross_names, self.cross)),
        }
        binding = bind_in_place(session, {**fixed, **step_feeds}, self.buffers, len(step_feeds[TOKENS]), host_outputs)
        self._bound = (key, binding, fixed)  # `fixed` keeps the bound arrays alive
        return binding

    def select(self, rows: np.ndarray, source_rows: np.ndarray | None) -> None:
        """Row j of the next step continues row `rows[j]`: the same sentence group (rows // beam), its
        beam rows % beam. Sentences whose rows are not in `source_rows` leave (None: all stay)."""
        K, t = self.beam, self.length - 1  # position t was written by this step
        if K > 1:
            groups, origin = rows // K, (rows % K).reshape(-1, K)
            indirection = self.indirection[groups[::K]]  # (sentences kept, K, capacity)
            indirection[:, :, :t] = np.take_along_axis(indirection[:, :, :t], origin[:, :, None], axis=1)
            indirection[:, :, t] = origin
            self.indirection = indirection
        if source_rows is not None:
            self._bound = None  # fewer rows, compacted sources: bind everything again
            for buffer in self.buffers:  # rows move down in place; the buffers keep their size
                compact(buffer[:, :, : self.length], source_rows)
            sentences = source_rows[::K] // K
            if K == 1:
                self.indirection = self.indirection[: len(sentences)]
            self.cross = [compact(c, sentences) for c in self.cross]
            self.src_mask = self.src_mask[sentences]
