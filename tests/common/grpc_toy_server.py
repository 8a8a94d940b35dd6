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
from common.grpc_server import GrpcServer
from common.logging import configure_logging


async def serve(ports_file: str, grace_s: float) -> None:
    server = GrpcServer(ServerConfig(port=0, metrics_port=0, grace_seconds=grace_s), "toy-subprocess")
    server.add_servicer(reference_pb2_grpc.add_ReferenceServicer_to_server, ToyReference())
    await server.run(ports_file=ports_file)


def main(argv: list[str]) -> int:
    configure_logging("toy-subprocess", fmt="json")
    asyncio.run(serve(argv[0], float(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
