"""Server lifecycle: `GrpcServer.run` (ready, serving, stop) in process, and a SIGTERM drain of a
real service process: NOT_SERVING first, in-flight call completes, new calls refused, exit 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
from aligner.v1 import reference_pb2, reference_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from common.codec import ragged_to_proto
from common.config import ServerConfig
from common.grpc_client import make_channel, wait_for_health_async
from common.grpc_server import GrpcServer, read_ports_file

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
REQUEST = reference_pb2.LogProbsRequest(tokens=ragged_to_proto([[1, 2, 3]]))


def _in_flight(metrics_port: int, service: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "aligner_rpc_in_flight":
            for sample in family.samples:
                if sample.labels["service"] == service:
                    return sample.value
    return 0.0


def test_run_goes_serving_after_ready_and_stops_on_request(tmp_path):
    async def scenario():
        sys.path.insert(0, str(HERE))
        from grpc_toys import ToyReference

        server = GrpcServer(ServerConfig(port=0, metrics_port=-1), f"toy-{uuid.uuid4().hex[:8]}")
        server.add_servicer(reference_pb2_grpc.add_ReferenceServicer_to_server, ToyReference())
        loaded = asyncio.Event()

        async def ready() -> None:  # stands in for model loading
            await loaded.wait()

        ports_file = tmp_path / "ports.json"
        task = asyncio.ensure_future(server.run(ready=ready, ports_file=ports_file, handle_signals=False))
        while not ports_file.exists():
            await asyncio.sleep(0.01)
        info = read_ports_file(ports_file)
        assert info["event"] == "serving" and info["port"] == server.port and info["metrics_port"] == -1
        async with make_channel(f"127.0.0.1:{info['port']}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert (await health.Check(health_pb2.HealthCheckRequest())).status == NOT_SERVING
            loaded.set()
            await wait_for_health_async(f"127.0.0.1:{info['port']}", timeout=5)
            server.request_stop()
            await asyncio.wait_for(task, 10)

    asyncio.run(scenario())


def test_reflection_can_be_turned_off():
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async def listed(reflection: bool) -> list[str] | grpc.StatusCode:
        sys.path.insert(0, str(HERE))
        from grpc_toys import ToyReference

        server = GrpcServer(ServerConfig(port=0, metrics_port=-1, reflection=reflection), f"toy-{uuid.uuid4().hex[:8]}")
        server.add_servicer(reference_pb2_grpc.add_ReferenceServicer_to_server, ToyReference())
        port = await server.start()
        try:
            async with make_channel(f"127.0.0.1:{port}") as channel:
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                request = reflection_pb2.ServerReflectionRequest(list_services="")
                try:
                    async for reply in stub.ServerReflectionInfo(iter([request]), timeout=5):
                        return [s.name for s in reply.list_services_response.service]
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
        finally:
            await server.stop(grace=0)

    assert "aligner.v1.Reference" in asyncio.run(listed(True))
    assert asyncio.run(listed(False)) == grpc.StatusCode.UNIMPLEMENTED


def test_failed_ready_stops_the_server_and_raises():
    async def scenario():
        server = GrpcServer(ServerConfig(port=0, metrics_port=-1), "toy-failing")

        async def ready() -> None:
            raise FileNotFoundError("no checkpoint")

        with pytest.raises(FileNotFoundError):
            await server.run(ready=ready, handle_signals=False)
        async with make_channel(f"127.0.0.1:{server.port}", wait_for_ready=False, retry=None) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(scenario())


def test_sigterm_drains_in_flight_call_and_exits_zero(tmp_path):
    ports_file = tmp_path / "ports.json"
    stderr = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "grpc_toy_server.py"), str(ports_file), "10"],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        while not ports_file.exists():
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "the server never wrote its ports file"
            time.sleep(0.05)
        info = read_ports_file(ports_file)
        target = f"127.0.0.1:{info['port']}"
        asyncio.run(_drain_scenario(proc, target, info["metrics_port"]))
        assert proc.wait(timeout=20) == 0, (tmp_path / "server.log").read_text()
        announced = [json.loads(line) for line in proc.stdout.read().splitlines() if line.startswith("{")]
        assert announced and announced[0]["port"] == info["port"]
        logged = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines()]
        assert any(line["event"] == "signal received: draining" for line in logged)
        assert all(line["service"] == "toy-subprocess" for line in logged)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()
        if proc.stdout:
            proc.stdout.close()


async def _drain_scenario(proc: subprocess.Popen, target: str, metrics_port: int) -> None:
    await wait_for_health_async(target, timeout=30)
    async with make_channel(target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == SERVING
        slow = asyncio.ensure_future(
            reference_pb2_grpc.ReferenceStub(channel).LogProbs(
                REQUEST, metadata=(("x-delay-s", "1.5"),), timeout=30
            )
        )
        started = time.monotonic()
        while _in_flight(metrics_port, "toy-subprocess") < 2:  # the watch and the slow call
            assert time.monotonic() - started < 10, "the slow call never reached the server"
            await asyncio.sleep(0.02)

        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # Health turns NOT_SERVING while the slow call is still running.
        assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
        assert not slow.done()
        watch.cancel()  # a watcher would otherwise hold the drain open until the grace period ends

        # New calls are refused (fresh connection, no waiting, no retries).
        async with make_channel(target, wait_for_ready=False, retry=None) as fresh:
            refused = None
            while refused is None and time.monotonic() - signalled < 5:
                try:
                    await reference_pb2_grpc.ReferenceStub(fresh).LogProbs(REQUEST, timeout=1)
                    await asyncio.sleep(0.02)  # accepted just before the listener closed
                except grpc.aio.AioRpcError as exc:
                    refused = exc
            assert refused is not None and refused.code() == grpc.StatusCode.UNAVAILABLE
        assert not slow.done()

        reply = await slow  # the in-flight call completes normally
        assert list(reply.logprobs.lengths) == [2]
    # The drain ends when the last call does, well before the 10 s grace period.
    while proc.poll() is None and time.monotonic() - signalled < 8:
        await asyncio.sleep(0.05)
    assert proc.poll() is not None, "the server did not exit after draining"
