"""A toy service process run by the SIGTERM test: `python grpc_toy_server.py PORTS_FILE GRACE_S`.

It is a real service main built with the plumbing: JSON logs, GrpcServer.run, exit code 0 after
a drained shutdown.
"""

from __future__ import annotations

import asyncio
import sys

from aligner.v1 import reference_pb2_grpc
from grpc_toys import ToyReference

from common.config import ServerConfig
from common.grpc_server import GrpcServer, configure_service_process


async def serve(config: ServerConfig, ports_file: str) -> None:
    server = GrpcServer(config, "toy-subprocess")
    server.add_servicer(reference_pb2_grpc.add_ReferenceServicer_to_server, ToyReference())
    await server.run(ports_file=ports_file)


def main(argv: list[str]) -> int:
    config = ServerConfig(
        port=0, metrics_port=0, grace_seconds=float(argv[1]), log_format="json", torch_threads=1
    )
    configure_service_process(config, "toy-subprocess")
    asyncio.run(serve(config, argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
