"""Channels to our services, with the same behaviour everywhere.

`make_channel` (asyncio) and `make_sync_channel` give a channel that:
- retries calls that fail with UNAVAILABLE (a restarting or draining server), with exponential
  backoff (the gRPC service-config `retryPolicy`), and waits for the connection to be ready
  instead of failing fast (`waitForReady`);
- puts a default deadline on every call that does not set its own `timeout=`;
- sends the bearer token: as call credentials over TLS, as `authorization` metadata otherwise
  (gRPC refuses call credentials on an insecure channel);
- forwards the current log context's `request_id` as `x-request-id`, so one id follows a request
  across services;
- speaks TLS (server CA) or mTLS (client certificate) when given the PEM files.

`wait_for_health` / `wait_for_health_async` poll `grpc.health.v1` until the endpoint is SERVING.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import namedtuple
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.errors import InvalidArgument, NotFound, Unavailable

REQUEST_ID_KEY = "x-request-id"


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5  # gRPC caps this at 5
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    backoff_multiplier: float = 2.0
    retryable_codes: tuple[str, ...] = ("UNAVAILABLE",)


DEFAULT_RETRY = RetryPolicy()


def service_config(retry: RetryPolicy | None = DEFAULT_RETRY, wait_for_ready: bool = True) -> str:
    """The gRPC service config (JSON) applied to every method of the channel."""
    method: dict[str, Any] = {"name": [{}], "waitForReady": wait_for_ready}
    if retry is not None:
        method["retryPolicy"] = {
            "maxAttempts": retry.max_attempts,
            "initialBackoff": f"{retry.initial_backoff_s}s",
            "maxBackoff": f"{retry.max_backoff_s}s",
            "backoffMultiplier": retry.backoff_multiplier,
            "retryableStatusCodes": list(retry.retryable_codes),
        }
    return json.dumps({"methodConfig": [method]})


def channel_options(
    max_message_mb: int = 256,
    retry: RetryPolicy | None = DEFAULT_RETRY,
    wait_for_ready: bool = True,
    server_name: str | None = None,
) -> list[tuple[str, Any]]:
    max_bytes = max_message_mb * 1024 * 1024
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.enable_retries", 1 if retry is not None else 0),
        ("grpc.service_config", service_config(retry, wait_for_ready)),
    ]
    if server_name:  # the name the server certificate is checked against, when not the target's
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


def channel_credentials(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials: `ca_file` to trust (default: the system roots), and a client certificate
    and key for mTLS."""
    if bool(cert_file) != bool(key_file):
        raise InvalidArgument("tls", "cert_file and key_file must be given together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read("ca_file", ca_file),
        private_key=_read("key_file", key_file),
        certificate_chain=_read("cert_file", cert_file),
    )


def make_channel(
    target: str,
    *,
    tls: bool = False,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    server_name: str | None = None,
    token: str | None = None,
    default_timeout: float | None = 300.0,
    max_message_mb: int = 256,
    retry: RetryPolicy | None = DEFAULT_RETRY,
    wait_for_ready: bool = True,
) -> aio.Channel:
    """An asyncio channel to `target` ("host:port"). TLS is used when `tls` is set or any PEM file
    is given. Create it inside the event loop that will use it."""
    options = channel_options(max_message_mb, retry, wait_for_ready, server_name)
    secure = tls or bool(ca_file or cert_file)
    interceptors = _aio_interceptors(_CallDefaults(default_timeout, None if secure else token))
    if not secure:
        return aio.insecure_channel(target, options=options, interceptors=interceptors)
    credentials = _with_token(channel_credentials(ca_file, cert_file, key_file), token)
    return aio.secure_channel(target, credentials, options=options, interceptors=interceptors)


def make_sync_channel(
    target: str,
    *,
    tls: bool = False,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    server_name: str | None = None,
    token: str | None = None,
    default_timeout: float | None = 300.0,
    max_message_mb: int = 256,
    retry: RetryPolicy | None = DEFAULT_RETRY,
    wait_for_ready: bool = True,
) -> grpc.Channel:
    """The blocking twin of `make_channel`, for scripts and launchers."""
    options = channel_options(max_message_mb, retry, wait_for_ready, server_name)
    secure = tls or bool(ca_file or cert_file)
    if secure:
        credentials = _with_token(channel_credentials(ca_file, cert_file, key_file), token)
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    return grpc.intercept_channel(
        channel, _SyncInterceptor(_CallDefaults(default_timeout, None if secure else token))
    )


# ---------------------------------------------------------------------------------------------
# Health
# ---------------------------------------------------------------------------------------------


