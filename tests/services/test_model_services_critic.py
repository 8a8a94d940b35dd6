"""The critic servers as real subprocesses: `aligner serve critic` and `aligner serve
reward-critic` (models resident, and with `swap_models_to_cpu`). Values equal the in-process
critic, combined Score(return_values) equals Score + Values, Train lowers the value loss, Save/Load
restores exact weights and optimizer state, swapping changes no result, malformed rollouts are
INVALID_ARGUMENT naming the field; every server exits 0 on SIGTERM (checked at module end).
Exactly-once training, Info, all-or-nothing Load and the checkpoint root: test_critic_state.py."""

from __future__ import annotations

import uuid

import grpc
import pytest
import torch
from aligner.v1 import critic_pb2, critic_pb2_grpc, reward_pb2, reward_pb2_grpc, tensor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from omegaconf import OmegaConf

from common.codec import ragged_from_proto, ragged_to_proto, tensor_from_proto
from common.grpc_client import make_sync_channel
from services.critic.client import CriticClient
from tests.services.conftest import CRITIC_TRAINING as TRAINING
from tests.services.conftest import random_sequences

pytestmark = pytest.mark.integration

TOL = dict(atol=1e-5, rtol=1e-5)
SEQUENCES = random_sequences(8)
PROMPT = 4


def _rollout(old_values: list[torch.Tensor]):
    """mask on the response (after a 4-token prompt), fixed returns in [-1, 1]."""
    g = torch.Generator().manual_seed(1)
    mask = [torch.tensor([0.0] * (PROMPT - 1) + [1.0] * (len(s) - PROMPT)) for s in SEQUENCES]
    returns = [torch.rand(len(s) - 1, generator=g) * 2 - 1 for s in SEQUENCES]
    return SEQUENCES, mask, returns, old_values


def _rollout_id() -> str:
    return uuid.uuid4().hex


def _score(target: str, return_values: bool):
    stub = reward_pb2_grpc.RewardStub(make_sync_channel(target))
    reply = stub.Score(
        reward_pb2.ScoreRequest(tokens=ragged_to_proto(SEQUENCES), return_values=return_values)
    )
    rewards = tensor_from_proto(reply.rewards, "rewards")
    values = ragged_from_proto(reply.values, "values").rows() if reply.HasField("values") else None
    return rewards, values


@pytest.fixture(scope="module")
def servers(start_server, service_config, checkpoints, tmp_path_factory):
    """critic, reward-critic and reward-critic with swapping, started together; `baseline` holds
    what each answered before any training."""
    critic = start_server("critic", service_config("critic", {
        "critic_checkpoint_path": str(checkpoints.reward), **TRAINING,
        "server.checkpoint_root": str(tmp_path_factory.getbasetemp()),  # the tests' tmp_path dirs
    }), wait=False)  # fmt: skip
    combined = start_server("reward-critic", service_config("reward-critic", TRAINING), wait=False)
    swapped = start_server("reward-critic", service_config("reward-critic", {
        **TRAINING, "trainer.ppo.swap_models_to_cpu": True, "model.offload_adam_states": True,
    }), wait=False)  # fmt: skip
    for server in (critic, combined, swapped):
        server.wait_serving()
    baseline = {
        "critic_values": CriticClient(critic.target).values(SEQUENCES),
        "combined": _score(combined.target, return_values=True),
        "combined_values": CriticClient(combined.target).values(SEQUENCES),
        "combined_rewards": _score(combined.target, return_values=False)[0],
        "swapped": _score(swapped.target, return_values=True),
    }
    return {"critic": critic, "combined": combined, "swapped": swapped, "baseline": baseline}


@pytest.fixture(scope="module")
def local(checkpoints):
    from trainer.checkpoint import load_model_for_inference

    model, _, _ = load_model_for_inference(checkpoints.reward)
    return model


