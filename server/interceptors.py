"""What happens to a call before the servicer sees it: the request guard and the bearer token check.

RequestGuard: a request message that protobuf cannot parse (random bytes, invalid UTF-8 in a
string field) is answered INVALID_ARGUMENT, one larger than --max-message-bytes RESOURCE_EXHAUSTED,
by the guard itself: one concise log line (at most one per LOG_INTERVAL_S, saying how many were
left out) and a count in nmt_requests_total with that code. Without it grpc logs a traceback per
request and answers UNKNOWN (unary calls) or INTERNAL (streams). Every service is guarded
(health and reflection too); only this server's own methods are counted.

BearerTokenInterceptor: metadata `authorization: Bearer <token>` (scheme in any case, RFC 7235)
on every call but health checks. It runs outside the guard, so a client without the token gets
UNAUTHENTICATED whatever bytes it sends.

Handlers that read with context.read() instead of iterating their request stream are not guarded
on the stream side (none here do).
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NoReturn

import grpc

from .metrics import Metrics

log = logging.getLogger(__name__)
LOG_INTERVAL_S = 10.0
Behavior = Callable[..., Any]
_MAKERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class Refused(Exception):
    """A request message the server cannot use: what the guarded deserializer returns instead of it."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


async def abort(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, trailers: Sequence[tuple[str, str]] = ()
) -> NoReturn:
    """context.abort; a client that has already gone (cancelled, or its deadline passed) ends the call
    quietly instead of grpc logging "ExecuteBatchError raised in core" with a traceback."""
    try:
        await context.abort(code, message, trailing_metadata=tuple(trailers))
    except grpc.aio.InternalError as e:  # ExecuteBatchError: the status could not be sent
        raise asyncio.CancelledError("the client has gone") from e
    raise AssertionError("unreachable: context.abort raises")


class RateLimitedLog:
    """At most one warning per `interval` seconds; the next one says how many were left out."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL_S):
        self.logger, self.interval = logger, interval
        self._next, self._skipped = 0.0, 0

    def warning(self, message: str) -> None:
        now = time.monotonic()
        if now < self._next:
            self._skipped += 1
            return
        if self._skipped:
            message += f" (and {self._skipped} more like it in the last {self.interval:g} s)"
        self.logger.warning("%s", message)
        self._next, self._skipped = now + self.interval, 0


def with_behavior(
    handler: grpc.RpcMethodHandler, behavior: Behavior, deserializer: Callable[[bytes], Any] | None = None
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` running `behavior` (and `deserializer`, if given)."""
    make = _MAKERS[(handler.request_streaming, handler.response_streaming)]
    return make(
        behavior,
        request_deserializer=deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _behavior(handler: grpc.RpcMethodHandler) -> Behavior:
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


class RequestGuard(grpc.aio.ServerInterceptor):
    """Every handler, with a deserializer that turns bad bytes into a Refused answer (see the module docstring)."""

    def __init__(self, max_message_bytes: int, metrics: Metrics | None = None, counted_service: str = ""):
        self.max_bytes, self.metrics, self.counted = max_message_bytes, metrics, f"/{counted_service}/"
        self.log = RateLimitedLog(log)
        self.last_call = time.monotonic()  # when the latest call arrived (the drain waits for a quiet moment)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        self.last_call = time.monotonic()
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        behavior = _behavior(handler)
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            return handler  # a sync handler: grpc runs it in a thread; none here
        method = details.method
        refuse = lambda refused, context: self._refuse(method, refused, context)  # noqa: E731
        wrap = _guard_stream if handler.request_streaming else _guard_unary
        return with_behavior(handler, wrap(behavior, refuse), self._deserializer(handler.request_deserializer))

    def _deserializer(self, parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
        def deserialize(raw: bytes) -> Any:
            if len(raw) > self.max_bytes:
                return Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the request message has {len(raw)} bytes; the limit is max_message_bytes={self.max_bytes}",
                )
            try:
                return parse(raw)
            except Exception as e:  # noqa: BLE001 - DecodeError, or anything else the parser raises on these bytes
                return Refused(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {e}")

        return deserialize

    async def _refuse(self, method: str, refused: Refused, context: grpc.aio.ServicerContext) -> NoReturn:
        self.log.warning(f"refused a request to {method} from {context.peer()}: {refused.code.name}: {refused}")
        if self.metrics is not None and method.startswith(self.counted):
            self.metrics.requests.labels(method.rsplit("/", 1)[-1], refused.code.name, "", "").inc()
        await abort(context, refused.code, str(refused))


Refuse = Callable[[Refused, grpc.aio.ServicerContext], Awaitable[NoReturn]]


def _guard_unary(behavior: Behavior, refuse: Refuse) -> Behavior:
    """The request is parsed before the behavior runs: a Refused one is answered instead."""
    if inspect.isasyncgenfunction(behavior):

        async def stream_out(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Refused):
                await refuse(request, context)
            async for response in behavior(request, context):
                yield response

        return stream_out

    async def unary_out(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Refused):
            await refuse(request, context)
        return await behavior(request, context)

    return unary_out


def _guard_stream(behavior: Behavior, refuse: Refuse) -> Behavior:
    """Requests are parsed as the behavior reads them: a Refused one ends the call with its code."""

    async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Refused):
                raise request
            yield request

    if inspect.isasyncgenfunction(behavior):

        async def stream_out(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for response in behavior(checked(requests), context):
                    yield response
            except Refused as e:
                await refuse(e, context)

        return stream_out

    async def unary_out(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(checked(requests), context)
        except Refused as e:
            await refuse(e, context)

    return unary_out


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires metadata `authorization: Bearer <token>` on every call but health checks."""

    EXEMPT = ("/grpc.health.v1.Health/",)
    MESSAGE = "missing or wrong bearer token (metadata 'authorization: Bearer <token>')"

    def __init__(self, token: str, metrics: Metrics | None = None, counted_service: str = ""):
        self.token, self.metrics, self.counted = token.encode(), metrics, f"/{counted_service}/"

    def authorized(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        value = dict(metadata or ()).get("authorization", "")
        value = value.decode(errors="replace") if isinstance(value, bytes) else value
        scheme, _, credentials = value.strip().partition(" ")
        # Compare the token whatever the scheme, so the time taken says nothing about either.
        matches = hmac.compare_digest(credentials.strip().encode(), self.token)
        return matches and scheme.lower() == "bearer"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.EXEMPT) or self.authorized(details.invocation_metadata):
            return handler
        if self.metrics is not None and details.method.startswith(self.counted):
            self.metrics.requests.labels(details.method.rsplit("/", 1)[-1], "UNAUTHENTICATED", "", "").inc()

        async def deny(request: object, context: grpc.aio.ServicerContext) -> None:
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, self.MESSAGE)

        return with_behavior(handler, deny)
