"""Tensor-parallel model servers under torchrun (CPU, gloo, 127.0.0.1) against the same server
with TP=1: a reference server's logprobs, a reward-critic server's rewards and values, a critic
Train's metrics and the values after it, and critic checkpoints saved at one TP size and loaded at
the other, all equal within 1e-5; bad TP sizes fail at startup naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from services.critic.client import CriticClient
from services.reward.client import RewardClient
from tests.services.conftest import ROOT, server_env

pytestmark = pytest.mark.integration
TOL = dict(atol=1e-5, rtol=1e-5)
ROWS = [[1, 5, 9, 2, 7, 30], [3, 4, 5], [200, 17, 8, 8, 1, 90, 4, 11]]
TRAINING = {
    "model.optim.lr": 1e-3,
    "model.optim.weight_decay": 0.0,
    "model.optim.sched.name": "Constant",
    "model.micro_batch_size": 3,
    "model.global_batch_size": 64,
}


def _sequences(n: int = 7, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (int(k),), generator=g) for k in torch.randint(8, 30, (n,), generator=g)]


SEQUENCES = _sequences()


def _rollout(old_values: list[torch.Tensor], seed: int):
    """A rollout of SEQUENCES as PPO sends it: mask on the response (after a 4-token prompt),
    returns in [-1, 1], the critic's values at scoring time as old values."""
    g = torch.Generator().manual_seed(seed)
    mask = [torch.tensor([0.0] * 3 + [1.0] * (len(s) - 4)) for s in SEQUENCES]
    returns = [torch.rand(len(s) - 1, generator=g) * 2 - 1 for s in SEQUENCES]
    return SEQUENCES, mask, returns, old_values


def _assert_rows_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert [len(g) for g in got] == [len(w) for w in want]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL)


def _assert_metrics_close(got: dict[str, float], want: dict[str, float]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), key


@pytest.mark.timeout(600)
def test_reference_tp2_matches_tp1(checkpoints, service_config, start_server):
    from services.reference.client import ReferenceClient

    config = service_config("reference", {"checkpoint_path": str(checkpoints.policy)})
    tp1 = start_server("reference", config, wait=False)
    tp2 = start_server("reference", config, nproc=2, wait=False)
    tp1.wait_serving()
    tp2.wait_serving(timeout=300)
    with ReferenceClient(tp1.target) as one, ReferenceClient(tp2.target) as two:
        _assert_rows_close(two.logprobs(ROWS), one.logprobs(ROWS))
    assert tp2.stop(timeout=60) == 0, tp2.log()[-3000:]  # rank 0 drains, then releases rank 1
    assert "tensor-parallel follower stopped" in tp2.log()


@pytest.fixture(scope="module")
def reward_critics(service_config, start_server, tmp_path_factory):
    """A reward-critic server with TP=1 and one with TP=2, same config (one checkpoint root),
    started together."""
    root = tmp_path_factory.mktemp("critic_checkpoints")
    config = service_config("reward-critic", {**TRAINING, "server.checkpoint_root": str(root)})
    tp1 = start_server("reward-critic", config, wait=False)
    tp2 = start_server("reward-critic", config, nproc=2, wait=False)
    tp1.wait_serving()
    tp2.wait_serving(timeout=300)
    return tp1, tp2


@pytest.mark.timeout(600)
def test_reward_critic_tp2_scores_trains_and_checkpoints_as_tp1(reward_critics):
    tp1, tp2 = reward_critics
    with RewardClient(tp1.target) as r1, RewardClient(tp2.target) as r2:
        one = r1.score(tokens=SEQUENCES, return_values=True)
        two = r2.score(tokens=SEQUENCES, return_values=True)
    torch.testing.assert_close(two.rewards, one.rewards, **TOL)
    _assert_rows_close(two.values, one.values)

    c1, c2 = CriticClient(tp1.target), CriticClient(tp2.target)
    # The same rollout trains both alike: loss, grad norm (over both shards), lr, and the values after.
    rollout = _rollout(one.values, seed=1)
    step1, m1 = c1.train(*rollout, chunk_size=3, rollout_id="a")
    step2, m2 = c2.train(*rollout, chunk_size=3, rollout_id="a")
    assert step1 == step2 == 1
    _assert_metrics_close(m2, m1)
    assert m1["grad_norm"] > 0
    trained = c1.values(SEQUENCES)
    assert not torch.allclose(torch.cat(trained), torch.cat(one.values), **TOL)  # training moved them
    _assert_rows_close(c2.values(SEQUENCES), trained)
    assert c2.train(*rollout, rollout_id="a") == (step2, m2)  # a retry is answered, not trained again
    _assert_rows_close(c2.values(SEQUENCES), trained)

    # Save at TP=2, load at TP=1: the weights, and the optimizer too (the next update agrees).
    second = _rollout(c2.values(SEQUENCES), seed=2)
    c2.train(*second, rollout_id="b")  # TP=2 moves ahead of TP=1
    ahead = c2.values(SEQUENCES)
    assert c2.save("from_tp2") == 2
    assert c1.load("from_tp2") == 2
    _assert_rows_close(c1.values(SEQUENCES), ahead)
    third = _rollout(ahead, seed=3)
    (_, m1), (_, m2) = c1.train(*third, rollout_id="c"), c2.train(*third, rollout_id="c")
    _assert_metrics_close(m2, m1)

    # And the other way: save at TP=1, load at TP=2.
    c1.train(*_rollout(c1.values(SEQUENCES), seed=4), rollout_id="d")  # TP=1 moves ahead
    ahead = c1.values(SEQUENCES)
    assert c1.save("from_tp1") == 4
    assert c2.load("from_tp1") == 4
    _assert_rows_close(c2.values(SEQUENCES), ahead)
    fifth = _rollout(ahead, seed=5)
    (_, m1), (_, m2) = c1.train(*fifth, rollout_id="e"), c2.train(*fifth, rollout_id="e")
    _assert_metrics_close(m2, m1)
    _assert_rows_close(c2.values(SEQUENCES), c1.values(SEQUENCES))
    # The rewards never moved (the reward model is not the critic, even when loaded from it).
    with RewardClient(tp2.target) as r2:
        torch.testing.assert_close(r2.score(tokens=SEQUENCES).rewards, one.rewards, **TOL)


@pytest.mark.timeout(120)
def test_tp_size_must_match_the_job_and_the_heads(checkpoints):
    base = [
        sys.executable,
        "-m",
        "services.cli",
        "serve",
        "reference",
        f"checkpoint_path={checkpoints.policy}",
    ]
    proc = subprocess.run([*base, "model.tensor_model_parallel_size=2"], cwd=ROOT, env=server_env(),
                          capture_output=True, text=True, timeout=100)  # fmt: skip
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "model.tensor_model_parallel_size" in line and "torchrun" in line
    env = dict(server_env(), WORLD_SIZE="3")  # 4 heads are not divisible by 3
    proc = subprocess.run([*base, "model.tensor_model_parallel_size=3"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=100)  # fmt: skip
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "model.tensor_model_parallel_size" in line and "num_attention_heads (4)" in line, line
