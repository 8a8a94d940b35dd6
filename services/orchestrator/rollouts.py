"""Rollout collection: micro-batches generated on the generation replicas, each one scored as soon
as it is back.

As many micro-batches generate at once as there are healthy generation replicas; while they
generate, the ones already back are scored by the reward-critic and reference services, so the
scoring hides behind generation (docs/architecture.md). Every prompt's sampling seed is derived
from its position in the data order, so a retried, failed-over or resumed micro-batch samples the
same responses on any replica.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from services.orchestrator.clients import Generator, Scorer
from trainer.engine import SamplingParams
from trainer.ppo.rollout import Sample


def sample_seed(run_seed: int, data_position: int) -> int:
    """A 63-bit seed per prompt: the same prompt position gets the same seed after a resume."""
    return (run_seed * 1_000_003 + data_position * 7_919) % (2**63 - 1)


class RolloutCollector:
    def __init__(self, generator: Generator, scorer: Scorer, micro_batch_size: int, run_seed: int):
        self.generator, self.scorer = generator, scorer
        self.micro_batch_size = micro_batch_size
        self.run_seed = run_seed
        # Separate pools: a scoring task waits on its reference call, so they must not share workers.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="score")
        self._reference_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="reference")

    def _score(self, samples: list[Sample]) -> list[Sample]:
        sequences = [torch.tensor(s.tokens) for s in samples]
        ref_future = self._reference_pool.submit(self.scorer.ref_logprobs, sequences)
        rewards, values = self.scorer.score(sequences)
        for sample, reward, value, ref in zip(samples, rewards.tolist(), values, ref_future.result(), strict=True):
            sample.rm_score, sample.values, sample.ref_logprobs = reward, value, ref
        return samples

    def _generate(self, chunk: list[tuple[int, list[int]]], sampling: SamplingParams, version: int) -> list[Sample]:
        seeds = [sample_seed(self.run_seed, position) for position, _ in chunk]
        results = self.generator.generate([ids for _, ids in chunk], sampling, seeds, version)
        return [
            Sample(index=position, prompt=list(ids), response=list(r.tokens), is_end=bool(r.ended))
            for (position, ids), r in zip(chunk, results, strict=True)
        ]

    def collect(
        self, prompts: list[tuple[int, list[int]]], sampling: SamplingParams, policy_version: int
    ) -> tuple[list[Sample], dict[str, float]]:
        """Generate and score every (data position, prompt ids); returns the samples in prompt order
        and the phase timings: `generate` (until the last response arrived) and `score` (the
        scoring left after that)."""
        start = time.perf_counter()
        chunks = [prompts[i : i + self.micro_batch_size] for i in range(0, len(prompts), self.micro_batch_size)]
        scored: list[Future] = []
        with ThreadPoolExecutor(self.generator.concurrency(), thread_name_prefix="generate") as generating:
            generated = [generating.submit(self._generate, chunk, sampling, policy_version) for chunk in chunks]
            for future in generated:  # in order: scoring starts as soon as each one is back
                scored.append(self._pool.submit(self._score, future.result()))
        generate_done = time.perf_counter()
        samples = [sample for future in scored for sample in future.result()]
        done = time.perf_counter()
        return samples, {"generate": generate_done - start, "score": done - generate_done}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._reference_pool.shutdown(wait=False, cancel_futures=True)


def sampling_params(ppo, end_id: int | None, greedy: bool) -> SamplingParams:
    """The rollout's sampling rules from `model.ppo` (`length_params`, `sampling_params`)."""
    return SamplingParams(
        max_new_tokens=ppo.length_params.max_length,
        min_new_tokens=ppo.length_params.min_length,
        temperature=ppo.sampling_params.temperature,
        top_k=ppo.sampling_params.top_k,
        top_p=ppo.sampling_params.top_p,
        greedy=greedy or ppo.sampling_params.use_greedy,
        end_id=end_id,
    )

