"""`aligner serve ppo-critic` (NeMo-Aligner's serve_ppo_critic.py) and the server keys NeMo users
pass: which server trainer.ppo.combine_rm_and_critic_server picks, trainer.devices x
trainer.num_nodes against the job's processes, and the critic's training metrics under
exp_manager.explicit_log_dir. The tutorial's own critic lines run in tests/e2e/test_tutorial.py."""

from __future__ import annotations

import json

import grpc
import pytest
import torch
from aligner.v1 import reward_pb2, reward_pb2_grpc

from common.codec import ragged_to_proto
from common.config import ModelServiceConfig, load_config
from common.errors import InvalidArgument
from common.grpc_client import make_sync_channel
from services import model_server
from services.critic.client import CriticClient


def _config(*overrides: str) -> ModelServiceConfig:
    return load_config(ModelServiceConfig, None, ["checkpoint_path=/rm", *overrides])


@pytest.mark.parametrize(
    "service, combine, problem",
    [
        ("critic", True, "use `aligner serve reward-critic`"),
        ("reward-critic", False, "use `aligner serve critic`"),
        ("reward", True, "is for the critic servers"),
        ("reference", False, "is for the critic servers"),
    ],
)
def test_combine_key_must_match_the_server(service, combine, problem):
    config = _config(f"trainer.ppo.combine_rm_and_critic_server={combine}")
    with pytest.raises(InvalidArgument, match=f"^trainer.ppo.combine_rm_and_critic_server: .*{problem}"):
        model_server.check_service_keys(service, config)
    model_server.check_service_keys(service, _config())  # unset: every server accepts it


def test_devices_against_the_job(caplog):
    model_server.check_devices(_config(), world=4)  # unset: the job's own size
    model_server.check_devices(_config("trainer.devices=2"), world=2)  # a TP=2 job on 2 devices
    with pytest.raises(
        InvalidArgument, match=r"^trainer.devices: .* = 3 is not a multiple of this server's 2"
    ):
        model_server.check_devices(_config("trainer.devices=3"), world=2)
    with pytest.raises(InvalidArgument, match="must be >= 1"):
        model_server.check_devices(_config("trainer.num_nodes=0"), world=1)
    # More devices than the job's ranks: one copy here, the rest are replicas; said, not ignored.
    with caplog.at_level("WARNING", logger="aligner.config"):
        model_server.check_devices(_config("trainer.devices=8", "trainer.num_nodes=1"), world=1)
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("notice: trainer.devices=8: trainer.num_nodes x trainer.devices = 1 x 8, but")
    assert "run the other 7 copies as replicas" in message


def test_exp_manager_needs_a_critic_and_a_directory(tmp_path):
    assert model_server.ExperimentLog.check("reward-critic", _config()) is None  # nothing asked
    assert model_server.ExperimentLog.check("critic", _config(f"exp_manager.explicit_log_dir={tmp_path}"))
    assert (
        model_server.ExperimentLog.check("reference", _config(f"exp_manager.explicit_log_dir={tmp_path}"))
        is None
    )
    with pytest.raises(InvalidArgument, match="^exp_manager.explicit_log_dir: must be set"):
        model_server.ExperimentLog.check("critic", _config("exp_manager.create_wandb_logger=true"))


@pytest.mark.integration
def test_ppo_critic_without_the_reward_model(start_server, service_config):
    """combine_rm_and_critic_server=false: the critic alone (no Reward service on the port)."""
    server = start_server(
        "ppo-critic", service_config("ppo-critic"), ["++trainer.ppo.combine_rm_and_critic_server=False"]
    )
    sequences = [torch.arange(3, 12), torch.arange(5, 9)]
    values = CriticClient(server.target).values(sequences)
    assert [len(v) for v in values] == [8, 3]
    stub = reward_pb2_grpc.RewardStub(make_sync_channel(server.target))
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(reward_pb2.ScoreRequest(tokens=ragged_to_proto(sequences)))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert json.loads(server.ports_file.read_text())["port"] > 0


def test_critic_training_metrics_reach_the_log_dir(tmp_path):
    """Each CriticTrainer.train pass of the process lands in critic.jsonl and TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from common.config import CriticModelConfig, ModelArchConfig
    from trainer import parallel
    from trainer.critic import CriticTrainer, _train_listeners, pad_rollout
    from trainer.model import build_model

    parallel.init_parallel(seed=3)
    arch = ModelArchConfig(
        num_layers=1, hidden_size=32, ffn_hidden_size=64, vocab_size=64, encoder_seq_length=16
    )
    trainer = CriticTrainer(
        build_model(arch, value_head=True, seed=3), CriticModelConfig(), gradient_clip_val=1.0, max_steps=10
    )
    tokens = [torch.arange(2, 10), torch.arange(3, 8)]
    batch = pad_rollout(tokens, [torch.ones(len(t) - 1) for t in tokens], [torch.zeros(len(t) - 1) for t in tokens],
                        [torch.zeros(len(t) - 1) for t in tokens])  # fmt: skip
    experiment = model_server.ExperimentLog.check(
        "reward-critic", _config(f"exp_manager.explicit_log_dir={tmp_path}")
    )
    experiment.start()
    try:
        results = [trainer.train(batch), trainer.train(batch)]
    finally:
        experiment.close()
    assert experiment.record not in _train_listeners  # closed: later passes are not logged
    records = [json.loads(line) for line in (tmp_path / "critic.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert [r["value_loss"] for r in records] == pytest.approx([r["value_loss"] for r in results])
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("critic/value_loss")] == [1, 2]
