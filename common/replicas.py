"""Replica sets: one logical service served by several pods, as the orchestrator sees it.

    refs = ReplicaSet("reference", resolve=lambda: expand(["reference.ns.svc:5557"]),
                      connect=lambda address: ReferenceClient(address, ...), probe=...)
    logprobs = refs.call("LogProbs", lambda replica: replica.client.logprobs(rows))

- **Addresses.** `resolve()` lists the replicas' addresses: a list from the config, or one DNS name
  that resolves to several (a Kubernetes headless Service). It runs again every
  `resolve_interval_s`, so pods that come and go are seen; a replica whose address disappears is
  closed, a new address gets a new client.
- **Spreading.** Each call goes to the healthy replica with the fewest calls in flight (ties: the
  one used least recently), so concurrent micro-batches spread over the replicas.
- **Failover.** A call that fails because its replica is down or restarting (UNAVAILABLE,
  DEADLINE_EXCEEDED, or our `Unavailable`) marks that replica down and is retried on another one;
  with no healthy replica left it backs off and waits, up to `retry_max_wait_s` in all, then raises
  `ServiceDown` naming the service. The retried call is the same call (the same rows, the same
  seeds), so nothing is lost or counted twice; calls that change state (a weight push, a critic
  Train) must therefore be idempotent on the server, which they are (versions, rollout ids).
- **Coming back.** A down replica is probed (`probe(replica)`, e.g. a health check; for
  generation: serves the current policy version, resyncing it if not) at most every
  `probe_interval_s` and used again once the probe passes.

This module knows nothing about gRPC stubs: `connect` builds the caller's typed client.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc

from common import metrics
from common.errors import AlignerError, InvalidArgument, Unavailable
from common.logging import get_logger

log = get_logger(__name__)
C = TypeVar("C")
T = TypeVar("T")

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class ServiceError(AlignerError):
    """A replica answered with an error that another replica would give too (a bad request, a
    refused token): the call fails at once, naming the service, the replica and the status."""

    def __init__(self, message: str, code: grpc.StatusCode):
        super().__init__(message)
        self.code = code


class ServiceDown(AlignerError):
    """A service had no replica that answered for longer than the retry budget."""

    def __init__(self, message: str, service: str):
        super().__init__(message)
        self.service = service


def retry_reason(exc: BaseException) -> str | None:
    """Why `exc` says its replica is down or restarting (worth trying another), or None."""
    if isinstance(exc, grpc.RpcError) and exc.code() in _RETRYABLE:
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, Unavailable):
        return str(exc)
    return None


# ---------------------------------------------------------------------------------------------
# Addresses
# ---------------------------------------------------------------------------------------------


def split_address(address: str, key: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6]:port"; InvalidArgument naming `key` otherwise."""
    host, sep, port = address.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(key, f"{address!r} is not host:port")
    return host, int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def resolve_host(host: str, key: str) -> list[str]:
    """The IP addresses `host` resolves to (itself when it is one), sorted, of one family (IPv4
    when it has any). InvalidArgument naming `key` when it resolves to nothing."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise InvalidArgument(key, f"{host!r} does not resolve ({exc.strerror})") from None
    v4 = sorted({info[4][0] for info in infos if info[0] == socket.AF_INET})
    v6 = sorted({info[4][0] for info in infos if info[0] == socket.AF_INET6})
    if not (v4 or v6):
        raise InvalidArgument(key, f"{host!r} resolves to no address")
    return v4 or v6


def expand(addresses: Iterable[str], key: str) -> list[str]:
    """Every "ip:port" behind a list of "host:port" (each host may resolve to several pods)."""
    out: list[str] = []
    for address in addresses:
        host, port = split_address(address, key)
        out += [join_address(ip, port) for ip in resolve_host(host, key)]
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------------------------------------
# The set
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Replica(Generic[C]):
    address: str  # its identity: a new address is a new replica
    client: C
    healthy: bool = True
    outstanding: int = 0  # calls in flight
    last_used: float = 0.0
    probe_at: float = 0.0  # when a down replica may be probed next
    last_error: str = ""  # why it is down
    state: dict[str, Any] = field(default_factory=dict)  # the caller's (e.g. the version it serves)


class ReplicaSet(Generic[C]):
    def __init__(
        self,
        name: str,
        *,
        resolve: Callable[[], list[str]],
        connect: Callable[[str], C],
        probe: Callable[[Replica[C]], bool] = lambda replica: True,
        close: Callable[[C], None] = lambda client: client.close(),
        retry_max_wait_s: float = 120.0,
        resolve_interval_s: float = 30.0,
        probe_interval_s: float = 1.0,
    ):
        self.name = name
        self._resolve, self._connect, self._probe, self._close = resolve, connect, probe, close
        self.retry_max_wait_s = retry_max_wait_s
        self.resolve_interval_s, self.probe_interval_s = resolve_interval_s, probe_interval_s
        self._lock = threading.Lock()
        self._replicas: dict[str, Replica[C]] = {}
        self._resolved_at = float("-inf")
        self._refresh(force=True)  # a bad address list fails here, at startup

    # --- membership --------------------------------------------------------------------------

    def _refresh(self, force: bool = False) -> None:
        """Re-resolve when due: new addresses get clients, vanished ones are closed."""
        now = time.monotonic()
        if not force and now - self._resolved_at < self.resolve_interval_s:
            return
        self._resolved_at = now
        try:
            addresses = self._resolve()
        except InvalidArgument:
            if force:
                raise
            log.warning("re-resolving failed; keeping the known replicas", target_service=self.name)
            return
        if not addresses:
            raise InvalidArgument(self.name, "the replica list is empty")
        with self._lock:
            gone = [a for a in self._replicas if a not in addresses]
            for address in gone:
                self._close(self._replicas.pop(address).client)
            for address in addresses:
                if address not in self._replicas:
                    self._replicas[address] = Replica(address, self._connect(address))
        if gone or len(addresses) != len(self._replicas):
            log.info("replicas changed", target_service=self.name, replicas=addresses)

    def replicas(self) -> list[Replica[C]]:
        self._refresh()
        with self._lock:
            return list(self._replicas.values())

    def mark_down(self, replica: Replica[C], reason: str) -> None:
        with self._lock:
            if replica.healthy:
                log.warning("replica down", target_service=self.name, replica=replica.address, reason=reason)
            replica.healthy = False
            replica.last_error = reason
            replica.probe_at = time.monotonic() + self.probe_interval_s

    def _probe_down(self) -> None:
        """Give each down replica whose probe time has come a chance to come back."""
        now = time.monotonic()
        with self._lock:  # claim the due ones, so that concurrent callers do not probe them too
            due = [r for r in self._replicas.values() if not r.healthy and now >= r.probe_at]
            for replica in due:
                replica.probe_at = float("inf")
        for replica in due:
            try:
                ok = self._probe(replica)
            except Exception as exc:  # noqa: BLE001 - a failed probe just means "still down"
                ok, reason = False, str(exc) or type(exc).__name__
            else:
                reason = "probe failed"
            with self._lock:
                replica.healthy = ok
                replica.last_error = "" if ok else reason
                replica.probe_at = time.monotonic() + self.probe_interval_s
            if ok:
                log.info("replica back", target_service=self.name, replica=replica.address)
            else:
                log.debug("replica still down", target_service=self.name, replica=replica.address, reason=reason)

    def healthy(self) -> list[Replica[C]]:
        self._probe_down()
        return [r for r in self.replicas() if r.healthy]

    def wait_ready(self, timeout_s: float) -> None:
        """At start: every replica is probed; at least one must pass within `timeout_s`."""
        for replica in self.replicas():
            self.mark_down(replica, "not probed yet")
            replica.probe_at = 0.0
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if time.monotonic() > deadline:
                why = "; ".join(f"{r.address}: {r.last_error}" for r in self.replicas())
                raise ServiceDown(f"{self.name}: no replica ready within {timeout_s:g}s ({why})", self.name)
            time.sleep(min(0.2, self.probe_interval_s))

    # --- calls -------------------------------------------------------------------------------

    def _pick(self) -> Replica[C] | None:
        candidates = self.healthy()
        if not candidates:
            return None
        with self._lock:
            replica = min(candidates, key=lambda r: (r.outstanding, r.last_used))
            replica.outstanding += 1
            replica.last_used = time.monotonic()
            return replica

    def call(self, what: str, fn: Callable[[Replica[C]], T]) -> T:
        """`fn(replica)` on a healthy replica, failing over as the module doc says."""
        started, backoff, last = time.monotonic(), 0.2, "no replica healthy"
        while True:
            replica = self._pick()
            if replica is not None:
                try:
                    return fn(replica)
                except Exception as exc:
                    reason = retry_reason(exc)
                    if reason is None and isinstance(exc, grpc.RpcError):
                        raise ServiceError(
                            f"{self.name} at {replica.address}: {what} failed: {exc.code().name}: {exc.details()}",
                            exc.code(),
                        ) from None
                    if reason is None:
                        raise
                    last = f"{replica.address}: {reason}"
                    self.mark_down(replica, reason)
                    metrics.PPO_SERVICE_RETRIES.labels(self.name).inc()
                finally:
                    with self._lock:
                        replica.outstanding -= 1
                if any(r.healthy for r in self.replicas()):
                    continue  # another replica takes this call at once
            waited = time.monotonic() - started
            if waited >= self.retry_max_wait_s:
                raise ServiceDown(
                    f"{self.name}: no replica answered for {waited:.0f}s ({what}: {last})", self.name
                ) from None
            log.warning("service unavailable, retrying", target_service=self.name, call=what, reason=last,
                        waited_s=round(waited, 1))  # fmt: skip
            time.sleep(min(backoff, max(0.0, self.retry_max_wait_s - waited)))
            backoff = min(backoff * 2, 4.0)
            with self._lock:  # nothing healthy: let every replica be probed again now
                for r in self._replicas.values():
                    r.probe_at = min(r.probe_at, time.monotonic())

    def call_each(self, what: str, fn: Callable[[Replica[C]], T]) -> dict[str, T]:
        """`fn` on every healthy replica at once (a weight push); a replica that fails as down is
        marked down (its probe resyncs it later). ServiceDown when none succeeds within the budget."""
        started = time.monotonic()
        while True:
            results: dict[str, T] = {}
            replicas = self.healthy()
            with ThreadPoolExecutor(max_workers=max(1, len(replicas))) as pool:
                futures = [(replica, pool.submit(fn, replica)) for replica in replicas]
            for replica, future in futures:
                try:
                    results[replica.address] = future.result()
                except Exception as exc:
                    reason = retry_reason(exc)
                    if reason is None:
                        raise
                    self.mark_down(replica, reason)
            if results:
                return results
            if time.monotonic() - started >= self.retry_max_wait_s:
                raise ServiceDown(f"{self.name}: no replica took {what} for {self.retry_max_wait_s:g}s", self.name)
            time.sleep(0.5)

    def close(self) -> None:
        with self._lock:
            for replica in self._replicas.values():
                self._close(replica.client)
            self._replicas.clear()
