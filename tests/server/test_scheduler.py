"""The dynamic-batching scheduler on the real Translator (held at a gate where a test needs a busy engine)."""

from __future__ import annotations

import asyncio
import time

import pytest
from grpc_helpers import TEXTS, Gate, eventually
from prometheus_client import CollectorRegistry

from nmt.engine.decoding import DecodeOptions
from nmt.server.batching import DeadlineExceeded, EngineError, QueueFull, SchedulerClosed, SchedulerConfig
from nmt.server.metrics import Metrics, sample_sum
from nmt.server.scheduler import Scheduler

pytestmark = pytest.mark.asyncio
GREEDY, BEAM = DecodeOptions(beam_size=1, max_len_extra=8), DecodeOptions(beam_size=3, max_len_extra=8)


def cfg(**kw: object) -> SchedulerConfig:
    return SchedulerConfig(
        **{"max_batch_size": 32, "max_batch_tokens": 4096, "max_wait_s": 0.0, "max_queue_size": 64, "workers": 1, **kw}
    )


async def started(engine: object, **kw: object) -> Scheduler:
    series = Metrics(CollectorRegistry(), process=False).model("tiny", "1")
    scheduler = Scheduler(engine, cfg(**kw), series)  # type: ignore[arg-type]
    await scheduler.start()
    return scheduler


def tokens_of(hypotheses: list[list[object]]) -> list[list[int]]:
    return [[h.tokens for h in hyps] for hyps in hypotheses]  # type: ignore[attr-defined]


async def blocked(gate: Gate, scheduler: Scheduler) -> asyncio.Task:
    """Close the gate and occupy the only worker with a one-sentence request."""
    gate.close()
    task = asyncio.create_task(scheduler.submit([[5, 6]], GREEDY))
    await eventually(gate.entered.is_set, what="the engine to start")
    gate.calls.clear()
    return task


async def test_results_in_order_across_batches(gate: Gate, grpc_translator: object) -> None:
    sources = grpc_translator.tokenize(TEXTS)  # type: ignore[attr-defined]
    expected = tokens_of(grpc_translator.search(sources, BEAM).hypotheses)  # type: ignore[attr-defined]
    scheduler = await started(gate, max_batch_size=3)
    try:
        got = await scheduler.submit(sources, BEAM)
    finally:
        await scheduler.close()
    assert tokens_of(got) == expected
    assert [len(s) for s, _ in gate.calls] == [3, 3, 2]
    assert sample_sum(scheduler.metrics.registry, "nmt_batch_sentences_sum") == len(TEXTS)  # type: ignore


async def test_batches_hold_one_options_and_group_lengths(gate: Gate) -> None:
    scheduler = await started(gate, max_batch_size=3)
    first = await blocked(gate, scheduler)
    lengths = [1, 20, 2, 21, 3, 22]
    jobs = [asyncio.create_task(scheduler.submit([[7] * n], GREEDY)) for n in lengths]
    jobs += [asyncio.create_task(scheduler.submit([[8] * 2, [9] * 3], BEAM))]
    await eventually(lambda: scheduler.depth == len(lengths) + 2, what="the queue to fill")
    gate.open()
    await asyncio.gather(first, *jobs)
    await scheduler.close()
    batches = [(sorted(len(s) for s in sources), options) for sources, options in gate.calls]
    assert batches == [([1, 2, 3], GREEDY), ([20, 21, 22], GREEDY), ([2, 3], BEAM)]


async def test_token_budget_flushes_a_batch(gate: Gate) -> None:
    scheduler = await started(gate, max_batch_tokens=50)  # two of 20 tokens (+EOS) fit, three do not
    first = await blocked(gate, scheduler)
    jobs = [asyncio.create_task(scheduler.submit([[7] * 20], GREEDY)) for _ in range(3)]
    await eventually(lambda: scheduler.depth == 3)
    gate.open()
    await asyncio.gather(first, *jobs)
    await scheduler.close()
    assert [len(s) for s, _ in gate.calls] == [2, 1]


