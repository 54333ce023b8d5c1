"""The gRPC servicer: proto <-> Python, request validation, status codes, request metrics.

Every exception becomes an explicit status code (status_of): nothing reaches a client as UNKNOWN.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import grpc

from .decoding import DecodeOptions, Hypothesis
from .metrics import Metrics
from .nmt_pb import translation_pb2 as pb
from .nmt_pb import translation_pb2_grpc as pb_grpc
from .scheduler import DeadlineExceeded, EngineError, QueueFull, Scheduler, SchedulerClosed
from .translator import Translator

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["TranslationService"].full_name  # "nmt.v1.TranslationService"


@dataclass(frozen=True)
class Limits:
    max_texts: int = 64
    max_tokens_per_text: int = 256
    max_beam_size: int = 16
    defaults: DecodeOptions = DecodeOptions()
    max_positions: int | None = None  # the model's: source tokens + max_len_extra must fit


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client sees for an exception."""
    if isinstance(error, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
    if isinstance(error, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(error)
    if isinstance(error, SchedulerClosed):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    if isinstance(error, EngineError):
        return grpc.StatusCode.INTERNAL, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


def decode_options(proto: pb.DecodeOptions, limits: Limits) -> DecodeOptions:
    """DecodeOptions from a request (unset fields: the server's defaults); ValueError names the bad field."""
    d = limits.defaults
    beam = proto.beam_size if proto.HasField("beam_size") else d.beam_size
    if not 1 <= beam <= limits.max_beam_size:
        raise ValueError(f"beam_size must be between 1 and max_beam_size={limits.max_beam_size}, got {beam}")
    penalty = proto.length_penalty if proto.HasField("length_penalty") else d.length_penalty
    if not math.isfinite(penalty):
        raise ValueError(f"length_penalty must be a finite number >= 0, got {penalty}")
    return DecodeOptions(
        beam_size=beam,
        length_penalty=penalty,
        max_len_extra=proto.max_len_extra if proto.HasField("max_len_extra") else d.max_len_extra,
        n_best=proto.n_best if proto.HasField("n_best") else 1,
    )


def check_sources(sources: list[list[int]], options: DecodeOptions, limits: Limits) -> None:
    for i, source in enumerate(sources):
        if len(source) > limits.max_tokens_per_text:
            raise ValueError(f"text {i} has {len(source)} tokens; the limit is "
                             f"max_tokens_per_text={limits.max_tokens_per_text}")
        if limits.max_positions is not None and len(source) + options.max_len_extra > limits.max_positions:
            raise ValueError(f"text {i}: {len(source)} tokens + max_len_extra {options.max_len_extra} exceed the "
                             f"model's {limits.max_positions} positions")


@dataclass
class _Call:
    code: grpc.StatusCode = grpc.StatusCode.OK


class TranslationServicer(pb_grpc.TranslationServiceServicer):
    def __init__(self, translator: Translator, scheduler: Scheduler, limits: Limits, metrics: Metrics | None = None):
        self.translator, self.scheduler, self.limits, self.metrics = translator, scheduler, limits, metrics

    async def Translate(self, request: pb.TranslateRequest, context: grpc.aio.ServicerContext) -> pb.TranslateResponse:
        deadline = deadline_of(context)
        with self._call("Translate", deadline) as call:
            try:
                return await self.translate(list(request.texts), request.options, deadline)
            except Exception as e:  # noqa: BLE001 - mapped to a status code, never UNKNOWN
                call.code, message = status_of(e)
            await context.abort(call.code, message)
        raise AssertionError("unreachable: context.abort raises")

    async def TranslateStream(self, requests: AsyncIterator[pb.TranslateStreamRequest],
                              context: grpc.aio.ServicerContext) -> AsyncIterator[pb.TranslateStreamResponse]:
        deadline = deadline_of(context)
        with self._call("TranslateStream", deadline) as call:
            try:
                async for response in self._stream(requests, deadline):
                    yield response
            except Exception as e:  # noqa: BLE001 - reading the stream failed
                call.code, message = status_of(e)
                await context.abort(call.code, message)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        with self._call("GetModelInfo", None):
            i, lim, d = self.translator.info, self.limits, self.limits.defaults
            return pb.ModelInfo(
                name=i.name, version=i.version, src_lang=i.src_lang, tgt_lang=i.tgt_lang, vocab_size=i.vocab_size,
                bundle_sha256=i.bundle_sha256, precision=i.precision, provider=i.provider,
                max_texts_per_request=lim.max_texts, max_tokens_per_text=lim.max_tokens_per_text,
                max_beam_size=lim.max_beam_size,
                default_options=pb.DecodeOptions(beam_size=d.beam_size, length_penalty=d.length_penalty,
                                                 max_len_extra=d.max_len_extra, n_best=d.n_best))

    async def translate(self, texts: list[str], options_pb: pb.DecodeOptions,
                        deadline: float | None) -> pb.TranslateResponse:
        """Validate, tokenize, queue, detokenize. Raises ValueError for bad input, scheduler errors otherwise."""
        options = decode_options(options_pb, self.limits)
        if not texts:
            raise ValueError("texts is empty: send at least one text")
        if len(texts) > self.limits.max_texts:
            raise ValueError(f"{len(texts)} texts; the limit is max_texts_per_request={self.limits.max_texts}")
        sources = self.translator.tokenize(texts)
        check_sources(sources, options, self.limits)
        # Empty (or blank) texts translate to an empty string without the engine.
        todo = [i for i, (text, source) in enumerate(zip(texts, sources)) if source and not text.isspace()]
        found = await self.scheduler.submit([sources[i] for i in todo], options, deadline)
        hypotheses: list[list[Hypothesis]] = [[Hypothesis([], 0.0, 0.0)] for _ in sources]
        for i, hyps in zip(todo, found):
            hypotheses[i] = hyps
        strings = iter(self.translator.detokenize([h.tokens for hyps in hypotheses for h in hyps]))
        scores = options_pb.return_scores
        return pb.TranslateResponse(translations=[
            pb.Translation(hypotheses=[
                pb.Hypothesis(text=next(strings), tokens=len(h.tokens), score=h.score if scores else 0.0,
                              normalized_score=h.normalized_score if scores else 0.0) for h in hyps])
            for hyps in hypotheses])

    async def _stream(self, requests: AsyncIterator[pb.TranslateStreamRequest],
                      deadline: float | None) -> AsyncIterator[pb.TranslateStreamResponse]:
        """Answer each request as soon as it is done; a failed one gets an Error, the stream goes on."""
        done: asyncio.Queue[pb.TranslateStreamResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def answer(request: pb.TranslateStreamRequest) -> None:
            try:
                response = await self.translate(list(request.texts), request.options, deadline)
                done.put_nowait(pb.TranslateStreamResponse(id=request.id, response=response))
            except Exception as e:  # noqa: BLE001 - becomes this request's error
                code, message = status_of(e)
                done.put_nowait(pb.TranslateStreamResponse(id=request.id, error=pb.Error(code=code.value[0],
                                                                                         message=message)))

        async def read() -> None:
            try:
                async for request in requests:
                    task = asyncio.get_running_loop().create_task(answer(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.wait(set(tasks))
            finally:
                done.put_nowait(None)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while (response := await done.get()) is not None:
                yield response
            await reader  # re-raises a failure to read the requests
        finally:
            for task in (reader, *tasks):
                task.cancel()

    @contextlib.contextmanager
    def _call(self, method: str, deadline: float | None) -> Iterator[_Call]:
        """Counts the call by its final status code, times it, tracks it in flight."""
        call, started, m = _Call(), time.perf_counter(), self.metrics
        if m is not None:
            m.in_flight.labels(method).inc()
        try:
            yield call
        except asyncio.CancelledError:
            expired = deadline is not None and time.monotonic() >= deadline
            call.code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        finally:
            if m is not None:
                m.in_flight.labels(method).dec()
                m.requests.labels(method, call.code.name).inc()
                m.request_seconds.labels(method).observe(time.perf_counter() - started)


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a time.monotonic() value (None: the client set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires metadata `authorization: Bearer <token>` on every call but health checks."""

    EXEMPT = ("/grpc.health.v1.Health/",)

    def __init__(self, token: str, metrics: Metrics | None = None):
        self.expected = f"Bearer {token}".encode()
        self.metrics = metrics

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.EXEMPT):
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        given = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given, self.expected):
            return handler
        if self.metrics is not None and details.method.startswith(f"/{SERVICE}/"):
            self.metrics.requests.labels(details.method.rsplit("/", 1)[-1], "UNAUTHENTICATED").inc()
        return _denied(handler)


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED."""
    message = "missing or wrong bearer token (metadata 'authorization: Bearer <token>')"

    async def deny(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kind = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kind[(handler.request_streaming, handler.response_streaming)]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)

