"""The actor update on a tiny Megatron model: the rollout plumbing and one PPO epoch."""

import pytest
import torch

from common.config import ModelArchConfig, OptimConfig, SchedConfig
from common.errors import InvalidArgument
from trainer.model import build_model, sequence_logprobs
from trainer.optim import build_optimizer, build_scheduler
from trainer.parallel import init_parallel
from trainer.ppo.actor import actor_train
from trainer.ppo.rollout import Sample, compute_advantages, rollout_from_samples

ARCH = ModelArchConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2,
                       num_query_groups=1, vocab_size=64, encoder_seq_length=32)


@pytest.fixture(scope="module")
def model():
    init_parallel()
    return build_model(ARCH, seed=7)


def _samples(n=4):
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        prompt = torch.randint(1, 64, (3 + i % 2,), generator=gen).tolist()
        response = torch.randint(1, 64, (2 + i,), generator=gen).tolist()
        length = len(prompt) + len(response)
        out.append(Sample(index=i, prompt=prompt, response=response, is_end=i != 3, rm_score=float(i) - 1.5,
                          ref_logprobs=torch.randn(length - 1, generator=gen) - 3,
                          values=torch.randn(length - 1, generator=gen)))
    return out


def test_rollout_padding_and_selection():
    rollout = rollout_from_samples(_samples(), pad_id=0)
    # prompts of 3, 4, 3, 4 tokens; responses of 2, 3, 4, 5
    assert rollout.tokens.shape == (4, 9) and rollout.ref_logprobs.shape == (4, 8)
    assert rollout.response_ends.tolist() == [5, 7, 7, 9]
    assert rollout.prompt_lengths.tolist() == [3, 4, 3, 4]
    sub = rollout.select(slice(1, 3))
    assert len(sub) == 2 and sub.indices == [1, 2]
    assert torch.equal(sub.tokens, rollout.tokens[1:3])


def test_compute_advantages_uses_the_response_mask(model):
    rollout = rollout_from_samples(_samples(), pad_id=0)
    rollout.old_logprobs = torch.nn.utils.rnn.pad_sequence(
        sequence_logprobs(model, rollout.sequences(), 4), batch_first=True)
    stats = compute_advantages(rollout, kl_coef=0.1)
    assert set(stats) >= {"reward_mean", "kl", "response_length"}
    assert torch.all(rollout.advantages[rollout.mask == 0] == 0)
    masked = rollout.advantages[rollout.mask == 1]
    assert masked.mean().abs() < 1e-5 and (masked.var(unbiased=False) - 1).abs() < 1e-4
    assert stats["response_length"] == pytest.approx((2 + 3 + 4 + 5) / 4)


def test_actor_train_moves_logprobs_along_the_advantage(model):
    rollout = rollout_from_samples(_samples(), pad_id=0)
    rollout.old_logprobs = torch.nn.utils.rnn.pad_sequence(
        sequence_logprobs(model, rollout.sequences(), 4), batch_first=True)
    compute_advantages(rollout, kl_coef=0.0, normalize=False)
    optim = OptimConfig(lr=1e-2, weight_decay=0.0, sched=SchedConfig(name="Constant"))
    opt = build_optimizer(model, optim)
    metrics = actor_train(model, opt, build_scheduler(opt, optim, 1), rollout, global_batch_size=4,
                          micro_batch_size=2, ratio_eps=0.2, entropy_bonus=0.01, gradient_clip_val=1.0)
    assert {"policy_loss", "clip_fraction", "ratio_mean", "entropy", "grad_norm"} <= set(metrics)
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # first micro-batch: old == new
    new = torch.nn.utils.rnn.pad_sequence(sequence_logprobs(model, rollout.sequences(), 4), batch_first=True)
    gain = ((new - rollout.old_logprobs) * rollout.advantages * rollout.mask)[rollout.is_end].sum()
    assert gain > 0  # the update raised the likelihood of positive-advantage tokens


def test_batch_sizes_must_divide(model):
    rollout = rollout_from_samples(_samples(), pad_id=0)
    rollout.old_logprobs = rollout.ref_logprobs.clone()
    compute_advantages(rollout, kl_coef=0.0)
    opt = build_optimizer(model, OptimConfig())
    with pytest.raises(InvalidArgument, match="global_batch_size"):
        actor_train(model, opt, build_scheduler(opt, OptimConfig(), 1), rollout, global_batch_size=3,
                    micro_batch_size=2, ratio_eps=0.2, entropy_bonus=0.0, gradient_clip_val=1.0)


@pytest.mark.parametrize("offload", [False, True])
def test_offload_adam_states_moves_the_moments_to_the_cpu_after_the_pass(model, monkeypatch, offload):
    """model.ppo.offload_adam_states: moments to the parameters' device for the pass, then to the
    CPU (on a CPU-only machine both are the CPU, so the moves themselves are what is checked)."""
    from trainer import critic

    moves = []
    real = critic.move_optimizer_state
    monkeypatch.setattr(critic, "move_optimizer_state", lambda opt, dev: (moves.append(str(dev)), real(opt, dev)))
    rollout = rollout_from_samples(_samples(), pad_id=0)
    rollout.old_logprobs = torch.nn.utils.rnn.pad_sequence(
        sequence_logprobs(model, rollout.sequences(), 4), batch_first=True)
    compute_advantages(rollout, kl_coef=0.0, normalize=False)
    optim = OptimConfig(lr=1e-3, weight_decay=0.0, sched=SchedConfig(name="Constant"))
    opt = build_optimizer(model, optim)
    actor_train(model, opt, build_scheduler(opt, optim, 1), rollout, global_batch_size=4, micro_batch_size=2,
                ratio_eps=0.2, entropy_bonus=0.0, gradient_clip_val=1.0, offload_adam_states=offload)
    assert moves == ([str(model.device), "cpu"] if offload else [str(model.device)])
    assert critic.optimizer_state_devices(opt) == {torch.device("cpu") if offload else model.device}
