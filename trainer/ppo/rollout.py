"""A PPO rollout as padded tensors, and the step from scored samples to advantages.

Token tensors are [B, S] (right-padded); every per-token tensor is [B, S-1] in next-token space
(docs/ppo.md): position t describes the prediction of token t+1.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from trainer.ppo.advantages import gae, kl_penalty, masked_mean, masked_whiten, response_mask, shaped_rewards


@dataclass
class Sample:
    """One generated sequence with what the services said about it."""

    index: int  # position of its prompt in the data order (checkpoints, no double counting)
    prompt: list[int]
    response: list[int]  # new tokens, the end token included when produced
    is_end: bool
    rm_score: float = 0.0
    ref_logprobs: torch.Tensor | None = None  # [L-1]
    values: torch.Tensor | None = None  # [L-1]

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.response


@dataclass
class Rollout:
    tokens: torch.Tensor  # [B, S] long
    prompt_lengths: torch.Tensor  # [B]
    response_ends: torch.Tensor  # [B] exclusive end (= sequence length)
    is_end: torch.Tensor  # [B] bool
    rm_scores: torch.Tensor  # [B]
    ref_logprobs: torch.Tensor  # [B, S-1]
    values: torch.Tensor  # [B, S-1]
    old_logprobs: torch.Tensor | None = None  # [B, S-1] actor, recomputed on the training model
    mask: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    indices: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def sequences(self) -> list[torch.Tensor]:
        return [self.tokens[i, : int(n)] for i, n in enumerate(self.response_ends)]

    def select(self, rows: slice | torch.Tensor) -> Rollout:
        """A sub-rollout of the given rows (tensors sliced on the batch dimension)."""
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                picked[f.name] = value[rows]
            elif f.name == "indices":
                ids = range(len(self))[rows] if isinstance(rows, slice) else rows.tolist()
                picked[f.name] = [value[i] for i in ids] if value else []
        return Rollout(**picked)


def pad_rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Right-pad 1-D float rows with zeros to [len(rows), width]."""
    out = torch.zeros(len(rows), width, dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def rollout_from_samples(samples: list[Sample], pad_id: int) -> Rollout:
    lengths = [len(s.tokens) for s in samples]
    width = max(lengths)
    tokens = torch.full((len(samples), width), pad_id, dtype=torch.long)
    for i, s in enumerate(samples):
        tokens[i, : lengths[i]] = torch.tensor(s.tokens, dtype=torch.long)
    return Rollout(
        tokens=tokens,
        prompt_lengths=torch.tensor([len(s.prompt) for s in samples]),
        response_ends=torch.tensor(lengths),
        is_end=torch.tensor([s.is_end for s in samples]),
        rm_scores=torch.tensor([s.rm_score for s in samples], dtype=torch.float32),
        ref_logprobs=pad_rows([s.ref_logprobs for s in samples], width - 1),
        values=pad_rows([s.values for s in samples], width - 1),
        indices=[s.index for s in samples],
    )


def compute_advantages(
    rollout: Rollout,
    *,
    kl_coef: float,
    kl_estimator: str = "abs",
    gamma: float = 1.0,
    lam: float = 0.95,
    normalize: bool = True,
    reward_mean: float = 0.0,
    reward_std: float = 1.0,
) -> dict[str, float]:
    """Fill mask, kl, rewards, advantages and returns; return the rollout's statistics."""
    assert rollout.old_logprobs is not None, "recompute the actor's logprobs first"
    width = rollout.tokens.shape[1]
    rollout.mask = response_mask(rollout.prompt_lengths, rollout.response_ends, width)
    rollout.kl = kl_penalty(rollout.old_logprobs, rollout.ref_logprobs, kl_estimator) * rollout.mask
    rollout.rewards = shaped_rewards(
        rollout.rm_scores, rollout.kl, rollout.mask, kl_coef, rollout.response_ends, reward_mean, reward_std
    )
    rollout.advantages, rollout.returns = gae(rollout.rewards, rollout.values, rollout.mask, gamma, lam)
    if normalize:
        rollout.advantages = masked_whiten(rollout.advantages, rollout.mask)
    response_lengths = (rollout.response_ends - rollout.prompt_lengths).float()
    # KL of the sampled continuation: the k1 sum over its tokens (what peers plot as "kl").
    sequence_kl = ((rollout.old_logprobs - rollout.ref_logprobs) * rollout.mask).sum(-1)
    return {
        "reward_mean": float(rollout.rm_scores.mean()),
        "reward_std": float(rollout.rm_scores.std(unbiased=False)),
        "kl": float(sequence_kl.mean()),
        "kl_penalty_per_token": float(masked_mean(rollout.kl, rollout.mask)),
        "response_length": float(response_lengths.mean()),
        "ended_fraction": float(rollout.is_end.float().mean()),
        "value_mean": float(masked_mean(rollout.values, rollout.mask)),
        "returns_mean": float(masked_mean(rollout.returns, rollout.mask)),
    }
