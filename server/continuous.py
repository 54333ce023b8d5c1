"""Continuous (iteration-level) batching: requests join and leave the running decode between steps.

Orca's idea (OSDI '22) at this decoder's size. Each worker is an engine thread that owns a
RunningBatch (engine/continuous.py: the KV cache of every sentence being decoded) and loops:
take what the event loop sent (sentences to admit, sentences to drop), free the dropped rows,
run the encoder for the newcomers and append their rows, run one decoder step, post the finished
sentences back to the event loop; sleep only when it has nothing to decode. The event loop never
holds the engine up: it answers finished requests, tokenizes and queues new ones while the next
step runs.

The event loop decides who joins, whenever something changes (a request queued or gone, a
sentence finished): queued sentences are sent, oldest first, while the engine's batch (as far as
the loop knows) keeps within max_batch_size sentences and max_batch_tokens padded source tokens
(sentences x (longest source + EOS)); the first that does not fit waits, and so does everything
behind it (no overtaking: no starvation); an empty batch always takes the oldest. Nothing waits
for a batch to fill: an idle server starts a request at once. Sentences whose request is gone
(cancelled, past its deadline) are dropped at the next step boundary, freeing their rows.
A request is answered when its last sentence finishes.

A request whose sources the engine refuses (a token outside the vocabulary, too long) fails alone
with EngineError before it is queued. When the engine fails during a step, every request in that
batch fails with EngineError (a step computes all rows together) and the next batch starts empty.

Metrics: nmt_batch_sentences / nmt_batch_tokens and nmt_decode_duration_seconds are observed per
decoder step (the batch that step ran), nmt_encode_duration_seconds per admission,
nmt_queue_wait_seconds when a sentence is sent to the engine.

create_scheduler (below) picks the policy: it lives here, beside the subclass, because this module
already imports the static Scheduler; server/scheduler.py imports nothing of this one (no cycle).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from nmt.engine.continuous import Finished, NoPastMask, RunningBatch
from nmt.engine.decoding import DecodeOptions

from .batching import EngineError, Item, SchedulerClosed, SchedulerConfig, distinct_requests
from .metrics import ModelMetrics
from .scheduler import Scheduler

log = logging.getLogger(__name__)


def continuous_unsupported(engine: Any) -> str | None:
    """Why `engine` cannot batch continuously (None: it can)."""
    if not callable(getattr(engine, "running_batch", None)):
        return f"the engine {type(engine).__name__} has no running_batch()"
    try:
        engine.running_batch()
    except NoPastMask as e:
        return str(e)
    return None


@dataclass
class _Report:
    """What the engine thread did since its last report: posted to the event loop."""

    encode_seconds: list[float] = field(default_factory=list)  # per admission
    steps: list[tuple[int, int, float]] = field(default_factory=list)  # per step: sentences, padded tokens, seconds
    finished: list[Finished] = field(default_factory=list)
    failed: tuple[list[Item], Exception] | None = None  # the batch's sentences, when the engine raised
    taken: list[Item] = field(default_factory=list)  # taken from the inbox (admitted, or dropped on the way)


class _EngineThread:
    """One worker: a RunningBatch stepped in a thread; the event loop talks to it through an inbox."""

    def __init__(self, new_batch: Callable[[], RunningBatch], post: Callable[[_Report], None]):
        self.new_batch, self.post = new_batch, post
        self.batch = new_batch()
        self.inbox: deque[tuple[list[Item], set[Item]]] = deque()  # (joining, leaving), thread-safe
        self.wake = threading.Event()
        self.stopping = False
        self.running: set[Item] = set()  # the event loop's view: sent and not reported finished or dropped
        self.waiting: set[Item] = set()  # the event loop's view: sent and not yet taken from the inbox
        self.report = _Report()  # posted when it has news: finished or failed sentences
        self.joining: list[Item] = []  # being admitted (not yet among the batch's keys)

    def send(self, joining: list[Item], leaving: set[Item]) -> None:
        """From the event loop: admit and drop at the next step boundary."""
        self.running.difference_update(leaving)
        self.running.update(joining)
        self.waiting.update(joining)
        self.inbox.append((joining, leaving))
        self.wake.set()

    def stop(self) -> None:
        """From the event loop: return at the next step boundary, whatever is left."""
        self.stopping = True
        self.wake.set()

    def run(self) -> None:
        """The thread's loop: admit, drop, step, report; sleep when there is nothing to decode."""
        while not self.stopping:
            if not self.inbox and not len(self.batch):
                self.wake.wait()
                self.wake.clear()  # then drain: a send between wait() and clear() is not lost
                continue
            try:
                self._turn(self.report)
            except Exception as e:  # noqa: BLE001 - the event loop fails the batch's requests
                items = [key for key in self.batch.keys() if isinstance(key, Item)]
                self.report.failed = (items + [i for i in self.joining if i not in items], e)
                self.batch = self.new_batch()
            if self.report.finished or self.report.failed:
                report, self.report = self.report, _Report()
                self.post(report)

    def _turn(self, report: _Report) -> None:
        leaving: set[Item] = set()
        self.joining = []
        while self.inbox:
            more, gone = self.inbox.popleft()
            self.joining += more
            leaving |= gone
        self.batch.drop(leaving)
        if self.joining:
            self.post(_Report(taken=list(self.joining)))  # they count as queued until now
            started = time.perf_counter()
            self.batch.admit([(item, item.tokens, item.options) for item in self.joining if item not in leaving])
            report.encode_seconds.append(time.perf_counter() - started)
        self.joining = []
        if len(self.batch):
            size = (len(self.batch), len(self.batch) * self.batch.src_len)
            started = time.perf_counter()
            report.finished += self.batch.step()
            report.steps.append((*size, time.perf_counter() - started))


