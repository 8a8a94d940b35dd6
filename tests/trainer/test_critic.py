"""The critic training step (trainer/critic.py): the loss it reports is the clipped value loss of
the values the model computes, training lowers it, micro-batching does not change the update,
mini-batches give optimizer steps, Adam state offloads, and a state round trip resumes exactly."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from common.config import CriticModelConfig, ModelArchConfig, OptimConfig, SchedConfig
from common.errors import InvalidArgument

ARCH = ModelArchConfig(
    num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
    vocab_size=256, encoder_seq_length=64,
)  # fmt: skip
CONFIG = CriticModelConfig(
    micro_batch_size=2,
    global_batch_size=64,
    loss_clip_val=0.2,
    optim=OptimConfig(lr=1e-3, weight_decay=0.0, sched=SchedConfig(name="Constant")),
)


@pytest.fixture(scope="module")
def tools():
    from trainer import critic, model, parallel

    parallel.init_parallel(seed=1234)
    return model, critic


def _model(tools, seed=7):
    model, _ = tools
    return model.build_model(ARCH, value_head=True, seed=seed)


def _trainer(tools, config=CONFIG, seed=7, clip=1.0):
    _, critic = tools
    return critic.CriticTrainer(_model(tools, seed), config, gradient_clip_val=clip, max_steps=100)


def _rollout(tools, lengths=(9, 5, 12, 7), seed=0):
    """Ragged rows: prompt of 3 tokens, the rest response (mask 1), random returns."""
    _, critic = tools
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randint(3, ARCH.vocab_size, (n,), generator=g) for n in lengths]
    mask = [torch.tensor([0.0] * 2 + [1.0] * (n - 3)) for n in lengths]
    returns = [torch.randn(n - 1, generator=g) for n in lengths]
    old_values = [torch.randn(n - 1, generator=g) * 0.1 for n in lengths]
    return critic.pad_rollout(tokens, mask, returns, old_values), (tokens, mask, returns, old_values)


def test_reported_loss_is_the_value_loss_of_the_model_values(tools):
    model_mod, _ = tools
    from trainer.ppo.losses import value_loss

    trainer = _trainer(tools)
    batch, (tokens, *_rest) = _rollout(tools)
    values = model_mod.sequence_values(trainer.model, tokens, micro_batch_size=4)
    padded = torch.zeros_like(batch.returns)
    for i, v in enumerate(values):
        padded[i, : len(v)] = v
    expected, _ = value_loss(padded, batch.old_values, batch.returns, batch.mask, clip=0.2)
    metrics = trainer.train(batch)
    assert metrics["value_loss"] == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    assert metrics["num_sequences"] == 4 and metrics["num_tokens"] == float(batch.mask.sum())
    assert metrics["optimizer_steps"] == 1 and trainer.step == 1
    assert metrics["grad_norm"] > 0 and metrics["lr"] == pytest.approx(1e-3)


def test_training_lowers_the_value_loss(tools):
    trainer = _trainer(tools, dataclasses.replace(CONFIG, loss_clip_val=0.0))
    batch, _ = _rollout(tools, seed=1)
    losses = [trainer.train(batch)["value_loss"] for _ in range(8)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_micro_batch_size_does_not_change_the_update(tools):
    batch, _ = _rollout(tools, seed=2)
    one = _trainer(tools, dataclasses.replace(CONFIG, micro_batch_size=1))
    four = _trainer(tools, dataclasses.replace(CONFIG, micro_batch_size=4))
    m1, m4 = one.train(batch), four.train(batch)
    assert m1["value_loss"] == pytest.approx(m4["value_loss"], rel=1e-5)
    assert m1["grad_norm"] == pytest.approx(m4["grad_norm"], rel=1e-4)
    for (name, p1), p4 in zip(one.model.named_parameters(), four.model.parameters(), strict=True):
        torch.testing.assert_close(p1, p4, atol=1e-5, rtol=1e-4, msg=name)


def test_global_batch_size_sets_the_optimizer_steps(tools):
    trainer = _trainer(tools, dataclasses.replace(CONFIG, global_batch_size=3))
    batch, _ = _rollout(tools, lengths=(6, 7, 8, 9, 10, 11, 5), seed=3)
    metrics = trainer.train(batch)
    assert metrics["optimizer_steps"] == 3  # 3 + 3 + 1 sequences
    assert trainer.step == 3
    assert trainer.train(batch)["optimizer_steps"] == 3 and trainer.step == 6


def test_offloaded_adam_states_live_on_the_cpu_between_calls(tools):
    _, critic = tools
    trainer = _trainer(tools, dataclasses.replace(CONFIG, offload_adam_states=True))
    batch, _ = _rollout(tools, seed=4)
    trainer.train(batch)
    assert critic.optimizer_state_devices(trainer.optimizer) == {torch.device("cpu")}
    assert len(trainer.optimizer.state) > 0
    trainer.train(batch)  # moments come back to the parameters' device for the update
    assert trainer.step == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_offload_moves_adam_states_off_the_gpu(tools):
    _, critic = tools
    trainer = _trainer(tools, dataclasses.replace(CONFIG, offload_adam_states=True))
    batch, _ = _rollout(tools, seed=4)
    trainer.train(batch)
    assert critic.optimizer_state_devices(trainer.optimizer) == {torch.device("cpu")}
    critic.move_optimizer_state(trainer.optimizer, trainer.model.device)
    assert critic.optimizer_state_devices(trainer.optimizer) == {trainer.model.device}


def test_state_round_trip_resumes_exactly(tools):
    batch, _ = _rollout(tools, seed=5)
    first = _trainer(tools)
    first.train(batch)
    first.train(batch)
    weights = {k: v.clone() for k, v in first.model.state_dict().items() if torch.is_tensor(v)}
    # A deep copy, as a disk round trip gives: torch's load_state_dict keeps the tensors it is
    # given when device and dtype match, so a shared state would alias the two optimizers.
    state = copy.deepcopy(first.state_dict())

    second = _trainer(tools, seed=99)  # different initial weights, fresh optimizer
    second.model.load_state_dict(weights, strict=False)
    second.load_state_dict(state)
    assert second.step == 2
    m1, m2 = first.train(batch), second.train(batch)
    assert m1 == m2
    for (name, p1), p2 in zip(first.model.named_parameters(), second.model.parameters(), strict=True):
        assert torch.equal(p1, p2), name


def test_malformed_rollouts_name_the_field(tools):
    _, critic = tools
    batch, (tokens, mask, returns, old_values) = _rollout(tools)
    with pytest.raises(InvalidArgument) as err:
        critic.pad_rollout(tokens, mask, [r[:-1] for r in returns], old_values)
    assert err.value.field == "returns.lengths"
    with pytest.raises(InvalidArgument) as err:
        critic.pad_rollout(tokens, mask[:-1], returns, old_values)
    assert err.value.field == "mask.lengths"
    with pytest.raises(InvalidArgument) as err:
        critic.pad_rollout([], [], [], [])
    assert err.value.field == "tokens"

    trainer = _trainer(tools)
    bad = dataclasses.replace(batch, mask=batch.mask * 2)
    with pytest.raises(InvalidArgument) as err:
        trainer.train(bad)
    assert err.value.field == "mask"
    bad = dataclasses.replace(batch, old_values=batch.old_values[:, :-1])
    with pytest.raises(InvalidArgument) as err:
        trainer.train(bad)
    assert err.value.field == "old_values"
    bad = dataclasses.replace(batch, tokens=batch.tokens.clone().fill_(ARCH.vocab_size))
    with pytest.raises(InvalidArgument) as err:
        trainer.train(bad)
    assert err.value.field == "tokens"
    assert trainer.step == 0  # nothing was trained on a rejected batch


def test_only_parameters_that_get_gradients_are_optimised(tools):
    """The LM output layer is unused by the value loss: frozen, so every optimised parameter has
    Adam state after one step (a checkpoint of the optimizer then covers all of them)."""
    trainer = _trainer(tools)
    assert not trainer.model.gpt.output_layer.weight.requires_grad
    optimised = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert all(p is not trainer.model.gpt.output_layer.weight for p in optimised)
    batch, _ = _rollout(tools, seed=6)
    trainer.train(batch)
    assert all("exp_avg" in trainer.optimizer.state[p] for p in optimised)
