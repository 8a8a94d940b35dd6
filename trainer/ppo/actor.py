"""The actor update: one PPO epoch over a rollout on the Megatron-core training model.

The rollout is split into `global_batch_size` mini-batches (one optimizer step each); each is
run in `micro_batch_size` pieces with gradient accumulation. Under data parallelism every rank
trains on its own slice of each mini-batch and gradients are averaged before the step.
See docs/ppo.md (policy loss) for the loss and how micro-batch losses are combined.
"""

from __future__ import annotations

import torch

from common.errors import InvalidArgument
from trainer.losses import token_logprobs
from trainer.optim import allreduce_gradients, optimizer_step
from trainer.ppo.losses import entropy_from_logits, policy_loss
from trainer.ppo.rollout import Rollout


def _data_parallel():
    """(rank, size, group) of the data-parallel group; (0, 1, None) without torch.distributed."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return 0, 1, None, None
    from megatron.core import parallel_state

    return (
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
        parallel_state.get_data_parallel_group(),
        parallel_state.get_tensor_model_parallel_group(),
    )


def actor_train(
    model,
    optimizer,
    scheduler,
    rollout: Rollout,
    *,
    global_batch_size: int,
    micro_batch_size: int,
    ratio_eps: float,
    entropy_bonus: float,
    gradient_clip_val: float,
    offload_adam_states: bool = False,
) -> dict[str, float]:
    """One pass over `rollout`; returns the mean loss statistics and the last gradient norm.
    With `offload_adam_states` Adam's moments wait in CPU memory between passes (NeMo's
    model.ppo.offload_adam_states): they come to the parameters' device for this pass only."""
    from trainer.critic import move_optimizer_state

    dp_rank, dp_size, dp_group, tp_group = _data_parallel()
    if global_batch_size % (micro_batch_size * dp_size):
        raise InvalidArgument(
            "model.global_batch_size",
            f"{global_batch_size} must be a multiple of micro_batch_size x data-parallel size "
            f"({micro_batch_size} x {dp_size})",
        )
    if len(rollout) % global_batch_size:
        raise InvalidArgument(
            "model.ppo.num_rollout_samples",
            f"{len(rollout)} must be a multiple of model.global_batch_size {global_batch_size}",
        )
    move_optimizer_state(optimizer, model.device)
    model.train()
    totals: dict[str, float] = {}
    count = 0
    grad_norm = 0.0
    per_rank = global_batch_size // dp_size
    for start in range(0, len(rollout), global_batch_size):
        mine = rollout.select(slice(start + dp_rank * per_rank, start + (dp_rank + 1) * per_rank))
        for micro_start in range(0, per_rank, micro_batch_size):
            micro = mine.select(slice(micro_start, micro_start + micro_batch_size))
            logits = model(micro.tokens.to(model.device)).logits
            logp = token_logprobs(logits, micro.tokens.to(logits.device))
            # Entropy is always logged; it carries a gradient only when it is in the loss.
            with torch.set_grad_enabled(entropy_bonus != 0.0):
                entropy = entropy_from_logits(logits[:, :-1])
            loss, stats = policy_loss(
                logp,
                micro.old_logprobs.to(logp.device),
                micro.advantages.to(logp.device),
                micro.mask.to(logp.device),
                eps=ratio_eps,
                is_end=micro.is_end.to(logp.device),
                entropy=entropy,
                entropy_coef=entropy_bonus,
            )
            (loss * micro_batch_size / per_rank).backward()
            for name, value in {"policy_loss": loss, **stats}.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach())
            count += 1
        allreduce_gradients(model, dp_group)
        grad_norm = optimizer_step(model, optimizer, scheduler, gradient_clip_val, tp_group)
    if offload_adam_states:
        move_optimizer_state(optimizer, "cpu")
    metrics = {name: total / count for name, total in totals.items()}
    metrics["grad_norm"] = grad_norm
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    return metrics
