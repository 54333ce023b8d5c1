"""The gRPC servicer: proto <-> Python, status codes, request metrics, over server/service.py's path.

Every exception becomes an explicit status code (status_of): nothing reaches a client as UNKNOWN.
The options are checked here (cheapest first); the rest of the checks are the service's.

Each request is routed to its model's service (Models.lookup: `model` empty is the default model; an
unknown model or version is NOT_FOUND naming what is served).

nmt_requests_total counts what clients saw: a Translate, GetModelInfo, ListModels or KServe ModelInfer call
once by its status code, each TranslateStream answer once by the code in it (when it was sent),
and a stream that ends with an error status once more by that code. A call cancelled within
DEADLINE_SLACK_S of its deadline counts as DEADLINE_EXCEEDED: the client's clock and the server's
(started when the request arrived, from the rounded grpc-timeout header) differ, and the client's
cancellation at its deadline can arrive before the server's own deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import grpc

from nmt.engine.decoding import DecodeOptions
from nmt.engine.text import TextOptions
from nmt.engine.translator import Translation

from .interceptors import Refused, abort
from .metrics import Metrics
from .nmt_pb import translation_pb2 as pb
from .nmt_pb import translation_pb2_grpc as pb_grpc
from .repository import ModelEntry, ModelNotFound, Models
from .scheduler import DeadlineExceeded, EngineError, QueueFull, SchedulerClosed
from .service import Limits
from .text_worker import TextWorkerError

SERVICE = pb.DESCRIPTOR.services_by_name["TranslationService"].full_name  # "nmt.v1.TranslationService"
DEADLINE_SLACK_S = 0.1
RETRY_PUSHBACK = "grpc-retry-pushback-ms"  # gRPC retry design A6: when a retry policy may try again


class Status(NamedTuple):
    code: grpc.StatusCode
    message: str
    trailers: tuple[tuple[str, str], ...] = ()


def status_of(error: BaseException) -> Status:
    """The status a client sees for an exception."""
    if isinstance(error, ValueError):
        return Status(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    if isinstance(error, Refused):
        return Status(error.code, str(error))
    if isinstance(error, ModelNotFound):
        return Status(grpc.StatusCode.NOT_FOUND, str(error))
    if isinstance(error, QueueFull):
        pushback = str(round(error.retry_after_s * 1000))
        return Status(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), ((RETRY_PUSHBACK, pushback),))
    if isinstance(error, DeadlineExceeded):
        return Status(grpc.StatusCode.DEADLINE_EXCEEDED, str(error))
    if isinstance(error, (SchedulerClosed, TextWorkerError)):
        return Status(grpc.StatusCode.UNAVAILABLE, str(error))
    if isinstance(error, EngineError):
        return Status(grpc.StatusCode.INTERNAL, str(error))
    return Status(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}")


def decode_options(proto: pb.DecodeOptions, limits: Limits) -> DecodeOptions:
    """DecodeOptions from a request (unset fields: the server's defaults); ValueError names the bad field."""
    d = limits.defaults
    beam = proto.beam_size if proto.HasField("beam_size") else d.beam_size
    if not 1 <= beam <= limits.max_beam_size:
        raise ValueError(f"beam_size must be between 1 and max_beam_size={limits.max_beam_size}, got {beam}")
    return DecodeOptions(  # checks n_best, max_len_extra and length_penalty's range (NaN and inf included)
        beam_size=beam,
        length_penalty=proto.length_penalty if proto.HasField("length_penalty") else d.length_penalty,
        max_len_extra=proto.max_len_extra if proto.HasField("max_len_extra") else d.max_len_extra,
        n_best=proto.n_best if proto.HasField("n_best") else 1,
    )


def text_options(proto: pb.DecodeOptions) -> TextOptions:
    """The text pipeline's switches from a request (unset: on)."""
    on = lambda name: getattr(proto, name) if proto.HasField(name) else True  # noqa: E731
    return TextOptions(
        split_sentences=on("split_sentences"), normalize_case=on("normalize_case"), protect_spans=on("protect_spans")
    )


def translate_response(results: list[list[Translation]], return_scores: bool) -> pb.TranslateResponse:
    return pb.TranslateResponse(
        translations=[
            pb.Translation(
                hypotheses=[
                    pb.Hypothesis(
                        text=t.text,
                        tokens=t.tokens,
                        score=t.score if return_scores else 0.0,
                        normalized_score=t.normalized_score if return_scores else 0.0,
                    )
                    for t in hyps
                ]
            )
            for hyps in results
        ]
    )


UNROUTED = ("", "")  # the model and version labels of a call not (yet) routed to a model


@dataclass
class Call:
    method: str
    metrics: Metrics | None = None
    code: grpc.StatusCode | None = grpc.StatusCode.OK  # None: counted elsewhere
    model: tuple[str, str] = UNROUTED  # (name, version) once routed

    def routed(self, entry: ModelEntry) -> ModelEntry:
        """The call now works on `entry`: its in-flight series moves there, and it is counted under it."""
        if self.metrics is not None:
            self.metrics.in_flight.labels(self.method, *self.model).dec()
            self.metrics.in_flight.labels(self.method, entry.name, entry.version).inc()
        self.model = (entry.name, entry.version)
        return entry


def version_of(request: pb.TranslateRequest | pb.TranslateStreamRequest) -> int | None:
    return request.version if request.HasField("version") else None


class TranslationServicer(pb_grpc.TranslationServiceServicer):
    """Routes each request to its model's service (server/repository.py: Models.lookup)."""

    def __init__(self, models: Models, metrics: Metrics | None = None):
        self.models, self.metrics = models, metrics

    @property
    def draining(self) -> bool:
        return self.models.draining

    @draining.setter
    def draining(self, value: bool) -> None:  # set on shutdown: new translations get UNAVAILABLE
        self.models.draining = value

    async def wait_idle(self, timeout: float) -> bool:
        return await self.models.wait_idle(timeout)

    async def Translate(self, request: pb.TranslateRequest, context: grpc.aio.ServicerContext) -> pb.TranslateResponse:
        deadline = deadline_of(context)
        with self.track("Translate", deadline) as call:
            try:
                entry = call.routed(self.models.lookup(request.model, version_of(request)))
                return await self.translate(entry, list(request.texts), request.options, deadline)
            except Exception as e:  # noqa: BLE001 - mapped to a status code, never UNKNOWN
                status = status_of(e)
            call.code = status.code
            await abort(context, *status)
        raise AssertionError("unreachable: abort raises")

    async def TranslateStream(
        self, requests: AsyncIterator[pb.TranslateStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TranslateStreamResponse]:
        deadline = deadline_of(context)
        with self.track("TranslateStream", deadline, count_ok=False) as call:
            try:
                async for response in self._stream(requests, deadline):
                    yield response
            except Refused:
                raise  # a request message that could not be parsed: the RequestGuard answers it
            except Exception as e:  # noqa: BLE001 - reading the stream failed
                status = status_of(e)
                call.code = status.code
                await abort(context, *status)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        with self.track("GetModelInfo", None) as call:
            try:
                return model_info(call.routed(self.models.lookup(request.model)))
            except ModelNotFound as e:
                status = status_of(e)
            call.code = status.code
            await abort(context, *status)
        raise AssertionError("unreachable: abort raises")

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        with self.track("ListModels", None):
            default = self.models.default
            return pb.ListModelsResponse(
                models=[
                    pb.ModelEntry(
                        name=e.name,
                        versions=list(e.versions),
                        serving_version=e.number,
                        src_lang=e.info.src_lang,
                        tgt_lang=e.info.tgt_lang,
                        state=self.models.state(e),
                        default_model=e is default,
                    )
                    for e in self.models
                ]
            )

    async def translate(
        self, entry: ModelEntry, texts: list[str], options_pb: pb.DecodeOptions, deadline: float | None
    ) -> pb.TranslateResponse:
        """The service's path from proto options to a proto response (KServe's ModelInfer uses it too)."""
        options = decode_options(options_pb, entry.limits)
        results = await entry.service.translate(texts, options, text_options(options_pb), deadline)
        return translate_response(results, options_pb.return_scores)

    async def _stream(
        self, requests: AsyncIterator[pb.TranslateStreamRequest], deadline: float | None
    ) -> AsyncIterator[pb.TranslateStreamResponse]:
        """Answer each request as soon as it is done; a failed one gets an Error, the stream goes on.
        Each answer is counted once it has been sent."""
        done: asyncio.Queue[tuple[pb.TranslateStreamResponse, grpc.StatusCode, float, tuple[str, str]] | None] = (
            asyncio.Queue()
        )
        tasks: set[asyncio.Task[None]] = set()

        async def answer(request: pb.TranslateStreamRequest) -> None:
            started, model = time.perf_counter(), UNROUTED
            try:
                entry = self.models.lookup(request.model, version_of(request))
                model = (entry.name, entry.version)
                response = await self.translate(entry, list(request.texts), request.options, deadline)
                done.put_nowait(
                    (pb.TranslateStreamResponse(id=request.id, response=response), grpc.StatusCode.OK, started, model)
                )
            except Exception as e:  # noqa: BLE001 - becomes this request's error
                code, message, _ = status_of(e)
                error = pb.Error(code=code.value[0], message=message)
                done.put_nowait((pb.TranslateStreamResponse(id=request.id, error=error), code, started, model))

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
            while (item := await done.get()) is not None:
                response, code, started, model = item
                yield response
                self._count("TranslateStream", code, started, model)
            await reader  # re-raises a failure to read the requests
        finally:
            for task in (reader, *tasks):
                task.cancel()

    def _count(self, method: str, code: grpc.StatusCode, started: float, model: tuple[str, str] = UNROUTED) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(method, code.name, *model).inc()
            self.metrics.request_seconds.labels(method, *model).observe(time.perf_counter() - started)

    @contextlib.contextmanager
    def track(self, method: str, deadline: float | None, count_ok: bool = True) -> Iterator[Call]:
        """Tracks the call in flight; counts and times it by its final status code (an OK stream is
        not counted: its answers were). Public: KServe's ModelInfer (server/kserve.py) is tracked here too.
        The call is in flight and counted under model="" until call.routed(entry) names its model."""
        call, started, m = Call(method, self.metrics), time.perf_counter(), self.metrics
        if m is not None:
            m.in_flight.labels(method, *call.model).inc()
        try:
            yield call
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed
            expired = deadline is not None and time.monotonic() >= deadline - DEADLINE_SLACK_S
            call.code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        except Refused:
            call.code = None  # answered and counted by the RequestGuard
            raise
        finally:
            if m is not None:
                m.in_flight.labels(method, *call.model).dec()
            if call.code is not None and (count_ok or call.code != grpc.StatusCode.OK):
                self._count(method, call.code, started, call.model)


def model_info(entry: ModelEntry) -> pb.ModelInfo:
    i, lim, d = entry.info, entry.limits, entry.limits.defaults
    return pb.ModelInfo(
        name=i.name,
        version=i.version,
        src_lang=i.src_lang,
        tgt_lang=i.tgt_lang,
        vocab_size=i.vocab_size,
        bundle_sha256=i.bundle_sha256,
        precision=i.precision,
        provider=i.provider,
        max_texts_per_request=lim.max_texts,
        max_tokens_per_text=lim.max_tokens_per_text,
        max_sentences_per_request=lim.max_sentences,
        max_beam_size=lim.max_beam_size,
        default_options=pb.DecodeOptions(
            beam_size=d.beam_size, length_penalty=d.length_penalty, max_len_extra=d.max_len_extra, n_best=d.n_best
        ),
    )


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a time.monotonic() value (None: the client set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
