"""Engine turns: the models of one process share the CPU cores as a budget, small steps first.

Left to the operating system, two models decoding at once oversubscribe the cores (a step uses
all of them: intra-op threads default to one per core) and a one-client model's p99 under another
model's load swung between 1.5x and 2.5x its unloaded p99 (bench/results/fairness.md). So every
encoder or decoder run takes threads from a budget of `cores` first:
- A step asks for the threads of the session it would run on (one for a step of few rows,
  engine/runtime.py SINGLE_THREAD_ROWS; all cores otherwise). It gets them when they are free;
  when only some are, a decoder step runs on its one-thread session instead (it gets one). When
  none is free it waits.
- A search keeps its threads from one step to the next (`hold()`), so its Python work between two
  runs does not let another model's step in ahead of it.
- At each step boundary a holder gives its threads back when a waiting step that does not fit in
  the free threads is clearly smaller (at most half its rows: shortest job first) or has waited
  `quantum_s`; then it queues again for what is left.
- Freed threads go to the steps that have waited `quantum_s`, oldest first, then to the smallest;
  a step that does not fit stops the ones behind it (a large step is not passed for ever).
No step waits much longer than a quantum. Threads beyond the budget are never started, except by
an encoder run granted fewer threads than its session has (there is one encoder session; a run is
short and once per batch).

nmt-serve --engine-turns picks the budget: shared (the default), every core (--threads); exclusive,
one core, so one step at a time; off, no turns. Measured on a noisy shared machine (bench/results/
fairness.md and README, 2 cores, one closed-loop client on model b while 32 load model a), b's p99
over its unloaded p99: shared 1.31-1.86x, exclusive 1.04-2.43x, off 1.43-2.14x; model a served
49-62 requests/s with shared, 20-30 with exclusive, 50-73 with off. A light step slows down beside
another model's step even on its own core (the GIL, caches), which only exclusive turns avoid;
what they cost is the cores a one-thread step leaves idle, so they are opt-in.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

QUANTUM_S = 0.05  # the longest a step waits for other models' steps, roughly (one step more at most)
SMALLER = 2  # a waiting step of at most 1/SMALLER of the holder's rows is served before it


@dataclass(eq=False)
class _Claim:
    rows: int
    want: int  # threads asked for
    shrinks: bool  # may run on one thread when fewer than `want` are free
    since: float  # when it began waiting
    threads: int = 0  # granted; 0 while waiting


class _Held(threading.local):
    def __init__(self) -> None:
        self.holding = False  # inside hold(): keep the threads between steps
        self.claim: _Claim | None = None  # what this thread has, or None


class EngineTurns:
    """A budget of `cores` threads shared by the engine steps of several models (thread-safe)."""

    def __init__(
        self,
        cores: int | None = None,
        quantum_s: float = QUANTUM_S,
        clock: Callable[[], float] = time.monotonic,
        on_wait: Callable[[float], None] | None = None,
    ):
        if quantum_s <= 0:
            raise ValueError(f"quantum_s must be > 0, got {quantum_s}")
        self.cores = cores or os.cpu_count() or 1
        if self.cores < 1:
            raise ValueError(f"cores must be >= 1, got {self.cores}")
        self.quantum_s, self._clock, self._on_wait = quantum_s, clock, on_wait
        self._cond = threading.Condition()
        self._free = self.cores
        self._waiting: list[_Claim] = []
        self._local = _Held()

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Keep this thread's threads between its steps inside (a search); given back as the rules say."""
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
    def step(self, rows: int, want: int, shrinks: bool = True) -> Iterator[int]:
        """Around one run of `rows` rows asking for `want` threads: yields the threads granted (`want`, or 1
        when `shrinks`); outside hold(), gives them back after the run."""
        local = self._local
        want = max(1, min(want, self.cores))
        if local.claim is not None and not self._adjust(local.claim, rows, want, shrinks):
            self._release(local.claim)
            local.claim = None
        if local.claim is None:
            local.claim = self._acquire(rows, want, shrinks)
        try:
            yield local.claim.threads
        finally:
            if not local.holding:
                self._release(local.claim)
                local.claim = None

    @property
    def waiting(self) -> int:
        """Steps waiting for threads now."""
        with self._cond:
            return len(self._waiting)

    def wait_for_waiting(self, count: int, timeout: float | None = None) -> bool:
        """Block until at least `count` steps wait for threads (tests, diagnostics); whether they did."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._waiting) >= count, timeout)

    @property
    def free(self) -> int:
        with self._cond:
            return self._free

    def _acquire(self, rows: int, want: int, shrinks: bool) -> _Claim:
        with self._cond:
            claim = _Claim(rows, want, shrinks, self._clock())
            self._waiting.append(claim)
            self._grant()
            self._cond.notify_all()  # for wait_for_waiting()
            waited = claim.threads == 0
            while claim.threads == 0:
                self._cond.wait()
        if waited and self._on_wait is not None:
            self._on_wait(self._clock() - claim.since)
        return claim

    def _release(self, claim: _Claim) -> None:
        with self._cond:
            self._free += claim.threads
            claim.threads = 0
            self._grant()

    def _adjust(self, claim: _Claim, rows: int, want: int, shrinks: bool) -> bool:
        """A holder's next step: keep (fitting its threads to `want`), or False: give them all back first."""
        with self._cond:
            now = self._clock()
            if any(
                (now - w.since >= self.quantum_s or w.rows * SMALLER <= rows) and not self._fits(w)
                for w in self._waiting
            ):
                return False
            if want > claim.threads and not (shrinks and claim.threads == 1):
                if self._waiting or self._free < want - claim.threads:
                    return False  # cannot run on what it holds: queue for more
            extra = min(want - claim.threads, 0 if self._waiting else self._free)
            if extra > 0 or want < claim.threads:  # grow into free threads, or give back the ones not needed
                extra = extra if extra > 0 else want - claim.threads
                claim.threads += extra
                self._free -= extra
                self._grant()
            claim.rows, claim.want, claim.shrinks = rows, want, shrinks
            return True

    def _fits(self, claim: _Claim) -> bool:
        return self._free >= claim.want or (claim.shrinks and self._free > 0)

    def _grant(self) -> None:
        """Hand free threads to the waiting steps in order (under the lock); the first that does not fit
        stops the others."""
        now = self._clock()
        order = sorted(
            self._waiting,
            key=lambda w: (
                now - w.since < self.quantum_s,
                w.since if now - w.since >= self.quantum_s else 0.0,
                w.rows,
                w.since,
            ),
        )
        granted = False
        for claim in order:
            threads = claim.want if self._free >= claim.want else 1 if claim.shrinks and self._free else 0
            if not threads:
                break
            claim.threads = threads
            self._free -= threads
            self._waiting.remove(claim)
            granted = True
        if granted:
            self._cond.notify_all()


class NoTurns:
    """Steps run whenever they are ready, on the threads they ask for (one model, or --engine-turns off)."""

    @contextmanager
    def hold(self) -> Iterator[None]:
        yield

    @contextmanager
    def step(self, rows: int, want: int, shrinks: bool = True) -> Iterator[int]:
        yield want


NO_TURNS = NoTurns()
