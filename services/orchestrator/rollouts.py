"""Rollout collection: generation micro-batch by micro-batch, each one scored as soon as it is back.

Micro-batch i+1 is generating on the generation service while micro-batch i is being scored by
reward-critic and reference, so the scoring hides behind generation (DESIGN.md §1 steps 1-2).
Every prompt's sampling seed is derived from its position in the data order, so a retried or
resumed rollout samples the same responses.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from services.generation.weights import StaleVersion
from services.orchestrator.remote import Endpoint, RemoteModels
from trainer.ppo.rollout import Sample


@dataclass
class Sampling:
    max_new_tokens: int
    min_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    greedy: bool
    end_id: int


def sample_seed(run_seed: int, data_position: int) -> int:
    """A 63-bit seed per prompt: the same prompt position gets the same seed after a resume."""
    return (run_seed * 1_000_003 + data_position * 7_919) % (2**63 - 1)


class RolloutCollector:
    def __init__(self, generation, generation_endpoint: Endpoint, remote: RemoteModels, micro_batch_size: int,
                 run_seed: int, resync_weights):
        self.generation = generation
        self.generation_endpoint = generation_endpoint
        # Called when generation serves older weights than asked for: it restarted from the initial
        # policy. Pushing the current actor again makes the retried request exact.
        self.resync_weights = resync_weights
        self.remote = remote
        self.micro_batch_size = micro_batch_size
        self.run_seed = run_seed
        # Separate pools: a scoring task waits on its reference call, so they must not share workers.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="score")
        self._reference_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="reference")

    def _score(self, samples: list[Sample]) -> list[Sample]:
        sequences = [torch.tensor(s.tokens) for s in samples]
        ref_future = self._reference_pool.submit(self.remote.ref_logprobs, sequences)
        rewards, values = self.remote.score(sequences)
        for sample, reward, value, ref in zip(samples, rewards.tolist(), values, ref_future.result(), strict=True):
            sample.rm_score, sample.values, sample.ref_logprobs = reward, value, ref
        return samples

    def collect(
        self, prompts: list[tuple[int, list[int]]], sampling: Sampling, policy_version: int
    ) -> tuple[list[Sample], dict[str, float]]:
        """Generate and score every (data position, prompt ids); returns the samples in prompt order
        and the phase timings: `generate` (until the last response arrived) and `score` (the
        scoring left after that)."""
        start = time.perf_counter()
        pending: list[Future] = []
        for first in range(0, len(prompts), self.micro_batch_size):
            chunk = prompts[first : first + self.micro_batch_size]
            results = self._generate(chunk, sampling, policy_version)
            samples = [
                Sample(index=position, prompt=list(ids), response=list(r.tokens), is_end=bool(r.ended))
                for (position, ids), r in zip(chunk, results, strict=True)
            ]
            pending.append(self._pool.submit(self._score, samples))
        generated = time.perf_counter()
        scored = [sample for future in pending for sample in future.result()]
        done = time.perf_counter()
        return scored, {"generate": generated - start, "score": done - generated}

    def _generate(self, chunk, sampling: Sampling, policy_version: int):
        def call():
            return self.generation.generate(
                [ids for _, ids in chunk],
                max_new_tokens=sampling.max_new_tokens,
                min_new_tokens=sampling.min_new_tokens,
                temperature=sampling.temperature,
                top_k=sampling.top_k,
                top_p=sampling.top_p,
                greedy=sampling.greedy,
                end_id=sampling.end_id,
                seeds=[sample_seed(self.run_seed, position) for position, _ in chunk],
                policy_version=policy_version,
            )

        try:
            return self.generation_endpoint.call("Generate", call)
        except StaleVersion:
            self.resync_weights()
            return self.generation_endpoint.call("Generate", call)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._reference_pool.shutdown(wait=False, cancel_futures=True)
