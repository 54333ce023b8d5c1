"""The KV cache of a running batch (engine/continuous.py) for the per-row step decoder.

The traced decoder needs every row's cache as wide as the oldest row's: a sentence that joins a
running batch gets masked slots in front (past_mask), and every step concatenates and attends over
them (issue 9). The per-row graph (export/step_decoder.py, build(per_row=True)) takes each row's own
length instead (seqlens_k): GroupQueryAttention reads a row's first seqlens_k + 1 positions of a shared
buffer (rows, n_heads, capacity, d_head) and writes its new key/value at seqlens_k, in place (IO
binding). A newcomer starts at length 0 and costs what a new sentence costs. Rows move only when
sentences leave or beams reorder (the first max(length) positions of the rows that move); both
capacities double when full.
"""

from __future__ import annotations

import numpy as np

from .bundle import SEQLENS_K, TOKENS, TOTAL_LENGTH
from .cache import compact
from .runtime import Sessions
from .step_cache import bind_in_place, kv_buffer, regrown

INITIAL_ROWS, INITIAL_LENGTH = 16, 32  # capacities; both double when full


class RowBuffers:
    """Each row's cached keys/values (its first lengths[i] positions) in per-layer buffers."""

    def __init__(self, sessions: Sessions):
        self.sessions = sessions
        self.lengths = np.zeros(0, np.int32)
        self.buffers = [kv_buffer(sessions, INITIAL_ROWS, INITIAL_LENGTH) for _ in range(2 * sessions.n_layers)]

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def _resize(self, rows: int, length: int) -> None:
        """Buffers of at least `rows` rows and `length` positions, the cached ones copied over."""
        have_rows, have_length = self.buffers[0].shape[0], self.buffers[0].shape[2]
        if rows <= have_rows and length <= have_length:
            return
        used = int(self.lengths.max(initial=0))
        self.buffers = regrown(
            self.sessions, self.buffers, self.rows, max(length, have_length), used, capacity_rows=max(rows, have_rows)
        )

    def add(self, count: int) -> None:
        """`count` new rows at the end, with nothing cached."""
        if self.rows + count > self.buffers[0].shape[0]:
            self._resize(max(2 * self.buffers[0].shape[0], self.rows + count), 0)
        self.lengths = np.concatenate([self.lengths, np.zeros(count, np.int32)])

    def keep(self, rows: np.ndarray) -> None:
        """Row i becomes row rows[i]'s cache (rows may repeat: beams that share a parent)."""
        used = int(self.lengths[rows].max(initial=0))
        ascending = len(rows) < 2 or bool((rows[1:] > rows[:-1]).all())
        if ascending and len(rows) == self.rows:
            return  # every row stays where it is
        moved = None if ascending else np.flatnonzero(rows != np.arange(len(rows)))  # the others stay put
        for buffer in self.buffers:
            if moved is None:
                compact(buffer[: self.rows, :, :used], rows)
            else:  # the right side is gathered (a copy) before any row is written
                buffer[moved, :, :used] = buffer[rows[moved], :, :used]
        self.lengths = self.lengths[rows]

    def run(self, tokens: np.ndarray, feeds: dict[str, np.ndarray], host_outputs: list[str]) -> list[np.ndarray]:
        """One decoder step of every row: `host_outputs` come back as numpy; each row's new key/value is
        written at its length, which then grows by one."""
        total = int(self.lengths.max(initial=0)) + 1
        if total > self.buffers[0].shape[2]:
            self._resize(0, 2 * self.buffers[0].shape[2])
        step_feeds = {**feeds, TOKENS: tokens, SEQLENS_K: self.lengths, TOTAL_LENGTH: np.array(total, np.int32)}
        binding = self.sessions.run_step(
            lambda session: bind_in_place(session, step_feeds, self.buffers, self.rows, host_outputs),
            self.rows,
            per_row=True,
        )
        self.lengths = self.lengths + 1
        return [value.numpy() for value in binding.get_outputs()[-len(host_outputs) :]]
