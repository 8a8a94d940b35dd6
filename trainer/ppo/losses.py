"""PPO losses: clipped policy loss (with the end-of-sequence rule and entropy bonus), clipped value
loss and per-token entropy. See docs/ppo.md for the formulas.

Per-token tensors are [B, S-1] in next-token space. Stats are detached 0-d tensors (no host sync
here; the caller decides when to read them).
"""

from __future__ import annotations

import torch

from common.errors import InvalidArgument
from trainer.ppo.advantages import _check_shape, masked_mean


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dimension: H = logsumexp(l) - sum(softmax(l) * l).

    Shape [..., V] -> [...]; pass `logits[:, :-1]` for next-token space. Computed one sequence at a
    time in at least float32 so that low-precision logits never get a full float32 copy at once.
    """

    def one(lg: torch.Tensor) -> torch.Tensor:
        lg = lg.to(torch.promote_types(lg.dtype, torch.float32))
        return torch.logsumexp(lg, dim=-1) - (torch.softmax(lg, dim=-1) * lg).sum(-1)

    if logits.dim() < 3:
        return one(logits)
    return torch.stack([one(row) for row in logits])


def policy_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps: float = 0.2,
    is_end: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss.

    ratio = exp(logp_new - logp_old)
    L     = masked_mean(max(-A * ratio, -A * clamp(ratio, 1 - eps, 1 + eps)))
            - entropy_coef * masked_mean(H)          (when `entropy` [B, S-1] is given)

    Sequences with is_end = False (no EOS: truncated) are dropped from the mask, as NeMo-Aligner
    does. Stats: clip_fraction (tokens where the clipped term wins, i.e. the gradient is cut),
    ratio_mean, approx_kl (masked_mean(0.5 * (logp_new - logp_old)^2)) and entropy when given.
    """
    _check_shape("logp_old", logp_old, logp_new.shape)
    _check_shape("advantages", advantages, logp_new.shape)
    _check_shape("mask", mask, logp_new.shape)
    if eps < 0:
        raise InvalidArgument("ratio_eps", f"must be >= 0, got {eps}")
    mask = mask.to(logp_new.dtype)
    if is_end is not None:
        _check_shape("is_end", is_end, logp_new.shape[:1])
        mask = mask * is_end.to(mask.dtype).unsqueeze(1)

    log_ratio = logp_new - logp_old
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps, 1.0 + eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)

    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).to(mask.dtype), mask),
            "ratio_mean": masked_mean(ratio, mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
        }
    if entropy is not None:
        _check_shape("entropy", entropy, logp_new.shape)
        mean_entropy = masked_mean(entropy, mask)
        loss = loss - entropy_coef * mean_entropy
        stats["entropy"] = mean_entropy.detach()
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss.

    V_clip = V_old + clamp(V - V_old, -clip, clip)
    L      = 0.5 * masked_mean(max((V_clip - R)^2, (V - R)^2))
    clip <= 0 means unclipped: L = 0.5 * masked_mean((V - R)^2).
    Stats: clip_fraction (tokens where the clipped error wins), value_mean, returns_mean.
    """
    _check_shape("old_values", old_values, values.shape)
    _check_shape("returns", returns, values.shape)
    _check_shape("mask", mask, values.shape)
    err = (values - returns) ** 2
    if clip > 0:
        v_clip = old_values + (values - old_values).clamp(-clip, clip)
        err_clip = (v_clip - returns) ** 2
        per_token = torch.maximum(err_clip, err)
        clip_fraction = masked_mean((err_clip > err).to(values.dtype).detach(), mask)
    else:
        per_token = err
        clip_fraction = torch.zeros((), dtype=values.dtype, device=values.device)
    loss = 0.5 * masked_mean(per_token, mask)
    with torch.no_grad():
        stats = {
            "clip_fraction": clip_fraction,
            "value_mean": masked_mean(values, mask),
            "returns_mean": masked_mean(returns, mask),
        }
    return loss, stats
