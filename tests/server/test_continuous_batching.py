"""Continuous batching (server/continuous.py) on the real Translator; steps held by a permit where a test
needs to know exactly when a request joins or leaves.

No test here depends on timing: a test that joins or leaves mid-decode waits until the engine thread
is held before a step (held_before: the step boundary, where joins and drops are taken, is behind it),
sends the change, waits until the scheduler has sent it to the engine (ContinuousScheduler.running),
and only then lets the step run. A deadline passes by moving the event loop's clock, not by waiting."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest
from grpc_helpers import ONE_THREAD, TEXTS, Gate, GatedBatch, channel, eventually, serve, server_config, stub
from prometheus_client import CollectorRegistry

from nmt.engine.decoding import DecodeOptions
from nmt.engine.translator import Translator
from nmt.server.batching import DeadlineExceeded, EngineError, SchedulerClosed, SchedulerConfig
from nmt.server.config import from_args
from nmt.server.continuous import ContinuousScheduler, create_scheduler
from nmt.server.metrics import Metrics, sample_sum
from nmt.server.nmt_pb import translation_pb2 as pb
from nmt.server.scheduler import Scheduler

pytestmark = pytest.mark.asyncio
GREEDY, BEAM = DecodeOptions(beam_size=1, max_len_extra=12), DecodeOptions(beam_size=4, n_best=2, max_len_extra=12)
HOUR = 3600.0  # a deadline no test run reaches by itself


class Stepper(Gate):  # the real engine; records every decoder step, runs one per permit when held
    def __init__(self, translator: Any):
        super().__init__(translator)
        self.steps: list[tuple[int, int]] = []  # (sentences, rows) of each step
        self.arrived = 0  # steps the engine thread has come to (the last one may be waiting for its permit)
        self.permits: threading.Semaphore | None = None  # None: steps run freely
        self.fail_next = False

    def running_batch(self) -> Any:
        return Stepped(self, self.translator.running_batch())

    def hold(self) -> None:
        self.permits = threading.Semaphore(0)

    def allow(self, steps: int) -> None:
        assert self.permits is not None
        for _ in range(steps):
            self.permits.release()

    def run_freely(self) -> None:
        permits, self.permits = self.permits, None
        if permits is not None:
            permits.release()  # a step waiting for its permit


class Stepped(GatedBatch):
    def step(self) -> Any:
        stepper: Stepper = self.gate  # type: ignore[assignment]
        stepper.arrived += 1  # only the engine thread writes it
        if stepper.permits is not None and not stepper.permits.acquire(timeout=30):
            raise TimeoutError("the test never allowed the step")
        if stepper.fail_next:
            stepper.fail_next = False
            raise RuntimeError("the decoder failed")
        stepper.steps.append((len(self.batch), self.batch.rows))
        return self.batch.step()


async def started(engine: Any, **kw: Any) -> ContinuousScheduler:
    cfg = SchedulerConfig(
        **{"max_batch_size": 32, "max_batch_tokens": 4096, "max_queue_size": 64, "batching": "continuous", **kw}
    )
    scheduler = create_scheduler(engine, cfg, Metrics(CollectorRegistry(), process=False).model("tiny", "1"))
    assert isinstance(scheduler, ContinuousScheduler)
    await scheduler.start()
    return scheduler


def tokens_of(hypotheses: list[list[Any]]) -> list[list[list[int]]]:
    return [[h.tokens for h in hyps] for hyps in hypotheses]


def longest(translator: Any, options: DecodeOptions) -> list[int]:
    """The test text whose search takes the most steps alone."""
    sources = translator.tokenize(TEXTS)
    return max(sources, key=lambda s: translator.search([s], options).steps)


async def held_before(stepper: Stepper, n: int) -> None:
    """Wait until the engine thread, held with exactly n - 1 permits, waits for the permit of step n: steps
    1..n-1 ran, and step n's boundary (joins and drops taken from the inbox) is behind it, so whatever is
    sent from now on is taken at the boundary after step n."""
    await eventually(lambda: stepper.arrived == n, what=f"the engine to wait before step {n}")
    assert len(stepper.steps) == n - 1, "the test allowed more steps than it waits for"


def jump_the_loop_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Move the running event loop's clock `seconds` ahead (as aiotools' VirtualClock does): its timers that
    fall due meanwhile, such as a request's deadline (asyncio.timeout in Scheduler.submit), fire at its next
    turn. Undone when the test ends, with the test's own loop."""
    loop = asyncio.get_running_loop()
    clock = loop.time
    monkeypatch.setattr(loop, "time", lambda: clock() + seconds)


