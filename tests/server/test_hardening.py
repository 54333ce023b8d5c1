"""Regression tests for what real clients sent (issue 10, defects 1-4 and 6), each on a real loopback
server: out-of-range options, malformed and oversized messages, tokenizing off the event loop,
request counts that match what clients saw, blank texts."""

from __future__ import annotations

import asyncio
import logging
import statistics
import threading
import time
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import TEXTS, Gate, channel, eventually, serve, server_config, stub

from nmt.server.metrics import sample_sum
from nmt.server.nmt_pb import translation_pb2 as pb

pytestmark = pytest.mark.asyncio
CODE = grpc.StatusCode
TRANSLATE, STREAM = "/nmt.v1.TranslationService/Translate", "/nmt.v1.TranslationService/TranslateStream"
BAD_UTF8 = b"\x0a\x03a\xff\xfe"  # field 1 (texts), 3 bytes: not UTF-8
CORRUPT = b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"  # a varint tag longer than 64 bits


async def status(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return CODE.OK, ""


def count(server: Any, method: str, code: str) -> float:
    return sample_sum(server.registry, "nmt_requests_total", {"method": method, "code": code}) or 0.0


def problems(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log records with a traceback, or at ERROR and above."""
    return [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_length_penalty_out_of_range_is_invalid_argument(default_server) -> None:
    async with channel(default_server) as ch:
        for alpha in (1e4, float("inf"), -1.0, float("nan"), 3.4e38):
            options = pb.DecodeOptions(beam_size=2, length_penalty=alpha)
            request = pb.TranslateRequest(texts=["A dog."], options=options)
            code, details = await status(stub(ch).Translate(request))
            assert code == CODE.INVALID_ARGUMENT, (alpha, details)
            assert "length_penalty must be a finite number between 0 and 10" in details
        options = pb.DecodeOptions(beam_size=2, length_penalty=10.0, max_len_extra=20)
        request = pb.TranslateRequest(texts=TEXTS, options=options)
        assert (await status(stub(ch).Translate(request)))[0] == CODE.OK


async def test_a_failing_request_does_not_fail_its_batch_mates(grpc_bundle, gate) -> None:
    """The engine raises on a batch holding a poisoned source (a token outside the vocabulary)."""
    poison = gate.translator.tokenize(["poison"])[0]
    # One batch of both, however long the second takes to arrive: a batch goes only when full (an hour's wait).
    cfg = server_config(grpc_bundle, max_wait_ms=3.6e6, max_batch_size=2, batching="static")
    async with serve(cfg, gate) as server, channel(server) as ch:
        gate.tokenize = lambda texts: [s + [10**6] if s == poison else s for s in gate.translator.tokenize(texts)]
        gate.close()
        good = stub(ch).Translate(pb.TranslateRequest(texts=["A dog runs."]))
        bad = stub(ch).Translate(pb.TranslateRequest(texts=["poison"]))
        await eventually(gate.entered.is_set)
        gate.open()
        (good_code, _), (bad_code, details) = await asyncio.gather(status(good), status(bad))
    assert [len(sources) for sources, _ in gate.calls] == [2, 1, 1]  # together, then each alone
    assert (good_code, bad_code) == (CODE.OK, CODE.INTERNAL) and "outside the vocabulary" in details


async def test_malformed_messages_are_invalid_argument_logged_once_and_counted(default_server, caplog) -> None:
    caplog.set_level(logging.INFO)
    async with channel(default_server) as ch:
        raw = ch.unary_unary(TRANSLATE)  # bytes in, bytes out: no serializer
        answers = [await status(raw(body)) for body in (CORRUPT, BAD_UTF8) * 10]
        stream = ch.stream_stream(STREAM)
        good = pb.TranslateStreamRequest(id="1", texts=["A dog."]).SerializeToString()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            _ = [r async for r in stream(iter([good, BAD_UTF8]))]
        health = ch.unary_unary("/grpc.health.v1.Health/Check")
        health_code, _ = await status(health(CORRUPT))
        still = await stub(ch).Translate(pb.TranslateRequest(texts=["A dog."]))
    assert {code for code, _ in answers} == {CODE.INVALID_ARGUMENT}
    assert all(details.startswith("malformed request message: Error parsing message") for _, details in answers)
    assert "bad UTF-8" in answers[1][1]
    assert e.value.code() == CODE.INVALID_ARGUMENT and health_code == CODE.INVALID_ARGUMENT
    assert len(still.translations) == 1
    assert count(default_server, "Translate", "INVALID_ARGUMENT") == 20
    assert count(default_server, "TranslateStream", "INVALID_ARGUMENT") == 1
    refused = [r.getMessage() for r in caplog.records if r.name == "nmt.server.interceptors"]
    assert len(refused) == 1 and "refused a request to /nmt.v1.TranslationService/Translate" in refused[0]
    assert "\n" not in refused[0] and problems(caplog) == []


async def test_oversized_messages_are_resource_exhausted_and_counted(grpc_bundle, grpc_translator) -> None:
    cfg = server_config(grpc_bundle, max_message_bytes=4096)  # gRPC core refuses past 8192 itself
    async with serve(cfg, grpc_translator) as server, channel(server) as ch:
        over = await status(stub(ch).Translate(pb.TranslateRequest(texts=["word " * 1000])))
        far_over = await status(stub(ch).Translate(pb.TranslateRequest(texts=["word " * 4000])))
        stream = stub(ch).TranslateStream(iter([pb.TranslateStreamRequest(id="1", texts=["x" * 5000])]))  # noqa
        with pytest.raises(grpc.aio.AioRpcError) as e:
            _ = [r async for r in stream]
    assert over == (CODE.RESOURCE_EXHAUSTED, "the request message has 5003 bytes; the limit is max_message_bytes=4096")
    assert far_over[0] == CODE.RESOURCE_EXHAUSTED and e.value.code() == CODE.RESOURCE_EXHAUSTED
    assert count(server, "Translate", "RESOURCE_EXHAUSTED") == 1  # the core's own refusal is not seen
    assert count(server, "TranslateStream", "RESOURCE_EXHAUSTED") == 1


class Recording(Gate):  # the real translator; records where tokenize runs, and can hold it
    def __init__(self, translator: Any):
        super().__init__(translator)
        self.tokenized = list[tuple[str, list[int]]]()
        self.held: set[int] = set()  # the threads whose tokenize waits for `release` now (set.add is atomic)
        self.release = threading.Event()  # cleared: tokenize waits (on the event loop it would stall everything)
        self.release.set()

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        self.tokenized.append((threading.current_thread().name, [len(t) for t in texts]))
        if not self.release.is_set():
            self.held.add(threading.get_ident())
            try:
                if not self.release.wait(timeout=30):
                    raise TimeoutError("the test never released the tokenizer")
            finally:
                self.held.discard(threading.get_ident())
        return self.translator.tokenize(texts)


async def health_latencies(ch: grpc.aio.Channel, calls: list[Any]) -> tuple[list[float], list[tuple[Any, str]]]:
    """Health checks, one every 5 ms, while `calls` run: their latencies (s), and the calls' outcomes."""
    health, latencies = health_pb2_grpc.HealthStub(ch), list[float]()

    async def probe() -> None:
        while True:
            started = time.perf_counter()
            await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.005)

    prober = asyncio.create_task(probe())
    try:
        outcomes = await asyncio.gather(*map(status, calls))
    finally:
        prober.cancel()
        await asyncio.gather(prober, return_exceptions=True)
    return latencies, outcomes


def p99(values: list[float]) -> float:
    """99th percentile; a fast run may fit only one health check in (quantiles needs two points)."""
    if len(values) < 2:
        return max(values, default=0.0)
    return statistics.quantiles(values, n=100, method="inclusive")[98]


async def test_texts_over_max_text_bytes_are_refused_before_tokenizing(grpc_bundle, grpc_translator) -> None:
    """The issue's flood, 12 requests of 3 x 1 MB texts, with the default limits: no tokenizing at all."""
    engine, text = Recording(grpc_translator), "A man in a red shirt rides a bike past the old church. " * 19000
    cfg = server_config(grpc_bundle, max_message_bytes=2**23)  # room for 3 MB messages
    async with serve(cfg, engine) as server, channel(server) as ch:
        engine.tokenized.clear()  # the warm-up's
        calls = [stub(ch).Translate(pb.TranslateRequest(texts=["A dog.", text, text])) for _ in range(12)]  # noqa
        latencies, outcomes = await health_latencies(ch, calls)
        await stub(ch).Translate(pb.TranslateRequest(texts=["A dog."]))
    assert set(outcomes) == {(CODE.INVALID_ARGUMENT, "text 1 has 1045000 bytes; the limit is max_text_bytes=16384")}
    assert len(engine.tokenized) == 1 and engine.tokenized[0][0] != threading.current_thread().name
    print(f"health during the flood: {len(latencies)} checks, p99 {p99(latencies) * 1000:.1f} ms")


async def test_health_is_answered_while_texts_are_tokenized(grpc_bundle, grpc_translator) -> None:
    """Tokenize is held until a health check has been answered: on the event loop it would hold the loop,
    and the check would be answered only after the tokenizer's 30 s timeout (the requests failing)."""
    engine = Recording(grpc_translator)
    async with serve(server_config(grpc_bundle), engine) as server, channel(server) as ch:
        engine.tokenized.clear()  # the warm-up's
        engine.release.clear()
        calls = [
            asyncio.ensure_future(status(stub(ch).Translate(pb.TranslateRequest(texts=TEXTS[:3]))))  # noqa
            for _ in range(12)
        ]
        await eventually(lambda: engine.held, what="a tokenize to start")
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        held = len(engine.held)  # tokenize calls still waiting when the answer came
        engine.release.set()
        outcomes = await asyncio.gather(*calls)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING and held > 0
    assert {code for code, _ in outcomes} == {CODE.OK}
    assert threading.current_thread().name not in {name for name, _ in engine.tokenized}


async def test_request_counts_match_what_clients_saw(grpc_bundle, gate) -> None:
    async with serve(server_config(grpc_bundle), gate) as server, channel(server) as ch:
        gate.close()
        blocker = stub(ch).Translate(pb.TranslateRequest(texts=["A dog."]))
        await eventually(gate.entered.is_set)
        cancelled = [stub(ch).Translate(pb.TranslateRequest(texts=[f"{n} birds."])) for n in range(5)]  # noqa
        await eventually(lambda: server.scheduler.depth == 5, what="the requests to queue")
        for call in cancelled:
            call.cancel()
        expiring = [
            stub(ch).Translate(pb.TranslateRequest(texts=[f"{n} cats."]), timeout=0.05 + n / 100)  # noqa
            for n in range(20)
        ]
        seen = [code for code, _ in await asyncio.gather(*map(status, expiring))]
        gate.open()
        await blocker
        requests = [pb.TranslateStreamRequest(id=str(i), texts=["A cat."] if i % 3 else []) for i in range(6)]  # noqa
        answers = [r async for r in stub(ch).TranslateStream(iter(requests))]
        await eventually(lambda: count(server, "Translate", "CANCELLED") == 5, what="the cancellations")  # noqa
    assert seen == [CODE.DEADLINE_EXCEEDED] * 20
    assert count(server, "Translate", "DEADLINE_EXCEEDED") == 20 and count(server, "Translate", "OK") == 1
    assert [a.WhichOneof("result") for a in answers].count("error") == 2
    assert (count(server, "TranslateStream", "OK"), count(server, "TranslateStream", "INVALID_ARGUMENT")) == (4, 2)


async def test_blank_texts_get_an_empty_hypothesis_without_the_engine(grpc_bundle, gate) -> None:
    blank = [" " * 300, "\t\n \u3000", "\u200b", "\ufeff\u200b\u2060", "\x00", "\x00 \x00\t", ""]
    cfg = server_config(grpc_bundle, max_text_bytes=100)  # 300 spaces are blank, not too long
    async with serve(cfg, gate) as server, channel(server) as ch:
        gate.calls.clear()
        only_blank = await stub(ch).Translate(pb.TranslateRequest(texts=blank))
        assert gate.calls == []
        mixed = await stub(ch).Translate(pb.TranslateRequest(texts=[*blank, "A dog."]))
    assert [[h.text for h in t.hypotheses] for t in only_blank.translations] == [[""]] * len(blank)
    assert all(t.hypotheses[0].tokens == 0 for t in mixed.translations[:-1])
    assert mixed.translations[-1].hypotheses[0].tokens > 0
    assert [len(sources) for sources, _ in gate.calls] == [1]
