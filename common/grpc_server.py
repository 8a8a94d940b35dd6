"""The asyncio gRPC server every service runs in.

    async def main(config):
        server = GrpcServer(config.server, "reward")          # inside the event loop
        server.add_servicer(reward_pb2_grpc.add_RewardServicer_to_server, RewardServicer(...))
        await server.run(ready=load_model, ports_file=...)     # returns after a SIGTERM drain

What it gives every service: `grpc.health.v1` health (NOT_SERVING until the service is ready and
again from the first moment of shutdown), server reflection, the interceptor of
`common.grpc_interceptor` (metrics, request ids, status mapping, bearer-token auth), message
size limits, TLS or mTLS, the Prometheus exporter, and a graceful shutdown on SIGTERM/SIGINT:
NOT_SERVING first, then stop accepting calls, then drain in-flight calls for `grace_seconds`.
With port 0 the bound ports are printed as one JSON line (`{"event": "serving", ...}`) and
optionally written to a file, for launchers and tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from common.config import ConfigError, ServerConfig, TlsConfig
from common.errors import Unavailable
from common.grpc_interceptor import ServerInterceptor
from common.logging import configure_logging, get_logger

log = get_logger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class GrpcServer:
    """One aio gRPC server with the project's plumbing. Construct it inside the running event
    loop (grpc binds an aio server to the loop it was made in)."""

    def __init__(self, config: ServerConfig, service_name: str):
        asyncio.get_running_loop()  # fail here, clearly, rather than on a foreign loop later
        self.config = config
        self.service_name = service_name
        max_bytes = config.max_message_mb * 1024 * 1024
        self._server = aio.server(
            interceptors=[ServerInterceptor(service_name, auth_token=read_auth_token(config))],
            options=[
                ("grpc.max_send_message_length", max_bytes),
                ("grpc.max_receive_message_length", max_bytes),
                # Never share a port with another process (a stale server, a parallel test).
                ("grpc.so_reuseport", 0),
            ],
        )
        self._health = health.aio.HealthServicer()
        self._service_names: list[str] = []
        self._metrics_httpd: Any = None
        self._stopping = asyncio.Event()  # set by SIGTERM/SIGINT or request_stop()
        self.port: int | None = None
        self.metrics_port: int = -1

    @property
    def server(self) -> aio.Server:
        return self._server

    @property
    def service_names(self) -> list[str]:
        """Full names of the services added (e.g. `aligner.v1.Reward`)."""
        return list(self._service_names)

    def add_servicer(self, add_to_server: Callable[[Any, Any], None], servicer: Any) -> None:
        """Register a servicer with its generated `add_XServicer_to_server` function."""
        add_to_server(servicer, _NameRecorder(self._server, self._service_names))

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> int:
        """Add health and reflection, bind, start serving (health NOT_SERVING), start the metrics
        exporter. Returns the bound gRPC port."""
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        for name in ["", *self._service_names]:  # "" is the whole server
            await self._health.set(name, _NOT_SERVING)
        if self.config.reflection:  # off: callers need the .proto files, nothing lists the API
            reflection.enable_server_reflection(
                [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server
            )
        address = _address(self.config.host, self.config.port)
        credentials = server_credentials(self.config.tls)
        try:
            if credentials is None:
                port = self._server.add_insecure_port(address)
            else:
                port = self._server.add_secure_port(address, credentials)
        except RuntimeError as exc:  # grpc raises when the address cannot be bound
            raise Unavailable(f"{self.service_name}: cannot listen on {address}: {exc}") from None
        if not port:
            raise Unavailable(f"{self.service_name}: cannot listen on {address}")
        self.port = port
        await self._server.start()
        if self.config.metrics_port >= 0:
            try:
                self._metrics_httpd, _ = start_http_server(self.config.metrics_port, addr=self.config.host)
            except OSError as exc:
                await self._server.stop(0)
                metrics_address = _address(self.config.host, self.config.metrics_port)
                raise Unavailable(
                    f"{self.service_name}: cannot serve metrics on {metrics_address}: {exc}"
                ) from None
            self.metrics_port = self._metrics_httpd.server_address[1]
        log.info(
            "grpc server started",
            service=self.service_name,
            port=self.port,
            metrics_port=self.metrics_port,
            services=self._service_names,
            tls=credentials is not None,
        )
        return port

    async def set_serving(self, serving: bool = True) -> None:
        """Report SERVING (or NOT_SERVING) for the server and every added service."""
        status = _SERVING if serving else _NOT_SERVING
        for name in ["", *self._service_names]:
            await self._health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new calls, let in-flight calls finish for `grace`
        seconds (default: config.grace_seconds), then cancel what is left."""
        grace = self.config.grace_seconds if grace is None else grace
        await self._health.enter_graceful_shutdown()
        log.info("grpc server stopping", service=self.service_name, grace_seconds=grace)
        await self._server.stop(grace)
        if self._metrics_httpd is not None:
            # shutdown() waits for the exporter's poll loop (up to 0.5 s): not on the event loop.
            await asyncio.to_thread(self._metrics_httpd.shutdown)
            self._metrics_httpd.server_close()
            self._metrics_httpd = None
        log.info("grpc server stopped", service=self.service_name)

    async def run(
        self,
        ready: Callable[[], Awaitable[None]] | None = None,
        ports_file: str | Path | None = None,
        handle_signals: bool = True,
    ) -> None:
        """Start, announce the ports, await `ready()` (e.g. model loading) and go SERVING, then
        serve until SIGTERM/SIGINT (or `request_stop()`) and drain. A signal during `ready()`
        stops at once; a failing `ready()` stops the server and re-raises."""
        stopping = self.install_signal_handlers() if handle_signals else self._stopping
        started = False
        try:
            await self.start()
            started = True
            self.announce(ports_file)
            if ready is not None:
                ready_task = asyncio.ensure_future(ready())
                stop_task = asyncio.ensure_future(stopping.wait())
                await asyncio.wait({ready_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
                stop_task.cancel()
                if not ready_task.done():
                    ready_task.cancel()
                    await asyncio.gather(ready_task, return_exceptions=True)
                else:
                    ready_task.result()
            if not stopping.is_set():
                await self.set_serving(True)
                log.info("ready: health SERVING", service=self.service_name)
                await stopping.wait()
        finally:
            if started:
                await self.stop()
            if handle_signals:
                self.remove_signal_handlers()

    def request_stop(self) -> None:
        """Make `run()` drain and return, as SIGTERM does (e.g. from a Stop RPC or a fatal error)."""
        self._stopping.set()

    def install_signal_handlers(self) -> asyncio.Event:
        """SIGTERM/SIGINT set the returned event; a second signal cancels in-flight calls now."""
        loop = asyncio.get_running_loop()
        stopping = self._stopping

        def on_signal(sig: signal.Signals) -> None:
            if stopping.is_set():
                log.warning("second signal: cancelling in-flight calls", signal=sig.name)
                asyncio.ensure_future(self._server.stop(0))
                return
            log.info("signal received: draining", signal=sig.name)
            stopping.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        return stopping

    def remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

    def announce(self, ports_file: str | Path | None = None) -> dict[str, Any]:
        """Print the bound ports as one JSON line on stdout and, when asked, write them to a file
        (atomically, so a reader never sees half of it)."""
        info = {
            "event": "serving",
            "service": self.service_name,
            "host": self.config.host,
            "port": self.port,
            "metrics_port": self.metrics_port,
            "pid": os.getpid(),
        }
        line = json.dumps(info)
        print(line, file=sys.stdout, flush=True)
        if ports_file is not None:
            write_atomic(Path(ports_file), line + "\n")
        return info


def configure_service_process(
    config: ServerConfig, service_name: str, *, run_id: str | None = None, level: str = "INFO"
) -> None:
    """The first lines of every service main: logs in the configured format, and the configured
    number of torch threads (the CPU is shared with the other services)."""
    import torch  # here, not at import time: the plumbing itself does not need torch

    configure_logging(service_name, fmt=config.log_format, level=level, run_id=run_id)
    torch.set_num_threads(max(1, config.torch_threads))


class _NameRecorder:
    """Stands in for the server in a generated `add_XServicer_to_server` call, to learn the
    service's full name (for health and reflection) while passing everything through."""

    def __init__(self, server: aio.Server, names: list[str]):
        self._server = server
        self._names = names

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        for handler in handlers:
            name = handler.service_name()
            if name not in self._names:
                self._names.append(name)
        self._server.add_generic_rpc_handlers(handlers)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


def read_auth_token(config: ServerConfig, prefix: str = "") -> str | None:
    """The bearer token of `config` (`auth_token`, or the contents of `auth_token_file`); errors
    name the keys with `prefix` (e.g. "remote.")."""
    if config.auth_token and config.auth_token_file:
        raise ConfigError(f"config keys '{prefix}auth_token' and '{prefix}auth_token_file': set one, not both")
    if config.auth_token_file:
        path = Path(config.auth_token_file)
        if not path.is_file():
            raise ConfigError(f"config key '{prefix}auth_token_file': {str(path)!r} does not exist")
        token = path.read_text().strip()
        if not token:
            raise ConfigError(f"config key '{prefix}auth_token_file': {str(path)!r} is empty")
        return token
    return config.auth_token or None


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials | None:
    """TLS when cert_file/key_file are set; mTLS (client certificate required) with client_ca_file."""
    if not (tls.cert_file or tls.key_file or tls.client_ca_file):
        return None
    if not (tls.cert_file and tls.key_file):
        raise ConfigError("config key 'tls': cert_file and key_file must be set together")
    cert, key = _read_pem("tls.cert_file", tls.cert_file), _read_pem("tls.key_file", tls.key_file)
    client_ca = _read_pem("tls.client_ca_file", tls.client_ca_file) if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _read_pem(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"config key {key!r}: cannot read {path!r}: {exc.strerror}") from None


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):  # a bare IPv6 address
        host = f"[{host}]"
    return f"{host}:{port}"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_ports_file(path: str | Path) -> dict[str, Any]:
    """The JSON written by `GrpcServer.announce(ports_file=...)`."""
    return json.loads(Path(path).read_text())