@pytest.mark.parametrize("options", [GREEDY, BEAM], ids=["greedy", "beam"])
async def test_a_request_joining_a_running_batch_gets_its_answer_alone(grpc_translator, options) -> None:
    stepper = Stepper(grpc_translator)
    first, second = longest(grpc_translator, options), grpc_translator.tokenize([TEXTS[1]])[0]
    assert grpc_translator.search([first], options).steps >= 5
    stepper.hold()
    scheduler = await started(stepper)
    running = asyncio.create_task(scheduler.submit([first], options))
    stepper.allow(2)
    await held_before(stepper, 3)
    assert scheduler.running == 1
    joining = asyncio.create_task(scheduler.submit([second], options))
    await eventually(lambda: scheduler.running == 2, what="the second request to be sent")
    assert scheduler.depth == 1  # sent, not yet taken: it waits for the engine's next step boundary
    stepper.run_freely()
    got = await asyncio.gather(running, joining)
    await scheduler.close()
    alone = [grpc_translator.search([source], options).hypotheses for source in (first, second)]
    assert [tokens_of(g) for g in got] == [tokens_of(a) for a in alone]
    for g, a in zip(got, alone):
        assert [h.score for h in g[0]] == pytest.approx([h.score for h in a[0]], abs=1e-4)
    K = options.beam_size
    assert stepper.steps[:3] == [(1, K)] * 3  # the third step's boundary had passed when the second request came
    assert stepper.steps[3] == (2, 2 * K)  # it joined at the next step boundary
    assert sample_sum(scheduler.metrics.registry, "nmt_batch_sentences_count") == len(stepper.steps)


@pytest.mark.parametrize("how", ["cancelled", "deadline"])
async def test_a_request_leaving_mid_decode_frees_its_rows(grpc_translator, how, monkeypatch) -> None:
    stepper = Stepper(grpc_translator)
    source = longest(grpc_translator, BEAM)
    stepper.hold()
    scheduler = await started(stepper)
    kept = asyncio.create_task(scheduler.submit([source], BEAM))
    deadline = time.monotonic() + HOUR if how == "deadline" else None  # passes only when the test says so
    leaving = asyncio.create_task(scheduler.submit([source], BEAM, deadline=deadline))
    stepper.allow(2)
    await held_before(stepper, 3)
    assert stepper.steps == [(2, 8), (2, 8)] and scheduler.running == 2
    if how == "cancelled":
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
    else:
        jump_the_loop_clock(monkeypatch, HOUR)
        with pytest.raises(DeadlineExceeded):
            await leaving
    await eventually(lambda: scheduler.running == 1, what="the drop to be sent")
    stepper.run_freely()
    got = await kept
    await scheduler.close()
    assert tokens_of(got) == tokens_of(grpc_translator.search([source], BEAM).hypotheses)
    assert stepper.steps[2] == (2, 8)  # the step under way when it left
    assert set(stepper.steps[3:]) == {(1, 4)}  # then its rows were freed


async def test_budgets_bound_the_running_batch(grpc_translator) -> None:
    stepper = Stepper(grpc_translator)
    scheduler = await started(stepper, max_batch_size=2)
    sources = grpc_translator.tokenize(TEXTS)
    got = await asyncio.gather(*(scheduler.submit([s], GREEDY) for s in sources))
    assert [tokens_of(g) for g in got] == [tokens_of(grpc_translator.search([s], GREEDY).hypotheses) for s in sources]
    assert max(n for n, _ in stepper.steps) == 2
    await scheduler.close()
    # Padded source tokens: two sentences of 20 tokens (+EOS) fit in 50, a third does not.
    stepper.steps.clear()
    scheduler = await started(stepper, max_batch_tokens=50)
    got = await asyncio.gather(*(scheduler.submit([[7 + i] * 20], GREEDY) for i in range(3)))
    await scheduler.close()
    assert max(n for n, _ in stepper.steps) == 2 and len(got) == 3


