"""The one server interceptor every service runs behind.

For each call, in order: take the request id from `x-request-id` (or make one), bind it into the
log context and return it in the trailing metadata; check the bearer token when the server has
one (health and reflection stay open, so probes and `grpcurl list` work without it); run the
handler; turn our exceptions into status codes; count the call, its latency and its status in
Prometheus (method label = the full gRPC path, e.g. `/aligner.v1.Reward/Score`). Unary and
streaming handlers (either direction) are wrapped alike. A handler that sets its own trailing
metadata replaces the request id there (it is still in the logs).
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
from grpc import aio

from common import metrics
from common.errors import AlignerError, InvalidArgument, NotFound, Unavailable
from common.logging import bound_context, get_logger

log = get_logger(__name__)

REQUEST_ID_KEY = "x-request-id"
# Methods that never need the bearer token.
OPEN_SERVICE_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def status_for_exception(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client sees for an exception raised by a handler."""
    if isinstance(exc, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, Unavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, AlignerError):  # a usable but unsatisfiable request (config, state)
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, str(exc) or "not implemented"
    # Do not leak internals to a (possibly public) client; the log has the traceback.
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


def _metadata_value(metadata: Any, key: str) -> str | None:
    for item in metadata or ():
        if item[0] == key:
            value = item[1]
            return value.decode() if isinstance(value, bytes) else value
    return None


class ServerInterceptor(aio.ServerInterceptor):
    def __init__(self, service: str, auth_token: str | None = None):
        self._service = service
        self._token = auth_token.encode() if auth_token else None
        self._in_flight = metrics.RPC_IN_FLIGHT.labels(service)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED
            return None
        method = details.method
        request_id = _metadata_value(details.invocation_metadata, REQUEST_ID_KEY) or uuid.uuid4().hex
        denied = self._auth_problem(method, details.invocation_metadata)

        def observed(context: aio.ServicerContext):
            return self._observe(method, request_id, denied, context)

        return _wrap_handler(handler, observed)

    def _auth_problem(self, method: str, metadata: Any) -> str | None:
        if self._token is None or method.startswith(OPEN_SERVICE_PREFIXES):
            return None
        header = _metadata_value(metadata, "authorization")
        if header is None:
            return "missing bearer token (metadata 'authorization: Bearer <token>')"
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._token):
            return "invalid bearer token"
        return None

    @asynccontextmanager
    async def _observe(
        self, method: str, request_id: str, denied: str | None, context: aio.ServicerContext
    ) -> AsyncIterator[None]:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        self._in_flight.inc()
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        try:
            with bound_context(request_id=request_id, rpc=method):
                try:
                    if denied is not None:
                        await context.abort(grpc.StatusCode.UNAUTHENTICATED, denied)
                    yield
                    code = context.code() or grpc.StatusCode.OK  # the handler may set_code()
                except aio.AbortError:  # context.abort(): the status is already set
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                except asyncio.CancelledError:  # the client went away or its deadline passed
                    remaining = context.time_remaining()
                    expired = remaining is not None and remaining <= 0
                    code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
                    raise
                except Exception as exc:
                    code, message = status_for_exception(exc)
                    if code == grpc.StatusCode.INTERNAL:
                        log.exception("rpc failed", code=code.name)
                    else:
                        log.info("rpc rejected", code=code.name, error=str(exc))
                    await context.abort(code, message)
        finally:
            self._in_flight.dec()
            metrics.RPC_LATENCY.labels(self._service, method).observe(time.perf_counter() - start)
            metrics.RPC_REQUESTS.labels(self._service, method, code.name).inc()
            if code != grpc.StatusCode.OK:
                metrics.RPC_ERRORS.labels(self._service, method, code.name).inc()


def _wrap_handler(handler: grpc.RpcMethodHandler, observed: Callable) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour run inside `observed(context)`."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if not handler.request_streaming and not handler.response_streaming:
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary_response(handler.unary_unary, observed), **kwargs
        )
    if handler.request_streaming and not handler.response_streaming:
        return grpc.stream_unary_rpc_method_handler(
            _wrap_unary_response(handler.stream_unary, observed), **kwargs
        )
    if not handler.request_streaming:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream_response(handler.unary_stream, observed), **kwargs
        )
    return grpc.stream_stream_rpc_method_handler(
        _wrap_stream_response(handler.stream_stream, observed), **kwargs
    )


def _wrap_unary_response(behavior: Callable, observed: Callable) -> Callable:
    async def wrapper(request: Any, context: aio.ServicerContext) -> Any:
        async with observed(context):
            result = behavior(request, context)
            # Plain (non-async) handlers are allowed; they should not block for long.
            return await result if inspect.isawaitable(result) else result

    return wrapper


def _wrap_stream_response(behavior: Callable, observed: Callable) -> Callable:
    # A streaming handler is either an async generator or a coroutine that calls context.write().
    if inspect.isasyncgenfunction(behavior):

        async def generator_wrapper(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            async with observed(context):
                async for response in behavior(request, context):
                    yield response

        return generator_wrapper
    return _wrap_unary_response(behavior, observed)
