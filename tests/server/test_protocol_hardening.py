"""Regression tests for issue 10, defects 5 and 7, on real loopback servers: a status sent to a client
that has gone, reflection v1, the bearer scheme in any case, RESOURCE_EXHAUSTED's retry hint, and a
drain that answers late arrivals UNAVAILABLE (in process, and nmt-serve under SIGTERM)."""

from __future__ import annotations

import asyncio
import collections
import functools
import signal
from typing import Any

import grpc
import pytest
from grpc_helpers import channel, eventually, serve, server_config, start_nmt_serve, stub
from grpc_reflection.v1alpha import reflection_pb2

from nmt.server.interceptors import abort
from nmt.server.metrics import sample_sum
from nmt.server.nmt_pb import translation_pb2 as pb

pytestmark = pytest.mark.asyncio
CODE = grpc.StatusCode


async def outcome(call: Any) -> grpc.aio.AioRpcError | Any:
    try:
        return await call
    except grpc.aio.AioRpcError as e:
        return e


async def test_abort_to_a_client_that_has_gone_ends_the_call_quietly(caplog) -> None:
    """grpc's own abort raises ExecuteBatchError there (logged with a traceback when grpc has not yet
    seen the client go); server.interceptors.abort ends the call as cancelled instead."""
    seen: dict[bytes, type[BaseException]] = {}
    entered = asyncio.Event()

    async def late(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        entered.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass  # carry on after the client has gone, like a handler whose error comes just then
        try:
            if request == b"grpc":
                await context.abort(CODE.INVALID_ARGUMENT, "too late")
            await abort(context, CODE.INVALID_ARGUMENT, "too late")
        except BaseException as e:
            seen[request] = type(e)
            raise

    server = grpc.aio.server()
    handlers = {"Late": grpc.unary_unary_rpc_method_handler(late)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Gone", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            for which in (b"grpc", b"ours"):
                entered.clear()
                call = ch.unary_unary("/test.Gone/Late")(which)
                await entered.wait()
                call.cancel()
                await eventually(lambda: which in seen, what="the abort")
    finally:
        await server.stop(0)
    assert issubclass(seen[b"grpc"], grpc.aio.InternalError) and seen[b"ours"] is asyncio.CancelledError
    assert not [r for r in caplog.records if r.exc_info]


async def test_reflection_v1_lists_and_describes(default_server) -> None:
    def ask(method: str, request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
        with grpc.insecure_channel(f"127.0.0.1:{default_server.port}") as ch:
            info = ch.stream_stream(
                method,
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            return next(iter(info(iter([request]))))

    v1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
    listed = await asyncio.to_thread(ask, v1, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert {
        "nmt.v1.TranslationService",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    described = await asyncio.to_thread(
        ask, v1, reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection")
    )
    from google.protobuf import descriptor_pb2

    proto = descriptor_pb2.FileDescriptorProto.FromString(described.file_descriptor_response.file_descriptor_proto[0])
    assert (proto.name, proto.package) == ("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1")
    assert proto.service[0].method[0].input_type == ".grpc.reflection.v1.ServerReflectionRequest"


async def test_bearer_scheme_any_case_and_checked_before_parsing(grpc_bundle, grpc_translator) -> None:
    cfg = server_config(grpc_bundle, auth_token="s3cret")
    request = pb.TranslateRequest(texts=["A dog."])
    async with serve(cfg, grpc_translator) as server, channel(server) as ch:
        for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
            metadata = (("authorization", f"{scheme} s3cret"),)
            reply = await outcome(stub(ch).Translate(request, metadata=metadata))
            assert len(reply.translations) == 1, scheme
        for value in ("Basic s3cret", "Bearer s3cre", "s3cret", "Bearers3cret"):
            reply = await outcome(stub(ch).Translate(request, metadata=(("authorization", value),)))
            assert reply.code() == CODE.UNAUTHENTICATED, value
        raw = ch.unary_unary("/nmt.v1.TranslationService/Translate")
        anonymous = await outcome(raw(b"\xff\xff\xff"))  # garbage without a token: refused for the token
        signed = await outcome(raw(b"\xff\xff\xff", metadata=(("authorization", "bearer s3cret"),)))
    assert (anonymous.code(), signed.code()) == (CODE.UNAUTHENTICATED, CODE.INVALID_ARGUMENT)
    get = functools.partial(sample_sum, server.registry)
    assert get("nmt_requests_total", {"method": "Translate", "code": "UNAUTHENTICATED"}) == 5
    assert get("nmt_requests_total", {"method": "Translate", "code": "INVALID_ARGUMENT"}) == 1


async def test_queue_full_carries_a_retry_pushback(grpc_bundle, gate) -> None:
    cfg = server_config(grpc_bundle, max_queue_size=2, max_texts=2, max_batch_size=1)
    async with serve(cfg, gate) as server, channel(server) as ch:
        gate.close()
        first = stub(ch).Translate(pb.TranslateRequest(texts=["A dog."]))
        await eventually(gate.entered.is_set)
        queued = stub(ch).Translate(pb.TranslateRequest(texts=["A cat.", "A bird."]))
        await eventually(lambda: server.scheduler.depth == 2)
        refused = await outcome(stub(ch).Translate(pb.TranslateRequest(texts=["A fish."])))
        gate.open()
        await asyncio.gather(first, queued)
    trailers = dict(refused.trailing_metadata())
    assert refused.code() == CODE.RESOURCE_EXHAUSTED
    pushback = int(trailers["grpc-retry-pushback-ms"])
    assert 50 <= pushback <= 30000 and f"retry in {pushback} ms" in refused.details()


async def test_drain_answers_late_arrivals_unavailable(grpc_bundle, gate) -> None:
    async with serve(server_config(grpc_bundle), gate) as server, channel(server) as ch:
        gate.close()
        accepted = stub(ch).Translate(pb.TranslateRequest(texts=["A dog."]))
        await eventually(gate.entered.is_set)
        stopping = asyncio.create_task(server.stop(10.0))
        await eventually(lambda: server.servicer.draining, what="the drain")
        late = await outcome(stub(ch).Translate(pb.TranslateRequest(texts=["A cat."])))
        gate.open()
        done = await outcome(accepted)
        await stopping
    assert late.code() == CODE.UNAVAILABLE and "shutting down" in late.details()
    assert len(done.translations) == 1


async def test_sigterm_under_steady_load_answers_only_ok_or_unavailable(grpc_bundle, tmp_path) -> None:
    """16 clients send back to back through SIGTERM, each until its first refusal (then it backs off, as a
    retry policy would); before the drain, some saw CANCELLED."""
    proc, port, _, log = await asyncio.to_thread(
        start_nmt_serve, grpc_bundle, tmp_path / "ports.json", NMT_METRICS_PORT="-1", NMT_GRACE_SECONDS="10"
    )
    codes: collections.Counter[str] = collections.Counter()
    answered: set[int] = set()  # the clients that have had an answer
    try:

        async def client(n: int) -> None:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                request = pb.TranslateRequest(texts=["A dog runs."], options=pb.DecodeOptions(beam_size=1))  # noqa
                while True:
                    reply = await outcome(stub(ch).Translate(request, timeout=10))
                    if isinstance(reply, grpc.aio.AioRpcError):
                        codes[reply.code().name] += 1
                        return
                    codes["OK"] += 1
                    answered.add(n)

        clients = [asyncio.create_task(client(n)) for n in range(16)]
        await eventually(lambda: len(answered) == len(clients), what="every client to have an answer")  # noqa
        proc.send_signal(signal.SIGTERM)  # every client is sending: some call is under way or about to be
        await asyncio.gather(*clients)
        assert await asyncio.to_thread(proc.wait, 30) == 0, "".join(log)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert set(codes) <= {"OK", "UNAVAILABLE"} and codes["UNAVAILABLE"] == len(clients), codes
