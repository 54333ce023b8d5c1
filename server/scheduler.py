"""Batching: sentences from every caller are queued and run through the engine together.

Two policies (SchedulerConfig.batching; create_scheduler in server/continuous.py picks the class;
what both share, config, errors, a request's queued sentences, is server/batching.py's):
- "continuous" (server/continuous.py): iteration-level batching. Between two decoder
  steps, queued sentences run the encoder and join the running batch, and finished ones leave and
  are answered at once; see that module.
- "static" (Scheduler, below; the default, faster on the CPUs measured: README "Batching
  policy"): a batch is formed, decoded until its last sentence ends, and only then is the next one formed. Bundles whose decoder has no past_mask input (format < 3) can
  only be served this way.

Static policy (one dispatcher task; `workers` engine threads):
- A batch is formed only when a worker is free, so while the engine is busy the queue fills
  and the next batch is as large as the limits allow (batching grows with load by itself).
- A batch always contains the oldest queued sentence (no starvation) and only sentences with
  the same DecodeOptions (one search call has one set of options). It is sent when it is full
  (`max_batch_size` sentences, or one more sentence would pass `max_batch_tokens` padded source
  tokens) or when its oldest sentence has waited `max_wait_s`; with 0 it goes at once.
- Its other sentences are the queued ones of nearest length to the oldest (less padding).
- A request's sentences may go into several batches; its results are reassembled in order.
- Expired requests are dropped before compute (DeadlineExceeded); a cancelled request leaves the
  queue at once. When the engine fails on a batch holding several requests, each request runs
  again alone: only a request that fails by itself gets the EngineError, never its batch mates.
- More than `max_queue_size` queued sentences -> QueueFull, the caller's sign to back off; it
  carries how long the queue should take to drain (from the recent seconds per sentence).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from nmt.engine.decoding import DecodeOptions, Hypothesis, SearchResult

from .batching import (
    DeadlineExceeded,
    EngineError,
    Item,
    QueueFull,
    Request,
    SchedulerClosed,
    SchedulerConfig,
    distinct_requests,
)
from .metrics import ModelMetrics

# The errors and SchedulerConfig are server/batching.py's; they are imported here too, by callers that
# know the scheduler alone (server/service.py, server/transport.py).
__all__ = ["DeadlineExceeded", "Engine", "EngineError", "QueueFull", "Scheduler", "SchedulerClosed", "SchedulerConfig"]
log = logging.getLogger(__name__)
RETRY_AFTER_S = (0.05, 30.0)  # bounds of QueueFull.retry_after_s
SECONDS_PER_SENTENCE = 0.05  # the drain estimate before the first batch has been timed


class Engine(Protocol):
    def search(self, sources: list[list[int]], options: DecodeOptions) -> SearchResult: ...


class Scheduler:
    def __init__(self, engine: Engine, cfg: SchedulerConfig, metrics: ModelMetrics | None = None):
        self.engine, self.cfg, self.metrics = engine, cfg, metrics
        self._queue: list[Item] = []
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(cfg.workers)
        self._running: set[asyncio.Task[None]] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._closing = False
        self._seconds_per_sentence = SECONDS_PER_SENTENCE  # moving average over recent batches

    @property
    def depth(self) -> int:
        """Sentences waiting for a batch."""
        return len(self._queue)

    async def start(self) -> None:
        if self._dispatcher is None:
            self._executor = ThreadPoolExecutor(self.cfg.workers, thread_name_prefix="nmt-engine")
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch(), name="nmt-dispatcher")

    async def submit(
        self, sources: list[list[int]], options: DecodeOptions, deadline: float | None = None
    ) -> list[list[Hypothesis]]:
        """Hypotheses per source, in order. `deadline` is a time.monotonic() value (None: none)."""
        if self._closing or self._dispatcher is None:
            raise SchedulerClosed("the server is shutting down" if self._closing else "the scheduler is not started")
        if not sources:
            return []
        if self.depth + len(sources) > self.cfg.max_queue_size:
            wait = self.retry_after_s()
            raise QueueFull(
                f"the queue holds {self.depth} sentences and this request has {len(sources)}; "
                f"max_queue_size is {self.cfg.max_queue_size}, retry in {wait * 1000:.0f} ms",
                wait,
            )
        self._validate(sources, options)
        request = Request(asyncio.get_running_loop().create_future(), len(sources), deadline)
        now = time.monotonic()
        self._queue.extend(Item(request, i, tokens, options, now) for i, tokens in enumerate(sources))
        self._changed()
        try:
            async with asyncio.timeout(None if deadline is None else max(0.0, deadline - now)):
                return await request.future
        except TimeoutError:
            self._forget(request)
            raise DeadlineExceeded("the deadline passed before the translation was done") from None
        except asyncio.CancelledError:
            self._forget(request)  # the caller went away: its sentences leave the queue
            raise

    def retry_after_s(self) -> float:
        """About how long the queued sentences take to compute, at the recent pace."""
        low, high = RETRY_AFTER_S
        return min(high, max(low, self.depth * self._seconds_per_sentence / self.cfg.workers))

    async def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, finish the queued and running ones (within `timeout`), free the threads."""
        self._closing = True
        self._wakeup.set()
        pending = [t for t in (self._dispatcher, *self._running) if t is not None]
        if pending:
            _, late = await asyncio.wait(pending, timeout=timeout)
            for task in late:
                task.cancel()
            for item in list(self._queue):
                self._fail(item.request, SchedulerClosed("the server shut down before the request was computed"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _validate(self, sources: list[list[int]], options: DecodeOptions) -> None:
        """Refuse a request before it is queued (EngineError); static batching lets the engine find out."""

    def _changed(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.depth)
        self._wakeup.set()

    def _forget(self, request: Request) -> None:
        if not request.future.done():
            request.future.cancel()
        self._queue = [item for item in self._queue if item.request is not request]
        self._changed()

    def _fail(self, request: Request, error: Exception) -> None:
        if not request.future.done():
            request.future.set_exception(error)
        self._forget(request)

    async def _dispatch(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except Exception as e:  # noqa: BLE001 - a bug here must not leave every caller waiting
                log.exception("the dispatcher failed; failing the queued requests")
                for item in list(self._queue):
                    self._fail(item.request, EngineError(f"scheduler error: {e}"))
                self._slots.release()
                continue
            if batch is None:
                self._slots.release()
                return
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _next_batch(self) -> list[Item] | None:
        """Wait until a batch is due (full, or its oldest sentence has waited max_wait_s); take it."""
        while True:
            self._drop_expired()
            if not self._queue:
                if self._closing:
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch, full = self._select()
            wait = batch[0].enqueued + self.cfg.max_wait_s - time.monotonic()
            if full or wait <= 0 or self._closing:
                taken = set(map(id, batch))
                self._queue = [item for item in self._queue if id(item) not in taken]
                self._changed()
                return batch
            self._wakeup.clear()
            try:
                async with asyncio.timeout(wait):
                    await self._wakeup.wait()
            except TimeoutError:
                pass

    def _select(self) -> tuple[list[Item], bool]:
        """The oldest sentence and the queued ones nearest its length with its options; whether that is full."""
        oldest = self._queue[0]
        size, budget = self.cfg.max_batch_size, self.cfg.max_batch_tokens
        peers = [item for item in self._queue[1:] if item.options == oldest.options]
        peers.sort(key=lambda item: abs(len(item.tokens) - len(oldest.tokens)))
        batch, longest, full = [oldest], len(oldest.tokens) + 1, False
        for item in peers:
            if len(batch) == size:
                break
            width = max(longest, len(item.tokens) + 1)
            if (len(batch) + 1) * width > budget:
                full = True  # this one waits for the next batch
                continue
            batch.append(item)
            longest = width
        return batch, full or len(batch) == size

    def _drop_expired(self) -> None:
        now = time.monotonic()
        for request in {id(i.request): i.request for i in self._queue if i.request.deadline is not None}.values():
            if request.deadline is not None and request.deadline <= now:
                self._fail(request, DeadlineExceeded("the deadline passed while the request was queued"))

    async def _run(self, batch: list[Item]) -> None:
        started = time.monotonic()
        try:
            try:
                result = await self._search(batch)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - every waiting request must hear of it
                await self._run_apart(batch, e)
                return
        except asyncio.CancelledError:  # close() gave up waiting: nobody may be left hanging
            for request in distinct_requests(batch):
                self._fail(request, SchedulerClosed("the server shut down before the request was computed"))
            raise
        finally:
            self._slots.release()
        self._done(batch, started, result)

    async def _search(self, batch: list[Item]) -> SearchResult:
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(
            self._executor, self.engine.search, [item.tokens for item in batch], batch[0].options
        )
        assert len(result.hypotheses) == len(batch), "the engine returned a result per source"
        return result

    async def _run_apart(self, batch: list[Item], error: Exception) -> None:
        """The engine failed on `batch`: run each of its requests alone, so one bad request fails by itself."""
        groups: dict[int, list[Item]] = {}
        for item in batch:
            groups.setdefault(id(item.request), []).append(item)
        if len(groups) == 1:
            self._engine_failed(batch, error)
            return
        log.warning(
            "engine failed on a batch of %d sentences from %d requests (%s: %s); running each request alone",
            len(batch),
            len(groups),
            type(error).__name__,
            error,
        )
        for items in groups.values():
            if items[0].request.future.done():  # cancelled or expired meanwhile
                continue
            started = time.monotonic()
            try:
                result = await self._search(items)
            except Exception as e:  # noqa: BLE001 - this request's own failure
                self._engine_failed(items, e)
                continue
            self._done(items, started, result)

    def _engine_failed(self, items: list[Item], error: Exception) -> None:
        log.error("engine failed on a batch of %d sentences", len(items), exc_info=error)
        failure = EngineError(f"the engine failed on a batch of {len(items)} sentences: {error}")
        for request in distinct_requests(items):
            self._fail(request, failure)

    def _done(self, batch: list[Item], started: float, result: SearchResult) -> None:
        """Record the batch's pace and metrics; hand each sentence's hypotheses to its request."""
        per_sentence = (time.monotonic() - started) / len(batch)
        self._seconds_per_sentence = 0.8 * self._seconds_per_sentence + 0.2 * per_sentence
        self._observe(batch, started, result)
        for item, hypotheses in zip(batch, result.hypotheses):
            request = item.request
            if request.future.done():  # failed, expired or cancelled meanwhile
                continue
            request.results[item.index] = hypotheses
            request.remaining -= 1
            if request.remaining == 0:
                request.future.set_result(request.results)

    def _observe(self, batch: list[Item], started: float, result: SearchResult) -> None:
        m = self.metrics
        if m is None:
            return
        for item in batch:
            m.queue_wait.observe(started - item.enqueued)
        m.batch_sentences.observe(len(batch))
        m.batch_tokens.observe(len(batch) * (max(len(item.tokens) for item in batch) + 1))
        m.encode_seconds.observe(result.encode_seconds)
        m.decode_seconds.observe(result.decode_seconds)
        m.input_tokens.inc(sum(len(item.tokens) for item in batch))
        m.generated_tokens.inc(sum(len(h.tokens) for hyps in result.hypotheses for h in hyps))
