"""Tensor-parallel model servers under torchrun (CPU, gloo, 127.0.0.1) against the same server
with TP=1: a reference server's logprobs, a reward-critic server's rewards and values, a critic
Train's metrics and the values after it, and critic checkpoints saved at one TP size and loaded at
the other, all equal within 1e-5; a generation server's greedy and seeded tokens identical (logprobs
within 1e-5), before and after full-weight pushes from a TP=1 and a TP=2 actor, a shard-shaped push
refused naming the tensor, a cancelled generation stopping every rank; bad TP sizes and decode
paths fail at startup naming the key."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from services.critic.client import CriticClient
from services.reward.client import RewardClient
from tests.services.conftest import CRITIC_TRAINING as TRAINING
from tests.services.conftest import ROOT, random_sequences, server_env, torchrun_argv

pytestmark = pytest.mark.integration
TOL = dict(atol=1e-5, rtol=1e-5)
ROWS = [[1, 5, 9, 2, 7, 30], [3, 4, 5], [200, 17, 8, 8, 1, 90, 4, 11]]
SEQUENCES = random_sequences(7)


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


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------

PROMPTS = [[1, 5, 9, 2, 7, 30], [3, 4, 5], [200, 17, 8, 8, 1, 90, 4, 11, 6, 6, 2], [7]]
# A TP=2 actor (torchrun, gloo): its weights are the policy checkpoint's times `scale`, gathered
# to the full TP=1 layout (`trainer.hf.full_state_dict`, as the PPO actor pushes them); rank 0
# pushes them to every target as `version`.
TP2_ACTOR = """
import sys
import torch
from aligner.v1 import generation_pb2_grpc
from common.grpc_client import make_sync_channel
from services.generation.weights import chunk_state_dict
from trainer.checkpoint import load_model_for_inference
from trainer.hf import full_state_dict
from trainer.parallel import init_parallel

checkpoint, scale, version, *targets = sys.argv[1:]
init_parallel(2, seed=1)
model, _, _ = load_model_for_inference(checkpoint, value_head=False)
with torch.no_grad():
    for p in model.parameters():
        p.mul_(float(scale))
full = full_state_dict(model)
if torch.distributed.get_rank() == 0:
    for target in targets:
        stub = generation_pb2_grpc.GenerationStub(make_sync_channel(target))
        stub.UpdateWeights(chunk_state_dict(full, int(version), chunk_bytes=64 << 10), timeout=120)
"""


# Two ranks of a TP=2 torch engine (torchrun, gloo) as the generation server joins them: the
# leader cancels a generation from its `on_step` (as a closed stream does); every rank must stop
# at that step, so that the next generation runs in step and gives the uncancelled tokens.
TP2_CANCEL = """
import sys
from services.generation.server import ShardedEngine, join_group
from services.tensor_parallel import init
from trainer.checkpoint import load_model_for_inference
from trainer.engine import SamplingParams, TorchEngine

group = init(2, seed=1)
model, arch, _ = load_model_for_inference(sys.argv[1], value_head=False)
engine = TorchEngine(model, max_seq_len=arch.encoder_seq_length, decode="megatron")
join_group(engine, group)
if group.leader:
    sharded = ShardedEngine(engine, group)
    prompts = [[1, 5, 9, 2], [3, 4, 5, 6, 7, 8]]
    params = [SamplingParams(max_new_tokens=12, temperature=0.8, seed=s) for s in (1, 2)]
    expected = sharded.generate(prompts, params)

    def on_step(step, tokens):
        if step == 3:
            raise KeyError("stream closed")

    try:
        sharded.generate(prompts, params, on_step=on_step)
        raise SystemExit("the cancelled generation finished")
    except KeyError:
        pass
    again = sharded.generate(prompts, params)
    assert [r.tokens for r in again] == [r.tokens for r in expected], (again, expected)
    group.stop()
    print("leader done")
else:
    group.follow()
