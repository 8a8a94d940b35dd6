"""The PPO critic's training step: clipped value loss on a rollout, with its own optimizer.

The critic is a value-head model (`trainer.model.build_model(arch, value_head=True)`), initialised
from the reward model. Each `CriticTrainer.train(batch)` call is one pass over a rollout:

- the rollout is cut into `global_batch_size` mini-batches, one optimizer step each (NeMo-Aligner's
  critic server does the same); a smaller last mini-batch still takes a step;
- each mini-batch runs in `micro_batch_size` pieces with gradient accumulation. Every piece's loss
  is weighted by its share of the mini-batch's masked tokens, so the accumulated gradient is the
  gradient of the value loss averaged over all the mini-batch's tokens, whatever the micro-batch
  size;
- the gradient is clipped by its global norm (`gradient_clip_val`), then AdamW and the schedule
  step (`trainer.optim`).

With `offload_adam_states`, Adam's moment tensors live in CPU memory between calls and come back to
the parameters' device only for the update: in PPO the critic trains once per step, and the moments
are twice the model's size in float32.

Tensors follow docs/ppo.md: tokens [B, S] (right-padded), mask / returns /
old_values [B, S-1] in next-token space (position t is the state before token t+1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from common.config import CriticModelConfig
from common.errors import InvalidArgument
from trainer.optim import build_optimizer, build_scheduler, optimizer_step
from trainer.ppo.losses import value_loss


@dataclass
class CriticBatch:
    """A rollout for the critic: tokens [B, S] long (right-padded), and in next-token space
    mask [B, S-1] (1 on response tokens, 0 on prompt and padding), returns and old_values
    [B, S-1] float32."""

    tokens: torch.Tensor
    mask: torch.Tensor
    returns: torch.Tensor
    old_values: torch.Tensor

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def rows(self, start: int, stop: int) -> CriticBatch:
        return CriticBatch(
            self.tokens[start:stop],
            self.mask[start:stop],
            self.returns[start:stop],
            self.old_values[start:stop],
        )

    def trimmed(self) -> CriticBatch:
        """Drop the columns after the last masked position of every row. Attention is causal, so
        the dropped tail cannot change the values at the kept positions; it only costs compute."""
        nonzero = self.mask.ne(0).any(dim=0).nonzero()
        keep = int(nonzero[-1]) + 1 if len(nonzero) else 1
        return CriticBatch(
            self.tokens[:, : keep + 1], self.mask[:, :keep], self.returns[:, :keep], self.old_values[:, :keep]
        )

    def validate(self, vocab_size: int | None = None, max_length: int | None = None) -> None:
        """Shapes and values, each problem an `InvalidArgument` naming the field."""
        if self.tokens.dim() != 2 or self.tokens.shape[0] == 0:
            raise InvalidArgument(
                "tokens", f"must be a non-empty [batch, seq] tensor, got shape {tuple(self.tokens.shape)}"
            )
        if self.tokens.shape[1] < 2:
            raise InvalidArgument("tokens", "sequences need at least 2 tokens to have a value to train")
        if self.tokens.dtype != torch.long:
            raise InvalidArgument("tokens", f"must be int64, got {self.tokens.dtype}")
        if max_length is not None and self.tokens.shape[1] > max_length:
            raise InvalidArgument(
                "tokens", f"length {self.tokens.shape[1]} exceeds the model's maximum {max_length}"
            )
        if vocab_size is not None and (int(self.tokens.min()) < 0 or int(self.tokens.max()) >= vocab_size):
            raise InvalidArgument("tokens", f"token ids must be in [0, {vocab_size})")
        expected = (self.tokens.shape[0], self.tokens.shape[1] - 1)
        for name in ("mask", "returns", "old_values"):
            value = getattr(self, name)
            if tuple(value.shape) != expected:
                raise InvalidArgument(
                    name, f"must have shape {expected} (next-token space), got {tuple(value.shape)}"
                )
            if not torch.isfinite(value.float()).all():
                raise InvalidArgument(name, "has NaN or infinite entries")
        if not bool(((self.mask == 0) | (self.mask == 1)).all()):
            raise InvalidArgument("mask", "entries must be 0 or 1")


def pad_rollout(
    tokens: Sequence[torch.Tensor],
    mask: Sequence[torch.Tensor],
    returns: Sequence[torch.Tensor],
    old_values: Sequence[torch.Tensor],
    pad_id: int = 0,
) -> CriticBatch:
    """Ragged rows -> a right-padded `CriticBatch`. Per-token rows must be one shorter than their
    token row; padding gets mask 0 (so its returns and values never matter)."""
    if not tokens:
        raise InvalidArgument("tokens", "is empty: the batch needs at least one row")
    for name, rows in (("mask", mask), ("returns", returns), ("old_values", old_values)):
        if len(rows) != len(tokens):
            raise InvalidArgument(f"{name}.lengths", f"has {len(rows)} rows, but tokens has {len(tokens)}")
        for i, (row, toks) in enumerate(zip(rows, tokens, strict=True)):
            if len(row) != len(toks) - 1:
                raise InvalidArgument(
                    f"{name}.lengths",
                    f"row {i} has length {len(row)}, but must be tokens.lengths[{i}] - 1 = {len(toks) - 1}",
                )
    batch, width = len(tokens), max(len(t) for t in tokens)
    out = CriticBatch(
        tokens=torch.full((batch, width), pad_id, dtype=torch.long),
        mask=torch.zeros(batch, width - 1),
        returns=torch.zeros(batch, width - 1),
        old_values=torch.zeros(batch, width - 1),
    )
    for i, toks in enumerate(tokens):
        n = len(toks)
        out.tokens[i, :n] = torch.as_tensor(toks, dtype=torch.long)
        out.mask[i, : n - 1] = torch.as_tensor(mask[i], dtype=torch.float32)
        out.returns[i, : n - 1] = torch.as_tensor(returns[i], dtype=torch.float32)
        out.old_values[i, : n - 1] = torch.as_tensor(old_values[i], dtype=torch.float32)
    return out


def move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device | str) -> None:
    """Move the optimizer's per-parameter state tensors (Adam's moments) to `device`. Adam's
    `step` counter is left where torch keeps it (on the CPU unless `capturable`)."""
    device = torch.device(device)
    for state in optimizer.state.values():
        for key, value in state.items():
            if key != "step" and torch.is_tensor(value) and value.device != device:
                state[key] = value.to(device)


def optimizer_state_devices(optimizer: torch.optim.Optimizer) -> set[torch.device]:
    """Devices of the optimizer's state tensors (Adam's `step` counters excluded)."""
    return {
        value.device
        for state in optimizer.state.values()
        for key, value in state.items()
        if key != "step" and torch.is_tensor(value)
    }


def freeze_unused_parameters(model) -> None:
    """The critic reads only the value head, so the language-model output layer never gets a
    gradient: freeze it, so that the optimizer neither holds it nor keeps (absent) state for it.
    With tied embeddings there is no separate output weight and nothing to freeze."""
    output_layer = getattr(model.gpt, "output_layer", None)
    weight = getattr(output_layer, "weight", None)
    if weight is not None and not model.arch.share_embeddings_and_output_weights:
        weight.requires_grad_(False)


def _tensor_parallel_group():
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    from megatron.core import parallel_state

    return (
        parallel_state.get_tensor_model_parallel_group()
        if parallel_state.model_parallel_is_initialized()
        else None
    )


# Called as fn(step, metrics) after each training pass of any CriticTrainer of the process: a
# server's exp_manager writes the critic's metrics this way (services/model_server.py).
_train_listeners: list[Callable[[int, dict[str, float]], None]] = []


def add_train_listener(fn: Callable[[int, dict[str, float]], None]) -> None:
    _train_listeners.append(fn)


def remove_train_listener(fn: Callable[[int, dict[str, float]], None]) -> None:
    _train_listeners.remove(fn)


class CriticTrainer:
    """Owns the critic model's optimizer, schedule and step count."""

    def __init__(self, model, config: CriticModelConfig, *, gradient_clip_val: float, max_steps: int):
        if model.value_head is None:
            raise InvalidArgument("critic", "the critic model needs a value head")
        for name in ("micro_batch_size", "global_batch_size"):
            if getattr(config, name) < 1:
                raise InvalidArgument(f"model.{name}", f"must be >= 1, got {getattr(config, name)}")
        if max_steps < 1:
            raise InvalidArgument("trainer.ppo.max_steps", f"must be >= 1, got {max_steps}")
        freeze_unused_parameters(model)
        self.model = model
        self.config = config
        self.gradient_clip_val = gradient_clip_val
        self.optimizer = build_optimizer(model, config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.optim, max_steps)
        self.step = 0  # optimizer steps taken

    def train(self, batch: CriticBatch) -> dict[str, float]:
        """One pass over `batch`; returns token-weighted means of the loss statistics over the
        pass, the last gradient norm (before clipping), the learning rate used and counts."""
        model = self.model
        batch.validate(vocab_size=model.arch.vocab_size, max_length=model.arch.encoder_seq_length)
        device = model.device
        # Moments must sit with the parameters for the update (they may have been offloaded, or
        # the model may have been swapped between devices since the last call).
        move_optimizer_state(self.optimizer, device)
        tp_group = _tensor_parallel_group()
        clip, mbs, gbs = (
            self.config.loss_clip_val,
            self.config.micro_batch_size,
            self.config.global_batch_size,
        )
        totals: dict[str, float] = {}
        total_tokens = 0.0
        grad_norm, lr, steps = 0.0, self.optimizer.param_groups[0]["lr"], 0
        model.train()
        try:
            for start in range(0, len(batch), gbs):
                mini = batch.rows(start, start + gbs)
                mini_tokens = float(mini.mask.sum())
                for micro_start in range(0, len(mini), mbs):
                    micro = mini.rows(micro_start, micro_start + mbs).trimmed()
                    micro_tokens = float(micro.mask.sum())
                    values = model(micro.tokens.to(device)).values[:, :-1]
                    loss, stats = value_loss(
                        values,
                        micro.old_values.to(device),
                        micro.returns.to(device),
                        micro.mask.to(device),
                        clip=clip,
                    )
                    # Weight by token share: the sum over micro-batches is the mini-batch mean.
                    (loss * (micro_tokens / max(mini_tokens, 1.0))).backward()
                    for name, value in {"value_loss": loss.detach(), **stats}.items():
                        totals[name] = totals.get(name, 0.0) + float(value) * micro_tokens
                    total_tokens += micro_tokens
                lr = self.optimizer.param_groups[0]["lr"]
                grad_norm = optimizer_step(
                    model, self.optimizer, self.scheduler, self.gradient_clip_val, tp_group
                )
                self.step += 1
                steps += 1
        finally:
            model.eval()
            self.optimizer.zero_grad(set_to_none=True)
            if self.config.offload_adam_states:
                move_optimizer_state(self.optimizer, "cpu")
        metrics = {name: total / max(total_tokens, 1.0) for name, total in totals.items()}
        metrics.update(
            grad_norm=grad_norm,
            lr=lr,
            optimizer_steps=float(steps),
            num_sequences=float(len(batch)),
            num_tokens=total_tokens,
        )
        for listener in _train_listeners:
            listener(self.step, metrics)
        return metrics

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Optimizer, schedule and step (the model's weights are saved separately)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict) -> None:
        # torch casts the loaded moments to each parameter's device and dtype.
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        if self.config.offload_adam_states:
            move_optimizer_state(self.optimizer, "cpu")
