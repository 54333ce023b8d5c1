"""server/text_worker.py: the text pipeline in a child process gives what the thread gives, and a
process that dies costs the requests it held (UNAVAILABLE), not the server."""

from __future__ import annotations

import os
import signal

import grpc
import pytest
from grpc_helpers import TEXTS, channel, serve, server_config, stub

from nmt.bench.adversarial_text import SHAPES, make
from nmt.engine.decoding import DecodeOptions
from nmt.engine.prepared import whole_beam
from nmt.engine.text import TextOptions
from nmt.engine.translator import Translator
from nmt.server.nmt_pb import translation_pb2 as pb
from nmt.server.text_worker import (
    SMALL_REQUEST_CHARS,
    ProcessTextPipeline,
    TextPipeline,
    TextWorkerError,
    text_pipeline,
)

pytestmark = pytest.mark.asyncio
GREEDY = DecodeOptions(beam_size=1, max_len_extra=8)


async def translate(pipeline: TextPipeline, translator: Translator, texts: list[str]) -> list[list[str]]:
    prepared = await pipeline.prepare(texts, TextOptions())
    found = translator.search(prepared.sources, whole_beam(GREEDY)).hypotheses if prepared.sources else []
    return [[t.text for t in ts] for ts in await pipeline.finish(prepared, found, 1)]


async def test_the_process_gives_what_the_thread_gives(grpc_translator: Translator) -> None:
    process, thread = text_pipeline(grpc_translator, "process"), text_pipeline(grpc_translator, "thread")
    assert isinstance(process, ProcessTextPipeline) and not isinstance(thread, ProcessTextPipeline)
    try:
        texts = [
            *TEXTS,
            "Visit https://example.com/a or mail anna@example.org at 10:30.",
            "A MAN RIDES A BIKE.",
            *(make(shape, 200) for shape in SHAPES),
            "   ",
        ]
        assert await translate(process, grpc_translator, texts) == await translate(thread, grpc_translator, texts)
        assert await process._run(os.getpid) != os.getpid()  # it ran elsewhere
    finally:
        process.close()
        thread.close()


async def test_a_short_request_stays_in_the_thread(grpc_translator: Translator) -> None:
    pipeline = text_pipeline(grpc_translator, "process")
    try:
        assert isinstance(pipeline, ProcessTextPipeline)
        short, long = ["A dog runs."], ["A dog runs. " * (SMALL_REQUEST_CHARS // 12 + 1)]
        assert await translate(pipeline, grpc_translator, short) and await translate(pipeline, grpc_translator, long)
        calls = {"nearby": 0}
        original = pipeline.nearby.prepare

        async def counted(*args: object) -> object:
            calls["nearby"] += 1
            return await original(*args)

        pipeline.nearby.prepare = counted  # type: ignore[method-assign]
        await pipeline.prepare(short, TextOptions())
        await pipeline.prepare(long, TextOptions())
        assert calls["nearby"] == 1
    finally:
        pipeline.close()


async def test_a_test_double_runs_in_the_thread(grpc_translator: Translator) -> None:
    class Double:  # wraps the translator, as tests/server's Gate does
        def __getattr__(self, name: str) -> object:
            return getattr(grpc_translator, name)

    pipeline = text_pipeline(Double(), "process")
    assert not isinstance(pipeline, ProcessTextPipeline)
    pipeline.close()
    with pytest.raises(ValueError, match="must be one of process, thread, got 'elsewhere'"):
        text_pipeline(grpc_translator, "elsewhere")


async def test_a_dead_text_process_fails_its_request_unavailable_and_the_next_one_works(
    grpc_bundle, grpc_translator
) -> None:
    async with serve(server_config(grpc_bundle), grpc_translator) as server, channel(server) as ch:
        entry = server.models.default or next(iter(server.models))
        pipeline = entry.service.text
        assert isinstance(pipeline, ProcessTextPipeline)
        os.kill(await pipeline._run(os.getpid), signal.SIGKILL)
        long = ["A dog runs in the park. " * 20] * 3  # over SMALL_REQUEST_CHARS: the process prepares it
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub(ch).Translate(pb.TranslateRequest(texts=long))
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE and "text process died" in failed.value.details()
        reply = await stub(ch).Translate(pb.TranslateRequest(texts=long))
        assert reply.translations[0].hypotheses[0].text


async def test_text_worker_error_is_retryable() -> None:
    from nmt.server.transport import status_of

    assert status_of(TextWorkerError("x")).code == grpc.StatusCode.UNAVAILABLE


async def test_where_no_text_process_starts_the_thread_does_it_all(grpc_translator: Translator, tmp_path) -> None:
    pipeline = ProcessTextPipeline(grpc_translator, tmp_path / "missing.model", "en")  # its child cannot load
    try:
        await pipeline.start()
        assert pipeline.in_thread_only
        long = ["A dog runs in the park. " * 60]
        assert await translate(pipeline, grpc_translator, long) == [
            [grpc_translator.translate(long, GREEDY)[0][0].text]
        ]
    finally:
        pipeline.close()
