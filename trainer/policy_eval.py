"""Evaluate a policy on held-out prompts: its responses, the reward model's scores and, when the
task has one, the hidden ground truth (the synthetic task's `ground_truth_score`).

Everything runs in this process on trainer code: the sampling engine for responses (greedy, or
sampled with fixed seeds) and the reward model's value head for scores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainer.data.datasets import encode_prompt
from trainer.engine import SamplingParams, TorchEngine
from trainer.model import sequence_logprobs, sequence_rewards


@dataclass
class PolicyEval:
    reward_mean: float
    ground_truth_mean: float | None
    response_length: float
    ended_fraction: float
    kl_to_reference: float | None  # mean over prompts of sum_t (log pi - log pi_ref) of the response
    examples: list[dict]

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "examples"}


def evaluate_policy(
    policy,
    reward_model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    greedy: bool = True,
    seed: int = 0,
    reference=None,
    ground_truth: Callable[[str, str], float] | None = None,
    micro_batch_size: int = 16,
    num_examples: int = 8,
) -> PolicyEval:
    engine = TorchEngine(policy, max_seq_len=policy.arch.encoder_seq_length, pad_id=tokenizer.pad_id,
                         decode="fused" if policy.arch.tensor_model_parallel_size == 1 else "megatron")
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    params = [
        SamplingParams(max_new_tokens=max_new_tokens, min_new_tokens=1, greedy=greedy, end_id=tokenizer.eos_id,
                       seed=seed + i)
        for i in range(len(prompts))
    ]  # fmt: skip
    results = []
    for start in range(0, len(prompts), micro_batch_size):
        results += engine.generate(prompt_ids[start : start + micro_batch_size], params[start : start + micro_batch_size])
    sequences = [torch.tensor(p + r.tokens) for p, r in zip(prompt_ids, results, strict=True)]
    rewards = sequence_rewards(reward_model, sequences, micro_batch_size)
    texts = [tokenizer.decode([t for t in r.tokens if t != tokenizer.eos_id]) for r in results]
    truths = [ground_truth(p, t) for p, t in zip(prompts, texts, strict=True)] if ground_truth else None
    kl = None
    if reference is not None:
        actor_lp = sequence_logprobs(policy, sequences, micro_batch_size)
        ref_lp = sequence_logprobs(reference, sequences, micro_batch_size)
        kl = float(torch.tensor([
            float((a - r)[len(p) - 1 :].sum()) for a, r, p in zip(actor_lp, ref_lp, prompt_ids, strict=True)
        ]).mean())  # fmt: skip
    examples = [
        {"prompt": p, "response": t, "reward": float(r)} | ({"ground_truth": truths[i]} if truths else {})
        for i, (p, t, r) in enumerate(zip(prompts[:num_examples], texts, rewards.tolist(), strict=False))
    ]
    return PolicyEval(
        reward_mean=float(rewards.mean()),
        ground_truth_mean=float(sum(truths) / len(truths)) if truths else None,
        response_length=sum(len(r.tokens) for r in results) / len(results),
        ended_fraction=sum(r.ended for r in results) / len(results),
        kl_to_reference=kl,
        examples=examples,
    )