class ContinuousScheduler(Scheduler):
    def __init__(self, engine: Any, cfg: SchedulerConfig, metrics: ModelMetrics | None = None):
        super().__init__(engine, cfg, metrics)
        self._checker: RunningBatch = engine.running_batch()  # for check() only
        self._engines: list[_EngineThread] = []
        self._busy_s = 0.0  # engine seconds since a sentence last finished

    @property
    def depth(self) -> int:
        """Sentences waiting to join a batch: queued, or sent to an engine thread that has not taken them yet."""
        waiting = sum(1 for engine in self._engines for item in engine.waiting if not item.request.future.done())
        return len(self._queue) + waiting

    @property
    def running(self) -> int:
        """Sentences sent to an engine thread and not yet finished or sent to be dropped (the event loop's
        view, which changes the moment a join or a drop is sent: the engine applies it at its next step
        boundary). Tests wait on it to know that a join or a leave has reached the engine."""
        return sum(len(engine.running) for engine in self._engines)

    def _validate(self, sources: list[list[int]], options: DecodeOptions) -> None:
        try:
            self._checker.check(sources, options)
        except ValueError as e:
            raise EngineError(f"the engine refused the request: {e}") from None

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        post = lambda report: loop.call_soon_threadsafe(self._receive, report)  # noqa: E731
        self._engines = [_EngineThread(self.engine.running_batch, post) for _ in range(self.cfg.workers)]
        threads = [loop.run_in_executor(self._executor, engine.run) for engine in self._engines]
        try:
            while not (self._closing and not self._queue and not any(e.running for e in self._engines)):
                try:
                    self._drop_expired()
                    for engine in self._engines:
                        self._feed(engine)
                except Exception as e:  # noqa: BLE001 - a bug here must not leave every caller waiting
                    log.exception("the dispatcher failed; failing the queued requests")
                    for item in list(self._queue):
                        self._fail(item.request, EngineError(f"scheduler error: {e}"))
                self._wakeup.clear()
                await self._wakeup.wait()
        except asyncio.CancelledError:  # close() gave up waiting: nobody may be left hanging
            for engine in self._engines:
                for request in distinct_requests(list(engine.running)):
                    self._fail(request, SchedulerClosed("the server shut down before the request was computed"))
            raise
        finally:
            for engine in self._engines:
                engine.stop()
        await asyncio.gather(*threads)

    def _feed(self, engine: _EngineThread) -> None:
        """Send `engine` the queued sentences that fit beside its running ones, and the ones to drop."""
        leaving = {item for item in engine.running if item.request.future.done()}
        count = len(engine.running) - len(leaving)
        width = max((len(item.tokens) + 1 for item in engine.running - leaving), default=0)
        joining: list[Item] = []
        for item in self._queue:
            widest = max(width, len(item.tokens) + 1)
            if count and (count + 1 > self.cfg.max_batch_size or (count + 1) * widest > self.cfg.max_batch_tokens):
                break
            joining.append(item)
            count, width = count + 1, widest
        if joining:
            del self._queue[: len(joining)]
            self._observe_joining(joining)
            self._changed()
        if joining or leaving:
            engine.send(joining, leaving)

    def _observe_joining(self, items: list[Item]) -> None:
        if self.metrics is None:
            return
        now = time.monotonic()
        for item in items:
            self.metrics.queue_wait.observe(now - item.enqueued)
        self.metrics.input_tokens.inc(sum(len(item.tokens) for item in items))

    def _receive(self, report: _Report) -> None:
        """On the event loop: metrics and pace; answer finished sentences; fail a failed batch; refill."""
        self._observe(report)
        for engine in self._engines:
            engine.waiting.difference_update(report.taken)
        for item, hypotheses in report.finished:
            assert isinstance(item, Item)
            for engine in self._engines:
                engine.running.discard(item)
            request = item.request
            if request.future.done():  # cancelled or expired meanwhile
                continue
            request.results[item.index] = hypotheses
            request.remaining -= 1
            if request.remaining == 0:
                request.future.set_result(request.results)
        if report.failed is not None:
            self._batch_failed(*report.failed)
        self._changed()  # rows were freed: the dispatcher sends what fits now; the queue gauge follows

    def _observe(self, report: _Report) -> None:
        m = self.metrics
        seconds = sum(report.encode_seconds) + sum(s for _, _, s in report.steps)
        self._busy_s += seconds
        if report.finished:
            per_sentence = self._busy_s / len(report.finished)
            self._seconds_per_sentence = 0.8 * self._seconds_per_sentence + 0.2 * per_sentence
            self._busy_s = 0.0
        if m is None:
            return
        for encode in report.encode_seconds:
            m.encode_seconds.observe(encode)
        for sentences, tokens, step_seconds in report.steps:
            m.batch_sentences.observe(sentences)
            m.batch_tokens.observe(tokens)
            m.decode_seconds.observe(step_seconds)
        m.generated_tokens.inc(sum(len(h.tokens) for _, hyps in report.finished for h in hyps))

    def _batch_failed(self, items: list[Item], error: Exception) -> None:
        log.error("engine failed on a running batch of %d sentences", len(items), exc_info=error)
        failure = EngineError(f"the engine failed on a running batch of {len(items)} sentences: {error}")
        for engine in self._engines:
            engine.running.difference_update(items)
            engine.waiting.difference_update(items)
        for request in distinct_requests(items):
            self._fail(request, failure)


def create_scheduler(engine: Any, cfg: SchedulerConfig, metrics: ModelMetrics | None = None) -> Scheduler:
    """The scheduler of cfg.batching. Continuous batching needs an engine with running_batch() and a
    bundle whose decoder takes past_mask (format 3); otherwise static batching, said in a log line."""
    if cfg.batching == "continuous":
        reason = continuous_unsupported(engine)
        if reason is None:
            return ContinuousScheduler(engine, cfg, metrics)
        log.warning("continuous batching is not possible (%s): serving with static batching", reason)
        cfg = replace(cfg, batching="static")
    return Scheduler(engine, cfg, metrics)
