"""Replica sets (common/replicas.py): spreading, failover without losing or repeating a call,
probes that bring a replica back, re-resolution, and bad addresses. The clients here are plain
objects that record their calls: the policy is what is under test; the e2e tests run it over
real services."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from common.config import Endpoint
from common.errors import InvalidArgument, Unavailable
from common.replicas import ReplicaSet, ServiceDown, ServiceError, expand, resolve_host, split_address
from services.orchestrator.clients import generation_pairs, single


class Client:
    def __init__(self, address: str):
        self.address, self.calls, self.closed, self.up = address, [], False, True

    def work(self, item):
        if not self.up:
            raise Unavailable(f"{self.address} is down")
        self.calls.append(item)
        return (self.address, item)

    def close(self):
        self.closed = True


class Down(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "connection refused"


def make(addresses, **settings) -> tuple[ReplicaSet, dict[str, Client]]:
    clients: dict[str, Client] = {}

    def connect(address):
        clients[address] = Client(address)
        return clients[address]

    settings = {"retry_max_wait_s": 1.0, "probe_interval_s": 0.05, **settings}
    replica_set = ReplicaSet(
        "svc", resolve=lambda: list(addresses), connect=connect, probe=lambda r: r.client.up, **settings
    )
    return replica_set, clients


def test_concurrent_calls_spread_over_the_replicas():
    replicas, clients = make(["a:1", "b:1"])
    release, started = threading.Event(), threading.Barrier(3)

    def slow(replica):
        started.wait()
        release.wait(5)
        return replica.address

    results = []
    threads = [threading.Thread(target=lambda: results.append(replicas.call("x", slow))) for _ in range(2)]
    for t in threads:
        t.start()
    started.wait()  # both calls in flight at once
    release.set()
    for t in threads:
        t.join()
    assert sorted(results) == ["a:1", "b:1"]  # least outstanding: one each
    # Sequential calls alternate too (least recently used on a tie).
    assert {replicas.call("x", lambda r: r.address) for _ in range(2)} == {"a:1", "b:1"}


def test_a_failed_call_moves_to_another_replica_once():
    replicas, clients = make(["a:1", "b:1"])
    clients["a:1"].up = False
    answers = [replicas.call("work", lambda r, i=i: r.client.work(i)) for i in range(4)]
    assert [address for address, _ in answers] == ["b:1"] * 4
    assert clients["b:1"].calls == [0, 1, 2, 3]  # every call answered exactly once
    assert clients["a:1"].calls == []
    assert not replicas.replicas()[0].healthy and "is down" in replicas.replicas()[0].last_error


def test_grpc_unavailable_fails_over_and_other_errors_do_not():
    replicas, _ = make(["a:1", "b:1"])
    seen = []

    def refuse_on_a(replica):
        seen.append(replica.address)
        if replica.address == "a:1":
            raise Down()
        return "ok"

    assert replicas.call("x", refuse_on_a) == "ok" and seen[-1] == "b:1"

    class Refused(Down):
        def code(self):
            return grpc.StatusCode.PERMISSION_DENIED

    def refuse(replica):
        raise Refused()

    with pytest.raises(ServiceError, match=r"^svc at b:1: x failed: PERMISSION_DENIED: connection refused$"):
        replicas.call("x", refuse)

    def invalid(replica):
        raise InvalidArgument("tokens", "is empty")

    with pytest.raises(InvalidArgument, match="tokens"):
        replicas.call("x", invalid)
    assert [r.healthy for r in replicas.replicas()] == [False, True]  # a bad request is not a down replica


def test_all_replicas_down_ends_in_service_down_naming_the_service():
    replicas, clients = make(["a:1", "b:1"], retry_max_wait_s=0.3)
    for client in clients.values():
        client.up = False
    started = time.monotonic()
    with pytest.raises(ServiceDown, match=r"^svc: no replica answered .*is down") as info:
        replicas.call("work", lambda r: r.client.work(1))
    assert info.value.service == "svc"
    assert 0.3 <= time.monotonic() - started < 5


def test_a_replica_that_comes_back_is_used_again_after_its_probe():
    replicas, clients = make(["a:1", "b:1"])
    clients["a:1"].up = False
    replicas.call("work", lambda r: r.client.work(0))  # tries a, marks it down, answers on b
    clients["a:1"].up = True
    time.sleep(0.1)  # past the probe interval
    used = {replicas.call("work", lambda r, i=i: r.client.work(i))[0] for i in range(1, 5)}
    assert used == {"a:1", "b:1"}


def test_calls_wait_for_a_replica_to_come_back_within_the_budget():
    replicas, clients = make(["a:1"], retry_max_wait_s=5.0)
    clients["a:1"].up = False
    threading.Timer(0.3, lambda: setattr(clients["a:1"], "up", True)).start()
    assert replicas.call("work", lambda r: r.client.work(7)) == ("a:1", 7)
    assert clients["a:1"].calls == [7]


def test_re_resolution_adds_new_pods_and_closes_vanished_ones():
    addresses = ["a:1", "b:1"]
    replicas, clients = make(addresses, resolve_interval_s=0.05)
    addresses[:] = ["b:1", "c:1"]
    time.sleep(0.1)
    assert [r.address for r in replicas.replicas()] == ["b:1", "c:1"]
    assert clients["a:1"].closed and not clients["b:1"].closed
    replicas.close()
    assert clients["b:1"].closed and clients["c:1"].closed


def test_a_failed_re_resolution_keeps_the_known_replicas():
    answers = [["a:1"]]

    def resolve():
        if len(answers) > 1:  # e.g. the critic's name now resolves to two pods: refused
            raise InvalidArgument("remote_critic_rm.critic", "resolves to 2 addresses")
        return answers[0]

    replicas = ReplicaSet("critic", resolve=resolve, connect=Client, resolve_interval_s=0.05)
    answers.append(["a:1", "b:1"])
    time.sleep(0.1)
    assert [r.address for r in replicas.replicas()] == ["a:1"]


def test_call_each_reaches_every_healthy_replica():
    replicas, clients = make(["a:1", "b:1", "c:1"])
    clients["c:1"].up = False
    assert replicas.call_each("push", lambda r: r.client.work("v1")) == {"a:1": ("a:1", "v1"), "b:1": ("b:1", "v1")}
    assert not replicas.replicas()[2].healthy  # it will be probed (and resynced) before use


def test_wait_ready_names_each_replica_and_why():
    replicas, clients = make(["a:1"])
    clients["a:1"].up = False
    with pytest.raises(ServiceDown, match=r"svc: no replica ready within 0.2s \(a:1: probe failed\)"):
        replicas.wait_ready(0.2)


def test_bad_addresses_fail_at_startup_naming_the_key():
    for bad in ("nohostport", "host:", ":80", "host:99999", "host:http"):
        with pytest.raises(InvalidArgument, match=r"^remote\.reference: .* is not host:port"):
            split_address(bad, "remote.reference")
    assert split_address("[::1]:5557", "k") == ("::1", 5557)
    with pytest.raises(InvalidArgument, match=r"^remote\.reference: 'no-such-pod\.invalid' does not resolve"):
        resolve_host("no-such-pod.invalid", "remote.reference")
    assert resolve_host("127.0.0.1", "k") == ["127.0.0.1"]
    assert expand(["127.0.0.1:1", "127.0.0.1:1", "127.0.0.1:2"], "k") == ["127.0.0.1:1", "127.0.0.1:2"]
    with pytest.raises(InvalidArgument, match="^svc: the replica list is empty"):
        ReplicaSet("svc", resolve=lambda: [], connect=Client)


def test_generation_replicas_pair_each_pods_two_endpoints():
    one_name = generation_pairs(Endpoint(ip="127.0.0.1", port=8001), Endpoint(ip="127.0.0.1", port=5558))
    assert one_name == ["127.0.0.1:8001+127.0.0.1:5558"]
    listed = generation_pairs(
        Endpoint(ip="x", port=1, replicas=["127.0.0.1:8001", "127.0.0.2:8001"]),
        Endpoint(ip="x", port=1, replicas=["127.0.0.1:5558", "127.0.0.2:5558"]),
    )
    assert listed == ["127.0.0.1:8001+127.0.0.1:5558", "127.0.0.2:8001+127.0.0.2:5558"]
    with pytest.raises(InvalidArgument, match=r"^remote\.generation_control\.replicas: has 1 entries for 2"):
        generation_pairs(Endpoint(port=1, replicas=["127.0.0.1:1", "127.0.0.2:1"]), Endpoint(port=2, replicas=["127.0.0.1:2"]))
    with pytest.raises(InvalidArgument, match=r"^remote\.generation\.replicas\[0\]: .* is not host:port"):
        generation_pairs(Endpoint(port=1, replicas=["nope"]), Endpoint(port=2, replicas=["127.0.0.1:2"]))


def test_the_critic_takes_exactly_one_address():
    assert single(Endpoint(ip="127.0.0.1", port=5556), "remote_critic_rm.critic") == ["127.0.0.1:5556"]
    with pytest.raises(InvalidArgument, match=r"^remote_critic_rm\.critic: resolves to 2 addresses .*single-writer"):
        single(Endpoint(port=5556, replicas=["127.0.0.1:5556", "127.0.0.2:5556"]), "remote_critic_rm.critic")
