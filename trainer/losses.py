"""Supervised losses: next-token log-probabilities, masked SFT cross-entropy and the pairwise
Bradley-Terry reward-model loss. See docs/ppo.md (reward-model section)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.errors import InvalidArgument


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens[:, t+1] | tokens[:, :t+1]) for logits [B, S, V], tokens [B, S] -> [B, S-1].

    = logits[t, tok] - logsumexp(logits[t]). Only the target logit is gathered and logsumexp is
    taken one sequence at a time, so no full [B, S, V] log_softmax (or float32 copy of
    low-precision logits) is ever materialised. The result is float32 (float64 for float64 logits).
    """
    if logits.dim() != 3:
        raise InvalidArgument("logits", f"expected [B, S, V], got shape {tuple(logits.shape)}")
    if tuple(tokens.shape) != tuple(logits.shape[:2]):
        raise InvalidArgument(
            "tokens", f"expected shape {tuple(logits.shape[:2])}, got {tuple(tokens.shape)}"
        )
    logits = logits[:, :-1]
    targets = tokens[:, 1:].long()
    dtype = torch.promote_types(logits.dtype, torch.float32)
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1).to(dtype)
    lse = torch.stack([torch.logsumexp(row.to(dtype), dim=-1) for row in logits])
    return picked - lse


def sft_loss(logits: torch.Tensor, tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean next-token cross-entropy: sum(-log p(next token) * mask) / sum(mask).

    logits [B, S, V], tokens [B, S], loss_mask [B, S-1] (1 where the next token is trained on,
    e.g. response tokens only). An all-zero mask gives 0.
    """
    expected = (tokens.shape[0], tokens.shape[1] - 1) if tokens.dim() == 2 else None
    if expected is None or tuple(loss_mask.shape) != expected:
        raise InvalidArgument("loss_mask", f"expected shape {expected}, got {tuple(loss_mask.shape)}")
    nll = -token_logprobs(logits, tokens)
    mask = loss_mask.to(nll.dtype)
    return (nll * mask).sum() / mask.sum().clamp(min=1.0)


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise reward-model loss; returns (loss, accuracy).

    loss     = mean(-logsigmoid(r_chosen - r_rejected - margin))   (margin 0 when None)
    accuracy = fraction of pairs with r_chosen > r_rejected (ties count as wrong), detached.
    """
    if r_chosen.shape != r_rejected.shape:
        raise InvalidArgument(
            "r_rejected", f"expected shape {tuple(r_chosen.shape)}, got {tuple(r_rejected.shape)}"
        )
    if r_chosen.numel() == 0:
        raise InvalidArgument("r_chosen", "no comparison pairs")
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    accuracy = (r_chosen > r_rejected).float().mean().detach()
    return loss, accuracy