"""


def _generation_config(checkpoints):
    from common.config import GenerationServiceConfig

    config = GenerationServiceConfig(
        checkpoint_path=str(checkpoints.policy),
        decode="megatron",
        max_batch_size=16,
        max_queue_delay_us=20_000,
    )
    config.server.port = 0
    config.server.metrics_port = 0
    config.server.grace_seconds = 5.0
    return config


@pytest.fixture(scope="module")
def generations(checkpoints, start_server):
    """A generation server with TP=1 and one with TP=2 (same config, decode=megatron), and a
    client for each."""
    from services.generation.client import GenerationClient

    config = _generation_config(checkpoints)
    tp1 = start_server("generation", config, wait=False)
    tp2 = start_server("generation", config, nproc=2, wait=False)
    tp1.wait_serving()
    tp2.wait_serving(timeout=300)
    clients = [
        GenerationClient(f"127.0.0.1:{s.info['triton_grpc_port']}", control_url=s.target, timeout_s=120)
        for s in (tp1, tp2)
    ]
    for client in clients:
        client.wait_ready(120)
    yield tp1, tp2, *clients
    for client in clients:
        client.close()


def _assert_same_generation(got, want) -> None:
    assert [r.tokens for r in got] == [r.tokens for r in want]
    assert [r.ended for r in got] == [r.ended for r in want]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5, rtol=1e-5)


@pytest.mark.timeout(600)
def test_generation_tp2_samples_as_tp1(generations):
    _, _, one, two = generations
    assert two.info().vocab_size == one.info().vocab_size
    greedy = one.generate(PROMPTS, max_new_tokens=10, greedy=True)
    # An end id that prompt 0 reaches at its 4th token: rows finish at different steps, and
    # every rank must drop the same rows from the batch at the same step.
    end_id = greedy[0].tokens[3]
    greedy = one.generate(PROMPTS, max_new_tokens=10, greedy=True, end_id=end_id)
    assert greedy[0].ended and len(greedy[0].tokens) == 4
    _assert_same_generation(two.generate(PROMPTS, max_new_tokens=10, greedy=True, end_id=end_id), greedy)

    params = dict(max_new_tokens=9, temperature=0.9, top_k=40, top_p=0.95, min_new_tokens=2, end_id=end_id)
    seeds = [101, 202, 303, 404]
    sampled = one.generate(PROMPTS, seeds=seeds, **params)
    _assert_same_generation(two.generate(PROMPTS, seeds=seeds, **params), sampled)
    _assert_same_generation(two.generate(PROMPTS, seeds=seeds, stream=True, **params), sampled)
    assert [r.tokens for r in two.generate(PROMPTS, seeds=[s + 1 for s in seeds], **params)] != [
        r.tokens for r in sampled
    ]
    # Without seeds the leader draws them, once for all ranks; the ranks stay in step (a second
    # call still works).
    for _ in range(2):
        unseeded = two.generate(PROMPTS, max_new_tokens=6, temperature=1.0)
        assert [len(r.tokens) for r in unseeded] == [6] * len(PROMPTS)


@pytest.mark.timeout(600)
def test_generation_tp2_takes_full_weight_pushes_as_tp1(generations, checkpoints, tmp_path):
    from common.errors import InvalidArgument
    from trainer.checkpoint import load_model_for_inference
    from trainer.hf import full_state_dict, shard_state_dict

    tp1, tp2, one, two = generations
    before = one.generate(PROMPTS, max_new_tokens=8, greedy=True)
    start = max(one.info().policy_version, two.info().policy_version)

    # From a TP=1 actor (this process): its weights, perturbed.
    model, _, _ = load_model_for_inference(checkpoints.policy, value_head=False)
    g = torch.Generator().manual_seed(5)
    pushed = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in full_state_dict(model).items()}
    for client in (one, two):
        reply = client.push_weights(pushed, start + 1, chunk_bytes=64 << 10)
        assert (reply.policy_version, reply.num_tensors) == (start + 1, len(pushed))
    after = one.generate(PROMPTS, max_new_tokens=8, greedy=True, policy_version=start + 1)
    assert [r.tokens for r in after] != [r.tokens for r in before]
    _assert_same_generation(
        two.generate(PROMPTS, max_new_tokens=8, greedy=True, policy_version=start + 1), after
    )

    # From a TP=2 actor (torchrun): its gathered weights.
    script = tmp_path / "tp2_actor.py"
    script.write_text(TP2_ACTOR)
    argv = [
        *torchrun_argv(2, (str(script),)),
        str(checkpoints.policy),
        "1.1",
        str(start + 2),
        tp1.target,
        tp2.target,
    ]
    env = dict(server_env(), CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert one.info().policy_version == two.info().policy_version == start + 2
    scaled = one.generate(PROMPTS, max_new_tokens=8, greedy=True)
    assert [r.tokens for r in scaled] != [r.tokens for r in after]
    _assert_same_generation(two.generate(PROMPTS, max_new_tokens=8, greedy=True), scaled)

    # A rank's shard is not a push: refused naming the tensor, and nothing changes.
    shard = shard_state_dict(pushed, 0, 2)
    with pytest.raises(InvalidArgument) as err:
        two.push_weights(shard, start + 3)
    assert err.value.field == "shape" and "!= the model's" in err.value.problem, err.value
    name = err.value.problem.split("'")[1]
    assert tuple(shard[name].shape) != tuple(pushed[name].shape), err.value.problem
    assert two.info().policy_version == start + 2
    _assert_same_generation(two.generate(PROMPTS, max_new_tokens=8, greedy=True), scaled)


@pytest.mark.timeout(300)
def test_a_generation_cancelled_on_the_leader_stops_every_rank(checkpoints, tmp_path):
    script = tmp_path / "tp2_cancel.py"
    script.write_text(TP2_CANCEL)
    argv = [*torchrun_argv(2, (str(script),)), str(checkpoints.policy)]
    env = dict(server_env(), CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "leader done" in done.stdout
    assert "the leader rank cancelled this generation" in done.stdout + done.stderr  # rank 1's log


def test_generation_tp_needs_the_torch_engine_and_megatron_decode(checkpoints):
    """Refused before anything loads, in one line naming the key (fused decode runs TP=1 only)."""
    argv = [sys.executable, "-m", "services.cli", "serve", "generation", f"checkpoint_path={checkpoints.policy}",
            "model.tensor_model_parallel_size=2"]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, env=server_env(), capture_output=True, text=True, timeout=100)
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert "config key 'decode'" in line and "decode=megatron" in line, line
    done = subprocess.run([*argv, "decode=megatron"], cwd=ROOT, env=server_env(), capture_output=True, text=True,
                          timeout=100)  # fmt: skip
    assert done.returncode == 2  # not under torchrun
    assert "model.tensor_model_parallel_size" in done.stderr.strip().splitlines()[-1]


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
