"""Optimizer, learning-rate schedule and the gradient step shared by every training loop.

The schedule is NeMo's `CosineAnnealing`: linear warm-up to `lr` over `warmup_steps`, hold for
`constant_steps`, cosine decay to `min_lr` at `max_steps`, then `min_lr`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from common.config import OptimConfig
from common.errors import InvalidArgument


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    if optim.name.lower() not in ("adam", "adamw", "fused_adam", "distributed_fused_adam"):
        raise InvalidArgument("model.optim.name", f"unsupported optimizer {optim.name!r} (use adamw)")
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Norm weights and biases are not decayed, as in Megatron and NeMo.
        (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    sched = optim.sched
    if sched.name == "Constant":
        return optim.lr
    if sched.name != "CosineAnnealing":
        raise InvalidArgument("model.optim.sched.name", f"unsupported schedule {sched.name!r}")
    if sched.warmup_steps > 0 and step < sched.warmup_steps:
        return optim.lr * (step + 1) / sched.warmup_steps
    decay_start = sched.warmup_steps + sched.constant_steps
    decay_steps = max(1, max_steps - decay_start)
    progress = min(1.0, max(0.0, (step - decay_start) / decay_steps))
    return sched.min_lr + 0.5 * (optim.lr - sched.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, max_steps: int):
    base_lr = optim.lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, optim, max_steps) / base_lr)


def allreduce_gradients(model: torch.nn.Module, group=None) -> None:
    """Average gradients over the data-parallel group (a no-op in a single process)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    world = dist.get_world_size(group)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_gradients(model: torch.nn.Module, clip_val: float, tensor_parallel_group=None) -> float:
    """Clip by the global gradient norm; returns the norm before clipping.

    Under tensor parallelism a sharded parameter (Megatron sets `tensor_model_parallel=True` on it)
    holds only part of the gradient, so its squared norm is summed over the TP group while
    replicated parameters (norms) count once. Every TP rank then scales by the same factor and
    the replicated parameters stay identical.
    """
    sharded, replicated = torch.zeros(()), torch.zeros(())
    grads = []
    for param in model.parameters():
        if param.grad is None:
            continue
        grads.append(param.grad)
        square = param.grad.detach().float().pow(2).sum().cpu()
        if getattr(param, "tensor_model_parallel", False):
            sharded += square
        else:
            replicated += square
    if dist.is_initialized() and tensor_parallel_group is not None and dist.get_world_size(tensor_parallel_group) > 1:
        dist.all_reduce(sharded, group=tensor_parallel_group)
    total_norm = float((sharded + replicated).sqrt())
    if clip_val > 0 and total_norm > clip_val:
        scale = clip_val / (total_norm + 1e-6)
        for grad in grads:
            grad.mul_(scale)
    return total_norm


def optimizer_step(model, optimizer, scheduler, clip_val: float, tensor_parallel_group=None) -> float:
    """Clip, step, zero grads; returns the pre-clip gradient norm."""
    grad_norm = clip_gradients(model, clip_val, tensor_parallel_group)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