def test_health_and_reflection_of_the_combined_server(servers):
    from services.reward.client import RewardClient  # noqa: F401 - the public client imports cleanly

    target = servers["combined"].target
    health = health_pb2_grpc.HealthStub(make_sync_channel(target))
    for service in ("", "aligner.v1.Reward", "aligner.v1.Critic"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(make_sync_channel(target))
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"aligner.v1.Reward", "aligner.v1.Critic", "grpc.health.v1.Health"} <= names


def test_values_equal_the_in_process_critic(servers, local):
    from trainer.model import sequence_rewards, sequence_values

    expected = sequence_values(local, SEQUENCES, 4)  # the critic starts as the reward model
    for got in (servers["baseline"]["critic_values"], servers["baseline"]["combined_values"]):
        assert [len(v) for v in got] == [len(s) - 1 for s in SEQUENCES]
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, **TOL)
    torch.testing.assert_close(
        servers["baseline"]["combined_rewards"], sequence_rewards(local, SEQUENCES, 4), **TOL
    )


def test_combined_score_equals_separate_score_and_values(servers):
    rewards, values = servers["baseline"]["combined"]
    torch.testing.assert_close(rewards, servers["baseline"]["combined_rewards"], atol=0, rtol=0)
    for got, want in zip(values, servers["baseline"]["combined_values"], strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_training_lowers_the_value_loss(servers):
    server = servers["critic"]
    client = CriticClient(server.target)
    steps, losses = [], []
    for _ in range(5):
        # As in PPO, old values are the critic's values when the rollout was scored; the clip
        # keeps each update within loss_clip_val of them.
        rollout = _rollout(client.values(SEQUENCES))
        step, result, replayed = client.train_rollout(*rollout, chunk_size=3, rollout_id=_rollout_id())  # 3 msgs
        steps.append(step)
        losses.append(result["value_loss"])
        assert result["num_sequences"] == len(SEQUENCES) and result["optimizer_steps"] == 1 and not replayed
    assert steps == sorted(steps) and steps[-1] - steps[0] == 4
    assert losses[-1] < 0.7 * losses[0], losses
    assert "aligner_critic_train_steps_total" in server.metrics()
    info = client.info()
    assert info.step == steps[-1] and info.initial and info.checkpoint_path == str(server_checkpoint(server))
    # One incarnation per process: the same on every call, another in another server process.
    assert client.info().incarnation == info.incarnation
    assert CriticClient(servers["combined"].target).info().incarnation not in ("", info.incarnation)


def server_checkpoint(server) -> str:
    return OmegaConf.load(server.config_path).critic_checkpoint_path


def test_save_and_load_restore_weights_and_optimizer_exactly(servers, tmp_path):
    client = CriticClient(servers["critic"].target)
    rollout = _rollout(client.values(SEQUENCES))
    client.train(*rollout, rollout_id=_rollout_id())  # some optimizer state to save
    path = tmp_path / "critic_ckpt"
    saved_step = client.save(path)
    assert (path / "meta.json").is_file() and [p.name for p in tmp_path.iterdir()] == ["critic_ckpt"]
    at_save = client.values(SEQUENCES)
    step_after, metrics_after = client.train(*rollout, rollout_id="after-save")
    trained = client.values(SEQUENCES)
    assert step_after == saved_step + 1
    assert not torch.equal(torch.cat(trained), torch.cat(at_save))

    assert client.load(path) == saved_step
    for got, want in zip(client.values(SEQUENCES), at_save, strict=True):
        assert torch.equal(got, want)
    # Same weights, Adam moments, schedule and step: the next update is the same, bit for bit
    # (and "after-save" is news to the loaded critic: it was applied after the checkpoint).
    step_again, metrics_again, replayed = client.train_rollout(*rollout, rollout_id="after-save")
    assert not replayed
    assert step_again == step_after and metrics_again == metrics_after
    for got, want in zip(client.values(SEQUENCES), trained, strict=True):
        assert torch.equal(got, want)


def test_load_initial_resets_weights_optimizer_and_step(servers):
    client = CriticClient(servers["critic"].target)
    initial = servers["baseline"]["critic_values"]
    client.train(*_rollout(client.values(SEQUENCES)), rollout_id=_rollout_id())  # away from the initial critic
    assert client.reset() == 0
    for got, want in zip(client.values(SEQUENCES), initial, strict=True):
        assert torch.equal(got, want)
    first_step, _ = client.train(*_rollout(initial), rollout_id=_rollout_id())
    assert first_step == 1  # a fresh optimizer: the step count starts again
    with pytest.raises(grpc.RpcError) as err:
        client._stub.Load(critic_pb2.LoadRequest(path="/x", initial=True))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "path" in err.value.details()


def test_swapping_models_to_cpu_changes_no_result(servers):
    rewards, values = servers["baseline"]["combined"]
    swapped_rewards, swapped_values = servers["baseline"]["swapped"]
    torch.testing.assert_close(swapped_rewards, rewards, atol=0, rtol=0)
    for got, want in zip(swapped_values, values, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    # Training through the swap (and with Adam states offloaded) matches the resident server.
    combined, swapped = CriticClient(servers["combined"].target), CriticClient(servers["swapped"].target)
    rollout = _rollout(values)
    for _ in range(2):
        _, a = combined.train(*rollout, rollout_id=_rollout_id())
        _, b = swapped.train(*rollout, rollout_id=_rollout_id())
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
    for got, want in zip(swapped.values(SEQUENCES), combined.values(SEQUENCES), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert _score(servers["swapped"].target, True)[0].shape == (len(SEQUENCES),)


def _train_request(tokens, mask, returns, old_values) -> critic_pb2.TrainRequest:
    return critic_pb2.TrainRequest(
        tokens=tokens, mask=mask, returns=returns, old_values=old_values, rollout_id=_rollout_id()
    )


def test_malformed_training_data_is_invalid_argument(servers):
    stub = critic_pb2_grpc.CriticStub(make_sync_channel(servers["critic"].target, retry=None))
    seqs, mask, returns, old = _rollout([torch.zeros(len(s) - 1) for s in SEQUENCES])
    good = dict(
        tokens=ragged_to_proto(seqs), mask=ragged_to_proto(mask, dtype=torch.float32),
        returns=ragged_to_proto(returns, dtype=torch.float32), old_values=ragged_to_proto(old, dtype=torch.float32),
    )  # fmt: skip
    cases = {
        "mask.lengths": {"mask": ragged_to_proto([m[:-1] for m in mask], dtype=torch.float32)},
        "returns.lengths": {"returns": ragged_to_proto(returns[:-1], dtype=torch.float32)},
        "returns.values.dtype": {"returns": ragged_to_proto([r.long() for r in returns], dtype=torch.int64)},
        "old_values.values.data": {
            "old_values": tensor_pb2.RaggedTensor(
                values=tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[3], data=b"\0" * 4),
                lengths=[3],
            )
        },
        "tokens.values": {"tokens": ragged_to_proto([torch.full((len(s),), 320) for s in seqs])},
        "mask": {"mask": ragged_to_proto([m * 2 for m in mask], dtype=torch.float32)},
    }
    for field, change in cases.items():
        with pytest.raises(grpc.RpcError) as err:
            stub.Train(iter([_train_request(**{**good, **change})]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value.details())
        assert err.value.details().startswith(f"{field}:"), err.value.details()

    # A bad second message is named as such; an empty stream has no rows.
    bad_second = _train_request(**{**good, "returns": ragged_to_proto(returns[:-1], dtype=torch.float32)})
    bad_second.rollout_id = ""  # later messages may leave it empty
    with pytest.raises(grpc.RpcError) as err:
        stub.Train(iter([_train_request(**good), bad_second]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "stream message 1" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Train(iter([]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("tokens:")

    with pytest.raises(grpc.RpcError) as err:
        stub.Save(critic_pb2.SaveRequest(path=""))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("path:")
    with pytest.raises(grpc.RpcError) as err:
        stub.Load(critic_pb2.LoadRequest(path="nonexistent/critic"))  # inside the checkpoint root
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        stub.Values(critic_pb2.ValuesRequest(tokens=ragged_to_proto([[1] * 49])))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(
        "tokens.lengths:"
    )