async def test_a_refused_request_fails_alone(grpc_translator) -> None:
    scheduler = await started(grpc_translator)
    good = asyncio.create_task(scheduler.submit([[5, 6, 7], [8]], GREEDY))
    with pytest.raises(EngineError, match=r"refused the request: source 1 has a token id outside the vocabulary"):
        await scheduler.submit([[9], [10**6]], GREEDY)
    assert len(await good) == 2
    await scheduler.close()


async def test_an_engine_failure_fails_its_batch_and_the_next_one_starts_empty(grpc_translator) -> None:
    stepper = Stepper(grpc_translator)
    scheduler = await started(stepper)
    stepper.fail_next = True
    jobs = [asyncio.create_task(scheduler.submit([[5 + i, 6]], BEAM)) for i in range(2)]
    for job in jobs:
        with pytest.raises(EngineError, match="failed on a running batch of 2 sentences: the decoder failed"):
            await job
    assert tokens_of(await scheduler.submit([[5, 6]], BEAM)) == tokens_of(
        grpc_translator.search([[5, 6]], BEAM).hypotheses
    )
    await scheduler.close()


async def test_close_finishes_running_and_queued_requests_then_refuses(grpc_translator) -> None:
    stepper = Stepper(grpc_translator)
    stepper.hold()
    scheduler = await started(stepper, max_batch_size=1)
    jobs = [asyncio.create_task(scheduler.submit([[5 + i, 6, 7]], GREEDY)) for i in range(3)]
    stepper.allow(1)
    await held_before(stepper, 2)  # the first request is being decoded
    closing = asyncio.create_task(scheduler.close(timeout=30))
    await asyncio.sleep(0)  # one turn of the loop (no waiting): close() has begun
    with pytest.raises(SchedulerClosed):
        await scheduler.submit([[5]], GREEDY)
    stepper.run_freely()
    await closing
    assert all(len(r) == 1 for r in await asyncio.gather(*jobs))


async def test_static_batching_is_still_there(grpc_translator) -> None:
    scheduler = create_scheduler(grpc_translator, SchedulerConfig(batching="static", max_wait_s=0.0))
    assert type(scheduler) is Scheduler
    await scheduler.start()
    sources = grpc_translator.tokenize(TEXTS)
    got = await scheduler.submit(sources, BEAM)
    await scheduler.close()
    assert tokens_of(got) == tokens_of(grpc_translator.search(sources, BEAM).hypotheses)


async def test_a_format_2_bundle_asked_for_continuous_batching_is_served_static(format2_bundle, caplog) -> None:
    caplog.set_level(logging.WARNING)
    translator = Translator.from_bundle(format2_bundle, ONE_THREAD)
    cfg = server_config(format2_bundle, batching="continuous")
    async with serve(cfg, translator) as server, channel(server) as ch:
        assert type(server.scheduler) is Scheduler and server.scheduler.cfg.batching == "static"
        response = await stub(ch).Translate(pb.TranslateRequest(texts=TEXTS[:2]))
    assert len(response.translations) == 2
    assert (
        "continuous batching is not possible (the bundle's decoder has no past_mask input (bundle format "
        "before 3): re-export it for continuous batching): serving with static batching"
    ) in caplog.text


async def test_the_batching_flag_and_its_environment_variable() -> None:
    assert from_args([], {"NMT_MODEL_DIR": "/b"}).scheduler().batching == "static"
    assert from_args([], {"NMT_MODEL_DIR": "/b", "NMT_BATCHING": "static"}).batching == "static"
    assert (
        from_args(["--batching", "continuous"], {"NMT_MODEL_DIR": "/b", "NMT_BATCHING": "static"}).batching
        == "continuous"
    )
    with pytest.raises(SystemExit):
        from_args(["--batching", "dynamic"], {"NMT_MODEL_DIR": "/b"})
    with pytest.raises(ValueError, match="^batching must be one of continuous, static, got 'dynamic'$"):
        SchedulerConfig(batching="dynamic")