async def test_waits_for_a_batch_to_fill(gate: Gate) -> None:
    scheduler = await started(gate, max_wait_s=0.3, max_batch_size=4)
    started_at = time.monotonic()
    jobs = [asyncio.create_task(scheduler.submit([[7, 8]], GREEDY)) for _ in range(3)]
    await asyncio.gather(*jobs)
    waited = time.monotonic() - started_at  # a lower bound only: a loaded machine may take longer
    await scheduler.close()
    assert [len(s) for s, _ in gate.calls] == [3] and waited >= 0.3


async def test_a_full_batch_goes_at_once(gate: Gate) -> None:
    scheduler = await started(gate, max_wait_s=3600.0, max_batch_size=4)  # only a full batch goes in this test
    jobs = [asyncio.create_task(scheduler.submit([[7, 8]], GREEDY)) for _ in range(4)]
    await asyncio.wait_for(asyncio.gather(*jobs), timeout=60)  # a batch that waited for max_wait_s would time out
    await scheduler.close()
    assert [len(s) for s, _ in gate.calls] == [4]


async def test_engine_error_fails_only_the_request_that_caused_it(gate: Gate) -> None:
    scheduler = await started(gate)
    first = await blocked(gate, scheduler)
    good = asyncio.create_task(scheduler.submit([[5, 6, 7], [8]], GREEDY))
    bad = asyncio.create_task(scheduler.submit([[10**6], [9]], GREEDY))  # outside the vocabulary: the engine raises
    await eventually(lambda: scheduler.depth == 4)
    gate.open()
    await first
    assert len(await good) == 2  # its batch mate failed the batch; it ran again alone
    with pytest.raises(EngineError, match="outside the vocabulary"):
        await bad
    assert [len(sources) for sources, _ in gate.calls] == [4, 2, 2]  # together, then each request alone
    assert await scheduler.submit([[5]], GREEDY)  # and the scheduler goes on
    await scheduler.close()


async def test_expired_request_is_dropped_before_compute(gate: Gate) -> None:
    scheduler = await started(gate)
    first = await blocked(gate, scheduler)
    with pytest.raises(DeadlineExceeded):
        await scheduler.submit([[5, 6, 7, 8]], GREEDY, deadline=time.monotonic() + 0.05)
    assert scheduler.depth == 0
    gate.open()
    await first
    await scheduler.close()
    assert all(sources != [[5, 6, 7, 8]] for sources, _ in gate.calls)


async def test_cancelled_request_leaves_the_queue(gate: Gate) -> None:
    scheduler = await started(gate)
    first = await blocked(gate, scheduler)
    job = asyncio.create_task(scheduler.submit([[5, 6], [7, 8, 9]], GREEDY))
    await eventually(lambda: scheduler.depth == 2)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert scheduler.depth == 0
    assert sample_sum(scheduler.metrics.registry, "nmt_queue_sentences") == 0  # type: ignore[union-attr]
    gate.open()
    await first
    await scheduler.close()
    assert len(gate.calls) == 0


async def test_queue_full(gate: Gate) -> None:
    scheduler = await started(gate, max_queue_size=3)
    first = await blocked(gate, scheduler)
    queued = asyncio.create_task(scheduler.submit([[5], [6]], GREEDY))
    await eventually(lambda: scheduler.depth == 2)
    with pytest.raises(QueueFull, match=r"max_queue_size is 3, retry in \d+ ms") as e:
        await scheduler.submit([[5], [6]], GREEDY)
    assert 0.05 <= e.value.retry_after_s <= 30.0
    gate.open()
    assert len(await queued) == 2
    await first
    await scheduler.close()


async def test_close_finishes_queued_requests_then_refuses(gate: Gate) -> None:
    scheduler = await started(gate, max_batch_size=1)
    first = await blocked(gate, scheduler)
    jobs = [asyncio.create_task(scheduler.submit([[5 + i]], GREEDY)) for i in range(4)]
    await eventually(lambda: scheduler.depth == 4)
    closing = asyncio.create_task(scheduler.close(timeout=10))
    await asyncio.sleep(0)
    with pytest.raises(SchedulerClosed):
        await scheduler.submit([[5]], GREEDY)
    gate.open()
    await closing
    assert all(len(r) == 1 for r in await asyncio.gather(first, *jobs))


async def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="max_batch_size must be at least 1, got 0"):
        SchedulerConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="max_wait_s must be >= 0"):
        SchedulerConfig(max_wait_s=-1)