async def wait_for_health_async(
    target: str, timeout: float = 30.0, *, service: str = "", poll_s: float = 0.1, **channel_kwargs: Any
) -> None:
    """Poll `grpc.health.v1.Health/Check` on `target` until `service` ("" = the whole server) is
    SERVING. Raises `Unavailable` naming the endpoint and the last answer after `timeout` s."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    # No wait-for-ready: a refused connection should show up as the "last" answer, not a timeout.
    channel_kwargs.setdefault("wait_for_ready", False)
    async with make_channel(target, retry=None, default_timeout=None, **channel_kwargs) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(f"{target}: not SERVING after {timeout:g}s ({last})")
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=min(remaining, 2.0)
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                last = _describe(exc)
            await asyncio.sleep(min(poll_s, max(deadline - time.monotonic(), 0)))


def wait_for_health(
    target: str, timeout: float = 30.0, *, service: str = "", poll_s: float = 0.1, **channel_kwargs: Any
) -> None:
    """Blocking twin of `wait_for_health_async`."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    channel_kwargs.setdefault("wait_for_ready", False)
    with make_sync_channel(target, retry=None, default_timeout=None, **channel_kwargs) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(f"{target}: not SERVING after {timeout:g}s ({last})")
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=min(remaining, 2.0)
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                last = _describe(exc)
            time.sleep(min(poll_s, max(deadline - time.monotonic(), 0)))


def _describe(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.NOT_FOUND:
        return "service unknown to the server's health check"
    return f"{code.name if code else 'error'}: {details}"


# ---------------------------------------------------------------------------------------------
# Interceptors: default deadline, bearer token on insecure channels, request-id propagation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CallDefaults:
    timeout: float | None
    token: str | None  # only on insecure channels (TLS channels carry it as call credentials)

    def timeout_for(self, requested: float | None) -> float | None:
        return self.timeout if requested is None else requested

    def extra_metadata(self, metadata: Sequence[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
        keys = {key for key, _ in metadata or ()}
        extra = []
        if self.token and "authorization" not in keys:
            extra.append(("authorization", f"Bearer {self.token}"))
        request_id = structlog.contextvars.get_contextvars().get("request_id")
        if request_id and REQUEST_ID_KEY not in keys:
            extra.append((REQUEST_ID_KEY, str(request_id)))
        return extra


def _aio_details(defaults: _CallDefaults, details: aio.ClientCallDetails) -> aio.ClientCallDetails:
    metadata = aio.Metadata(*tuple(details.metadata or ()))
    for key, value in defaults.extra_metadata(tuple(metadata)):
        metadata.add(key, value)
    return aio.ClientCallDetails(
        method=details.method,
        timeout=defaults.timeout_for(details.timeout),
        metadata=metadata,
        credentials=details.credentials,
        wait_for_ready=details.wait_for_ready,
    )


# An aio channel files each interceptor under one call kind only, so there is one class per kind.
class _AioUnaryUnary(aio.UnaryUnaryClientInterceptor):
    def __init__(self, defaults: _CallDefaults):
        self._defaults = defaults

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_aio_details(self._defaults, client_call_details), request)


class _AioUnaryStream(aio.UnaryStreamClientInterceptor):
    def __init__(self, defaults: _CallDefaults):
        self._defaults = defaults

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_aio_details(self._defaults, client_call_details), request)


class _AioStreamUnary(aio.StreamUnaryClientInterceptor):
    def __init__(self, defaults: _CallDefaults):
        self._defaults = defaults

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(_aio_details(self._defaults, client_call_details), request_iterator)


class _AioStreamStream(aio.StreamStreamClientInterceptor):
    def __init__(self, defaults: _CallDefaults):
        self._defaults = defaults

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(_aio_details(self._defaults, client_call_details), request_iterator)


def _aio_interceptors(defaults: _CallDefaults) -> list[aio.ClientInterceptor]:
    return [cls(defaults) for cls in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)]


class _SyncCallDetails(
    namedtuple(
        "_SyncCallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class _SyncInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, defaults: _CallDefaults):
        self._defaults = defaults

    def _details(self, details: grpc.ClientCallDetails) -> _SyncCallDetails:
        metadata = list(details.metadata or ())
        metadata += self._defaults.extra_metadata(metadata)
        return _SyncCallDetails(
            details.method,
            self._defaults.timeout_for(details.timeout),
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def _with_token(credentials: grpc.ChannelCredentials, token: str | None) -> grpc.ChannelCredentials:
    if not token:
        return credentials
    return grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))


def _read(name: str, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise NotFound(f"{name}: cannot read {path!r}: {exc.strerror}") from None
