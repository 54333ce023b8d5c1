"""Engine turns: the models of one process run their ONNX Runtime steps one at a time, small steps first.

Two models decoding at once on the same cores slow each other down (their threads and the GIL
contend: a one-client model's p99 rose 2.5x while another model served 32 clients, bench/results/
fairness.md). So every encoder or decoder run takes the turn first:
- A search holds the turn from one step to the next (`hold()`), so its Python work between
  two runs does not let another model's step in.
- At each step boundary the holder gives the turn away when a waiting step is clearly smaller
  (at most half its rows: a short request passes a large batch, as shortest-job-first) or when a
  step has waited `quantum_s` (no step waits much longer than that, whatever its size).
- A freed turn goes to the steps that have waited `quantum_s`, oldest first; else to the
  smallest waiting step.
So a light model runs at nearly its unloaded pace while a heavy one gets at least one step per
quantum, and two heavy models alternate in slices of `quantum_s`.

The cost: steps of different models never overlap. A step already uses every core (intra-op
threads default to one per core); one of a few rows runs on one thread (engine/runtime.py
SINGLE_THREAD_ROWS), and on a many-core machine two such steps could have shared the cores:
`nmt-serve --engine-turns off` lets them (each model's steps then run whenever they are ready).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

QUANTUM_S = 0.05  # the longest a step waits for other models' steps, roughly (one step more at most)
SMALLER = 2  # a waiting step of at most 1/SMALLER of the holder's rows takes the turn at the next step


@dataclass(eq=False)
class _Claim:
    rows: int
    since: float  # when it began waiting


class _Held(threading.local):
    def __init__(self) -> None:
        self.holding = False  # inside hold(): keep the turn between steps
        self.claim: _Claim | None = None  # the turn this thread has, or None


class EngineTurns:
    """One engine step at a time across the models sharing this object (thread-safe)."""

    def __init__(self, quantum_s: float = QUANTUM_S, clock: Callable[[], float] = time.monotonic,
                 on_wait: Callable[[float], None] | None = None):
        if quantum_s <= 0:
            raise ValueError(f"quantum_s must be > 0, got {quantum_s}")
        self.quantum_s, self._clock, self._on_wait = quantum_s, clock, on_wait
        self._cond = threading.Condition()
        self._holder: _Claim | None = None
        self._waiting: list[_Claim] = []
        self._local = _Held()

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the turn between this thread's steps inside (a search); given away as the rules say."""
        local = self._local
        if local.holding:  # nested: the outer hold decides
            yield
            return
        local.holding = True
        try:
            yield
        finally:
            local.holding = False
            if local.claim is not None:
                self._release(local.claim)
                local.claim = None

    @contextmanager
    def step(self, rows: int) -> Iterator[None]:
        """Around one run of `rows` rows: wait for the turn (or keep it); outside hold(), give it back after."""
        local = self._local
        if local.claim is not None and self._should_yield(local.claim, rows):
            self._release(local.claim)
            local.claim = None
        if local.claim is None:
            local.claim = self._acquire(rows)
        else:
            local.claim.rows = rows
        try:
            yield
        finally:
            if not local.holding:
                self._release(local.claim)
                local.claim = None

    @property
    def waiting(self) -> int:
        """Steps waiting for the turn now."""
        with self._cond:
            return len(self._waiting)

    def _acquire(self, rows: int) -> _Claim:
        with self._cond:
            claim = _Claim(rows, self._clock())
            if self._holder is None and not self._waiting:
                self._holder = claim
                return claim
            self._waiting.append(claim)
            while self._holder is not claim:
                self._cond.wait()
        if self._on_wait is not None:
            self._on_wait(self._clock() - claim.since)
        return claim

    def _release(self, claim: _Claim) -> None:
        with self._cond:
            assert self._holder is claim, "only the holder gives the turn back"
            self._holder = self._next() if self._waiting else None
            if self._holder is not None:
                self._waiting.remove(self._holder)
                self._cond.notify_all()

    def _next(self) -> _Claim:
        """Who gets a freed turn: the steps waiting a quantum, oldest first; else the smallest (then oldest)."""
        now = self._clock()
        aged = [w for w in self._waiting if now - w.since >= self.quantum_s]
        if aged:
            return min(aged, key=lambda w: w.since)
        return min(self._waiting, key=lambda w: (w.rows, w.since))

    def _should_yield(self, holder: _Claim, rows: int) -> bool:
        with self._cond:
            if not self._waiting:
                return False
            now = self._clock()
            return any(now - w.since >= self.quantum_s or w.rows * SMALLER <= rows for w in self._waiting)


class NoTurns:
    """Steps run whenever they are ready (one model, or `--engine-turns off`)."""

    @contextmanager
    def hold(self) -> Iterator[None]:
        yield

    @contextmanager
    def step(self, rows: int) -> Iterator[None]:
        yield


NO_TURNS = NoTurns()
