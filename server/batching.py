"""What both batching policies share: their config, their errors, and a request's queued sentences.

Imports go one way: server/scheduler.py (Scheduler, the static policy and the base class) imports this
module; server/continuous.py (ContinuousScheduler, and create_scheduler, which picks between the two)
imports both; this module imports neither.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from nmt.engine.decoding import DecodeOptions, Hypothesis

BATCHING = ("continuous", "static")


class QueueFull(Exception):
    """The queue has no room for a request's sentences; retry_after_s: when to try again."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    """A request's deadline passed before its translations were done."""


class EngineError(Exception):
    """The engine raised while computing a batch."""


class SchedulerClosed(Exception):
    """The scheduler is shutting down and takes no new requests."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 32  # sentences
    max_batch_tokens: int = 4096  # padded source tokens: sentences x (longest + EOS)
    max_wait_s: float = 0.0  # 0: a batch forms as soon as a worker is free
    max_queue_size: int = 1024  # sentences
    workers: int = 1
    batching: str = "static"  # or "continuous", which never waits (max_wait_s is static's)

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_batch_tokens", "max_queue_size", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {self.max_wait_s}")
        if self.batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}, got {self.batching!r}")


class Request:
    """One submit() call: its future (the hypotheses per source, in order, once all are computed),
    the results so far, how many sources are still to come, and its deadline (time.monotonic(); None: none)."""

    __slots__ = ("future", "results", "remaining", "deadline")

    def __init__(self, future: asyncio.Future[list[list[Hypothesis]]], size: int, deadline: float | None):
        self.future, self.deadline, self.remaining = future, deadline, size
        self.results: list[list[Hypothesis]] = [[] for _ in range(size)]


class Item:
    """One source sentence of a request: its index there, token ids, options and when it was queued
    (time.monotonic()). Identity matters: the policies keep items in sets and use them as engine keys."""

    __slots__ = ("request", "index", "tokens", "options", "enqueued")

    def __init__(self, request: Request, index: int, tokens: list[int], options: DecodeOptions, enqueued: float):
        self.request, self.index, self.tokens, self.options, self.enqueued = request, index, tokens, options, enqueued


def distinct_requests(items: list[Item]) -> list[Request]:
    """The distinct requests with a sentence in `items`, in the order of their first sentence."""
    return list({id(item.request): item.request for item in items}.values())
