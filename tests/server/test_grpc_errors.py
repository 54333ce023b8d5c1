"""Every bad input, limit and failure gets its own status code (never UNKNOWN) from a real server."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_helpers import Gate, channel, eventually, serve, server_config, stub

from nmt.server.metrics import sample_sum
from nmt.server.nmt_pb import translation_pb2 as pb

pytestmark = pytest.mark.asyncio
CODE = grpc.StatusCode


async def status(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return CODE.OK, ""


BAD_REQUESTS = [
    (dict(texts=[]), "texts is empty"),
    (dict(texts=["a"] * 65), "max_texts_per_request=64"),
    (dict(texts=["a b c d e f g h i j " * 30]), "max_tokens_per_text=256"),
    (dict(texts=["a"], options=pb.DecodeOptions(beam_size=0)), "beam_size must be between 1 and"),
    (dict(texts=["a"], options=pb.DecodeOptions(beam_size=17)), "max_beam_size=16"),
    (dict(texts=["a"], options=pb.DecodeOptions(beam_size=2, n_best=3)), "n_best must be between 1 and"),  # noqa
    (dict(texts=["a"], options=pb.DecodeOptions(n_best=0)), "n_best must be between 1 and"),
    (dict(texts=["a"], options=pb.DecodeOptions(length_penalty=-1)), "length_penalty must be"),
    (dict(texts=["a"], options=pb.DecodeOptions(length_penalty=float("nan"))), "finite"),
    (dict(texts=["a"], options=pb.DecodeOptions(max_len_extra=0)), "max_len_extra must be at least 1"),  # noqa
    (dict(texts=["a"], options=pb.DecodeOptions(max_len_extra=10**6)), "positions"),
]


async def test_bad_requests_are_invalid_argument(default_server) -> None:
    async with channel(default_server) as ch:
        for fields, message in BAD_REQUESTS:
            code, details = await status(stub(ch).Translate(pb.TranslateRequest(**fields)))
            assert (code, message in details) == (CODE.INVALID_ARGUMENT, True), (fields, details)
        code, _ = await status(stub(ch).Translate(pb.TranslateRequest(texts=["A dog."])))
        assert code == CODE.OK  # the server is unharmed
    invalid = sample_sum(
        default_server.registry, "nmt_requests_total", {"method": "Translate", "code": "INVALID_ARGUMENT"}
    )
    assert invalid == len(BAD_REQUESTS)


async def test_message_size_limit(grpc_bundle, grpc_translator) -> None:
    cfg = server_config(grpc_bundle, max_message_bytes=1024)
    async with serve(cfg, grpc_translator) as server, channel(server) as ch:
        code, _ = await status(stub(ch).Translate(pb.TranslateRequest(texts=["word " * 400])))
    assert code == CODE.RESOURCE_EXHAUSTED


async def test_bearer_token(grpc_bundle, grpc_translator) -> None:
    cfg = server_config(grpc_bundle, auth_token="s3cret")
    request = pb.TranslateRequest(texts=["A dog."])
    async with serve(cfg, grpc_translator) as server, channel(server) as ch:
        s = stub(ch)
        assert (await status(s.Translate(request)))[0] == CODE.UNAUTHENTICATED
        wrong = (("authorization", "Bearer nope"),)
        assert (await status(s.Translate(request, metadata=wrong)))[0] == CODE.UNAUTHENTICATED
        assert (await status(s.GetModelInfo(pb.GetModelInfoRequest())))[0] == CODE.UNAUTHENTICATED
        stream = s.TranslateStream(iter([pb.TranslateStreamRequest(id="1", texts=["x"])]))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            _ = [r async for r in stream]
        assert e.value.code() == CODE.UNAUTHENTICATED
        right = (("authorization", "Bearer s3cret"),)
        assert (await status(s.Translate(request, metadata=right)))[0] == CODE.OK
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())  # no token needed
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        denied = sample_sum(server.registry, "nmt_requests_total", {"method": "Translate", "code": "UNAUTHENTICATED"})
    assert denied == 2


async def test_deadline_exceeded_while_queued(grpc_bundle, gate) -> None:
    async with serve(server_config(grpc_bundle), gate) as server, channel(server) as ch:
        gate.close()
        blocker = stub(ch).Translate(pb.TranslateRequest(texts=["A dog."]))
        await eventually(gate.entered.is_set)
        code, _ = await status(stub(ch).Translate(pb.TranslateRequest(texts=["A cat."]), timeout=0.3))  # noqa
        assert code == CODE.DEADLINE_EXCEEDED
        await eventually(lambda: server.scheduler.depth == 0, what="the expired request to leave")
        gate.open()
        assert (await status(blocker))[0] == CODE.OK
    assert len(gate.calls) == 1  # the expired request was never computed


async def test_cancelled_call_leaves_the_queue(grpc_bundle, gate) -> None:
    async with serve(server_config(grpc_bundle), gate) as server, channel(server) as ch:
        gate.close()
        blocker = stub(ch).Translate(pb.TranslateRequest(texts=["A dog."]))
        await eventually(gate.entered.is_set)
        call = stub(ch).Translate(pb.TranslateRequest(texts=["A cat.", "A bird."]))
        await eventually(lambda: server.scheduler.depth == 2, what="the request to queue")
        call.cancel()
        await eventually(lambda: server.scheduler.depth == 0, what="the cancelled request to leave")
        assert sample_sum(server.registry, "nmt_queue_sentences") == 0
        gate.open()
        assert (await status(blocker))[0] == CODE.OK
        await eventually(
            lambda: sample_sum(server.registry, "nmt_requests_total", {"method": "Translate", "code": "CANCELLED"}) == 1
        )
    assert len(gate.calls) == 1


async def test_queue_full_is_resource_exhausted(grpc_bundle, gate) -> None:
    cfg = server_config(grpc_bundle, max_queue_size=4, max_texts=4, max_batch_size=1)
    async with serve(cfg, gate) as server, channel(server) as ch:
        gate.close()
        first = stub(ch).Translate(pb.TranslateRequest(texts=["A dog."]))
        await eventually(gate.entered.is_set)
        accepted = [
            stub(ch).Translate(pb.TranslateRequest(texts=[f"{n} cats.", f"{n} dogs."])) for n in ("Two", "Three")
        ]
        await eventually(lambda: server.scheduler.depth == 4)
        code, details = await status(stub(ch).Translate(pb.TranslateRequest(texts=["A bird."])))
        assert code == CODE.RESOURCE_EXHAUSTED and "max_queue_size is 4" in details
        gate.open()
        assert [c for c, _ in await asyncio.gather(*map(status, [first, *accepted]))] == [CODE.OK] * 3


async def test_engine_failure_is_internal_not_unknown(grpc_bundle, grpc_translator) -> None:
    class Broken(Gate):  # the real engine, handed a token id outside the vocabulary
        def search(self, sources, options):
            return self.translator.search([s + [10**6] for s in sources], options)

    async with serve(server_config(grpc_bundle, batching="static"), grpc_translator) as server:
        server.scheduler.engine = Broken(grpc_translator)  # static: search() is called per batch
        async with channel(server) as ch:
            code, details = await status(stub(ch).Translate(pb.TranslateRequest(texts=["A dog."])))
            stream = stub(ch).TranslateStream(iter([pb.TranslateStreamRequest(id="1", texts=["x"])]))  # noqa
            answers = [r async for r in stream]
    assert code == CODE.INTERNAL and "outside the vocabulary" in details
    assert answers[0].error.code == CODE.INTERNAL.value[0]
