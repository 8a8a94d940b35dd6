"""From a scored rollout to advantages: response mask, masked statistics, KL penalty, shaped
rewards and GAE. See docs/ppo.md for the formulas.

Every per-token tensor is [B, S-1] in next-token space: position t holds quantities about token
t+1, predicted by the model's logits at position t. Pure functions, no state, no I/O.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from common.errors import InvalidArgument


def _check_shape(name: str, x: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> None:
    if tuple(x.shape) != tuple(shape):
        raise InvalidArgument(name, f"expected shape {tuple(shape)}, got {tuple(x.shape)}")


def response_mask(prompt_lengths: torch.Tensor, response_ends: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Response-token mask [B, seq_len-1] (float) in next-token space.

    mask[i, t] = 1  iff  prompt_len_i - 1 <= t < response_end_i - 1

    i.e. the positions whose next token is a response token (EOS included). `response_ends` is the
    exclusive end of each sequence (prompt + response length) in token space.
    """
    if prompt_lengths.dim() != 1:
        raise InvalidArgument(
            "prompt_lengths", f"expected a 1-D tensor, got shape {tuple(prompt_lengths.shape)}"
        )
    _check_shape("response_ends", response_ends, prompt_lengths.shape)
    if bool((prompt_lengths < 1).any()):
        raise InvalidArgument("prompt_lengths", "every prompt needs at least one token")
    if bool((response_ends < prompt_lengths).any()):
        raise InvalidArgument("response_ends", "a response ends before its prompt does")
    if bool((response_ends > seq_len).any()):
        raise InvalidArgument("response_ends", f"a response ends beyond seq_len={seq_len}")
    t = torch.arange(seq_len - 1, device=prompt_lengths.device)
    start = (prompt_lengths - 1).unsqueeze(1)
    end = (response_ends - 1).unsqueeze(1)
    return ((t >= start) & (t < end)).float()


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) / sum(mask), over `dim` or over everything.

    An empty mask gives 0 (not NaN), so a micro-batch whose tokens are all excluded contributes a
    zero loss with zero gradient instead of poisoning the step.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Biased variance over the masked entries: masked_mean((x - masked_mean(x))^2)."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def _global_sum(values: torch.Tensor, group) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, group=None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) on masked entries, 0 elsewhere.

    mean and the biased var are taken over the masked entries of the whole rollout: when
    torch.distributed is initialised, token sums and counts are all-reduced over `group` (None =
    the default group), so every data-parallel rank normalises with the same global statistics.
    This is a collective: every rank of the group must call it. Ranks holding copies of the same
    data (tensor/pipeline parallel peers) may join; duplicates leave mean and var unchanged.
    """
    _check_shape("mask", mask, x.shape)
    # Statistics in at least float32 (low-precision sums drift), float64 stays float64.
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf, m = x.to(dtype), mask.to(dtype)
    # Two reductions (mean first, then squared deviations) are numerically safer than E[x^2]-E[x]^2.
    total = _global_sum(torch.stack([(xf * m).sum(), m.sum()]), group)
    mean = total[0] / total[1].clamp(min=1.0)
    sq = _global_sum(((xf - mean) ** 2 * m).sum(), group)
    var = sq / total[1].clamp(min=1.0)
    return ((xf - mean) * torch.rsqrt(var + eps) * m).to(x.dtype)


# exp() of a log-ratio beyond this overflows float32 quickly; k3 is clamped there (as peers do).
_K3_MAX_LOG_RATIO = 20.0


def kl_penalty(logp_actor: torch.Tensor, logp_ref: torch.Tensor, estimator: str = "abs") -> torch.Tensor:
    """Per-token KL estimate between the actor and the reference (initial) policy.

    k1  = logp_actor - logp_ref
    abs = |k1|                                  (NeMo-Aligner's default, `use_absolute_kl`)
    k3  = exp(d) - d - 1, d = logp_ref - logp_actor   (non-negative, unbiased; d clamped to +-20)
    """
    _check_shape("logp_ref", logp_ref, logp_actor.shape)
    k1 = logp_actor - logp_ref
    if estimator == "k1":
        return k1
    if estimator == "abs":
        return k1.abs()
    if estimator == "k3":
        d = (-k1).clamp(-_K3_MAX_LOG_RATIO, _K3_MAX_LOG_RATIO)
        return torch.exp(d) - d - 1.0
    raise InvalidArgument("kl_estimator", f"unknown estimator {estimator!r} (expected 'abs', 'k1' or 'k3')")


def shaped_rewards(
    rm_scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    response_ends: torch.Tensor,
    std_mean: float = 0.0,
    std_std: float = 1.0,
) -> torch.Tensor:
    """Per-token rewards [B, S-1]:

    r_t = -beta * kl_t                        on response tokens (mask = 1)
    r_t += (rm_score - std_mean) / std_std    at t = response_end - 2 (the last response token)

    and 0 on masked positions. `response_ends` is the exclusive end of each sequence in token
    space, the same as for `response_mask`; a row with an empty response gets no reward at all.
    """
    if kl.dim() != 2:
        raise InvalidArgument("kl", f"expected [B, S-1], got shape {tuple(kl.shape)}")
    _check_shape("mask", mask, kl.shape)
    _check_shape("rm_scores", rm_scores, kl.shape[:1])
    _check_shape("response_ends", response_ends, kl.shape[:1])
    if std_std <= 0:
        raise InvalidArgument("std_std", f"must be > 0, got {std_std}")
    last = response_ends.long() - 2
    if bool(((last < 0) | (last >= kl.shape[1])).any()):
        raise InvalidArgument("response_ends", f"must lie in [2, {kl.shape[1] + 1}] for S-1={kl.shape[1]}")
    rewards = -beta * kl
    score = (rm_scores.to(rewards.dtype) - std_mean) / std_std
    rewards = rewards.scatter_add(1, last.unsqueeze(1), score.unsqueeze(1))
    return rewards * mask.to(rewards.dtype)


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over [B, S-1]; returns (advantages, returns).

    Values and rewards are masked first; going backwards with V beyond the end = 0:
        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V
    Masked positions get 0 advantages and 0 returns. No gradient flows (values are targets here).
    """
    _check_shape("values", values, rewards.shape)
    _check_shape("mask", mask, rewards.shape)
    m = mask.to(rewards.dtype)
    r, v = rewards * m, values.to(rewards.dtype) * m
    advantages = torch.zeros_like(r)
    next_value = torch.zeros_like(r[:, 0])
    next_adv = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        next_adv = delta + gamma * lam * next_adv
        advantages[:, t] = next_adv
        next_value = v[:, t]
    # Prompt positions see the first response value as V_{t+1}; zero them after the recursion.
    advantages = advantages * m
    return advantages, advantages + v
