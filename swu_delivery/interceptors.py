"""A gRPC server interceptor that counts and times every call and sets its request id.

The request id is the caller's `x-request-id` metadata, else a new random one; it is set in
`logs.REQUEST_ID`, so every log line written while serving the call carries it.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from time import perf_counter
from typing import Any, TypeAlias

import grpc

from swu_delivery import metrics
from swu_delivery.logs import REQUEST_ID

__all__ = ["RequestMetrics"]

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic only in the stubs
REQUEST_ID_KEY = "x-request-id"
MAX_REQUEST_ID = 128  # a caller's longer id is cut, so it cannot flood the logs


def _code(context: Any, failed: str) -> str:
    """The call's status: the one the servicer set, else `failed` ("" when it returned)."""
    code = context.code()
    if code is None:
        return failed or "OK"
    return str(code.name)


class _Timer:
    """Counts and times one method; the label children are looked up once per method."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.seconds = metrics.GRPC_SECONDS.labels(method)
        self.ok = metrics.GRPC_REQUESTS.labels(method, "OK")

    def done(self, started: float, context: Any, failed: str) -> None:
        self.seconds.observe(perf_counter() - started)
        code = _code(context, failed)
        if code == "OK":
            self.ok.inc()
        else:
            metrics.GRPC_REQUESTS.labels(self.method, code).inc()


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], timer: _Timer) -> Any:
    async def call(request: Any, context: Any) -> Any:
        started, failed = perf_counter(), "UNKNOWN"
        REQUEST_ID.set(_request_id_of(context))
        try:
            result = await behavior(request, context)
            failed = ""
            return result
        except asyncio.CancelledError:
            failed = "CANCELLED"
            raise
        finally:
            timer.done(started, context, failed)

    return call


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]], timer: _Timer) -> Any:
    async def call(request: Any, context: Any) -> AsyncIterator[Any]:
        started, failed = perf_counter(), "UNKNOWN"
        REQUEST_ID.set(_request_id_of(context))
        try:
            async for item in behavior(request, context):
                yield item
            failed = ""
        except asyncio.CancelledError:
            failed = "CANCELLED"
            raise
        finally:
            timer.done(started, context, failed)

    return call


def _request_id_of(context: Any) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and value:
            return str(value)[:MAX_REQUEST_ID]
    return os.urandom(8).hex()


def _wrap(behavior: Any, timer: _Timer) -> Any:
    if inspect.isasyncgenfunction(behavior):
        return _wrap_stream(behavior, timer)
    return _wrap_unary(behavior, timer)


_FACTORIES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


class RequestMetrics(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts calls by method and status code, times them, and sets the request id."""

    def __init__(self) -> None:
        self._timers: dict[str, _Timer] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        timer = self._timers.get(method)
        if timer is None:
            timer = self._timers[method] = _Timer(method)
        for kind, factory in _FACTORIES.items():
            behavior = getattr(handler, kind)
            if behavior is not None:
                return factory(
                    _wrap(behavior, timer),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler
