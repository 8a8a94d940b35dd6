#!/usr/bin/env python3
"""gRPC health check for the images: `aligner-healthcheck [--target HOST:PORT ...]`.

Asks `grpc.health.v1.Health/Check` (the whole server, service "") of each target and exits 0 when
every one answers SERVING, 1 otherwise. Used by the Dockerfiles' HEALTHCHECK, by the chart's exec
probes where the kubelet's own gRPC probe cannot connect (TLS, mTLS), and by the orchestrator's
init container to wait for the model services (`--wait`). No grpcurl needed: grpcio and
grpcio-health-checking are already in the image.

The default target is 127.0.0.1:$ALIGNER_HEALTH_PORT (set per image, overridable per container).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="aligner-healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", default=[],
                        help="HOST:PORT to check (repeatable); default 127.0.0.1:$ALIGNER_HEALTH_PORT")
    parser.add_argument("--service", default="", help="health service name ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per check")
    parser.add_argument("--wait", type=float, default=0.0,
                        help="keep retrying for up to this many seconds until every target is SERVING")
    parser.add_argument("--tls-ca", help="CA bundle (PEM) to verify the server; enables TLS")
    parser.add_argument("--tls-cert", help="client certificate (PEM) for mTLS")
    parser.add_argument("--tls-key", help="client key (PEM) for mTLS")
    parser.add_argument("--server-name", help="name to expect in the server certificate (TLS)")
    return parser.parse_args(argv)


def _targets(args: argparse.Namespace) -> list[str]:
    if args.target:
        return args.target
    port = os.environ.get("ALIGNER_HEALTH_PORT")
    if not port:
        raise SystemExit("aligner-healthcheck: error: no --target and ALIGNER_HEALTH_PORT is not set")
    return [f"127.0.0.1:{port}"]


def _channel(target: str, args: argparse.Namespace) -> grpc.Channel:
    if not args.tls_ca:
        return grpc.insecure_channel(target)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("aligner-healthcheck: error: --tls-cert and --tls-key go together")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(args.tls_ca).read_bytes(),
        private_key=Path(args.tls_key).read_bytes() if args.tls_key else None,
        certificate_chain=Path(args.tls_cert).read_bytes() if args.tls_cert else None,
    )
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(target, credentials, options=options)


def check(target: str, args: argparse.Namespace) -> str | None:
    """None when `target` is SERVING, else a one-line reason."""
    with _channel(target, args) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as exc:
            return f"{target}: {exc.code().name}: {exc.details()}"
    if reply.status != SERVING:
        return f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    pending = _targets(args)
    deadline = time.monotonic() + args.wait
    while True:
        problems = {target: check(target, args) for target in pending}
        pending = [target for target, problem in problems.items() if problem is not None]
        if not pending:
            return 0
        if time.monotonic() >= deadline:
            for target in pending:
                print(f"aligner-healthcheck: not serving: {problems[target]}", file=sys.stderr)
            return 1
        print(f"aligner-healthcheck: waiting for {', '.join(pending)}", file=sys.stderr, flush=True)
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


if __name__ == "__main__":
    sys.exit(main())
