"""PPO math as pure functions. See docs/ppo.md for the formulas, shapes and masks."""

from trainer.ppo.advantages import (
    gae,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    response_mask,
    shaped_rewards,
)
from trainer.ppo.losses import entropy_from_logits, policy_loss, value_loss

__all__ = [
    "entropy_from_logits",
    "gae",
    "kl_penalty",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "response_mask",
    "shaped_rewards",
    "value_loss",
]
