"""The services in the orchestrator's own process: an in-process twin of `RemoteModels`
(reward-critic + reference) and of `GenerationClient`, for measuring what the gRPC transport costs
(`benchmarks/bench_ppo.py`).

Each twin loads the model its server would load, from the same config, and calls the same trainer
code the server's handlers call (`trainer.model.sequence_rewards / sequence_values /
sequence_logprobs`, `trainer.critic.CriticTrainer`, `trainer.engine.TorchEngine`,
`trainer.checkpoint`), with no serialisation, sockets or batcher in between. As in the servers,
each "process" computes on one model thread of its own with `server.torch_threads` torch threads
(reward and critic share theirs, as in the reward-critic server), so calls never race on weights
and the orchestrator's threads overlap scoring with generation as they do over the network.

The methods and their results are exactly those the orchestrator uses:
`RemoteModels.{endpoints, score, ref_logprobs, train_critic, save_critic, load_critic,
reset_critic}` and
`GenerationClient.{generate, push_weights, wait_ready, info, close}`; `use_in_process(run, ...)`
points a `PpoRun` at them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from aligner.v1 import generation_pb2

from common.config import GenerationServiceConfig, ModelServiceConfig, to_dict
from common.errors import InvalidArgument
from services.generation.weights import StaleVersion
from trainer.engine import GenerationResult, SamplingParams

T = TypeVar("T")


class ModelThread:
    """One service process's model thread: every computation of its models runs here, in order."""

    def __init__(self, name: str, torch_threads: int):
        threads = max(1, int(torch_threads))
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"local-{name}",
            initializer=torch.set_num_threads,
            initargs=(threads,),
        )

    def run(self, fn: Callable[..., T], *args) -> T:
        return self._executor.submit(fn, *args).result()

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def _load(path: str | None, field: str, *, value_head: bool | None, seed: int):
    from trainer.checkpoint import load_model_for_inference

    if not path:
        raise InvalidArgument(field, "is not set")
    return load_model_for_inference(path, value_head=value_head, seed=seed)


class LocalModels:
    """reward-critic and reference in this process: the orchestrator's `RemoteModels` calls."""

    combined = True
    # RemoteModels' endpoints: none here (the orchestrator compares them when a service is down).
    reward = critic = reference = None

    def __init__(self, reward_critic: ModelServiceConfig, reference: ModelServiceConfig):
        self.config = reward_critic
        self._reward_thread = ModelThread("reward-critic", reward_critic.server.torch_threads)
        self._reference_thread = ModelThread("reference", reference.server.torch_threads)
        self._micro = reward_critic.batching.inference_micro_batch_size
        self._reference_micro = reference.batching.inference_micro_batch_size

        def load_reward():
            model, self.arch, self.tokenizer = _load(
                reward_critic.checkpoint_path, "checkpoint_path", value_head=None, seed=reward_critic.seed
            )
            if model.value_head is None:
                raise InvalidArgument("checkpoint_path", f"{reward_critic.checkpoint_path} has no value head")
            return model

        self.reward_model = self._reward_thread.run(load_reward)
        self.reset_critic()
        self.reference_model, _, _ = self._reference_thread.run(
            lambda: _load(reference.checkpoint_path, "checkpoint_path", value_head=False, seed=reference.seed)
        )

    def reset_critic(self) -> None:
        """The critic from its initial checkpoint (`critic_checkpoint_path`, else the reward model)
        with a fresh optimizer, as the server's `Load(initial=true)`."""
        from trainer.critic import CriticTrainer

        config = self.config
        field = "critic_checkpoint_path" if config.critic_checkpoint_path else "checkpoint_path"

        def load_critic():
            critic, _, _ = _load(getattr(config, field), field, value_head=True, seed=config.seed)
            trainer = CriticTrainer(
                critic,
                config.model,
                gradient_clip_val=config.trainer.gradient_clip_val,
                max_steps=config.trainer.ppo.max_steps,
            )
            return critic, trainer

        self.critic_model, self.critic_trainer = self._reward_thread.run(load_critic)

    def endpoints(self) -> list:
        return []  # nothing to wait for: the models are loaded

    def score(self, sequences: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Rewards [B] and per-token critic values (L-1 each)."""
        from trainer.model import sequence_rewards, sequence_values

        def run():
            rewards = sequence_rewards(self.reward_model, sequences, self._micro).float()
            return rewards, sequence_values(self.critic_model, sequences, self._micro)

        return self._reward_thread.run(run)

    def ref_logprobs(self, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
        from trainer.model import sequence_logprobs

        return self._reference_thread.run(
            sequence_logprobs, self.reference_model, sequences, self._reference_micro
        )

    def train_critic(
        self, sequences, mask_rows, returns_rows, old_value_rows, chunk_size: int
    ) -> dict[str, float]:
        """One critic pass over the rollout (`chunk_size` only cuts the stream over gRPC)."""
        from trainer.critic import pad_rollout

        if not sequences:
            raise InvalidArgument("tokens", "the rollout has no rows")
        tokens = [s.to(torch.long) for s in sequences]
        floats = lambda rows: [r.to(torch.float32) for r in rows]  # noqa: E731
        batch = pad_rollout(tokens, floats(mask_rows), floats(returns_rows), floats(old_value_rows))
        result = self._reward_thread.run(self.critic_trainer.train, batch)
        return {f"critic_{k}": v for k, v in result.items()} | {
            "critic_step": float(self.critic_trainer.step)
        }

    def save_critic(self, path: str) -> None:
        from trainer.checkpoint import save_checkpoint

        trainer = self.critic_trainer
        self._reward_thread.run(lambda: save_checkpoint(
            path, self.critic_model, trainer.optimizer, trainer.scheduler, step=trainer.step, arch=self.arch,
            config=to_dict(self.config), tokenizer=self.tokenizer, extra={"kind": "critic"},
        ))  # fmt: skip

    def load_critic(self, path: str) -> None:
        from trainer.checkpoint import load_checkpoint
        from trainer.critic import move_optimizer_state

        trainer = self.critic_trainer

        def load():
            meta = load_checkpoint(
                path, self.critic_model, trainer.optimizer, trainer.scheduler, restore_rng=False
            )
            trainer.step = meta.step
            self.critic_model.eval()
            if self.config.model.offload_adam_states:
                move_optimizer_state(trainer.optimizer, "cpu")

        self._reward_thread.run(load)

    def close(self) -> None:
        self._reward_thread.close()
        self._reference_thread.close()


class LocalGeneration:
    """The sampling engine in this process: the orchestrator's `GenerationClient` calls, with the
    server's rules (greedy = top-1, the checkpoint's end id by default, versions only grow, a
    request never runs on weights older than it asks for) and the client's result conventions."""

    def __init__(self, config: GenerationServiceConfig):
        # The server's own engine construction (checkpoint, engine kind and options, limits).
        from services.generation.server import build_engine, check_engine_available

        check_engine_available(config)
        self.config = config
        self._thread = ModelThread("generation", config.server.torch_threads)
        self.engine, self.limits = self._thread.run(build_engine, config)
        # Held from a request's version check to its last token, and by weight updates.
        self._lock = threading.Lock()

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        min_new_tokens: int = 0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        greedy: bool = False,
        end_id: int | None = None,
        seed: int | None = None,
        seeds: Sequence[int | None] | None = None,
        policy_version: int | None = None,
    ) -> list[GenerationResult]:
        prompts = [list(map(int, p)) for p in prompts]
        if seeds is None:
            seeds = [seed] * len(prompts)
        if len(seeds) != len(prompts):
            raise InvalidArgument("seeds", f"{len(seeds)} seeds for {len(prompts)} prompts")
        greedy = greedy or temperature == 0.0 or top_k == 1  # the server's reading of top-1
        engine_end = end_id if end_id is not None else self.limits.default_end_id
        params = [
            SamplingParams(
                max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                temperature=1.0 if greedy else temperature, top_k=0 if greedy else top_k,
                top_p=1.0 if greedy else top_p, greedy=greedy, end_id=engine_end,
                seed=None if greedy or s is None else int(s),
            )
            for s in seeds
        ]  # fmt: skip

        def run():
            with self._lock:
                if policy_version is not None and policy_version > self.engine.policy_version:
                    raise StaleVersion(
                        f"policy_version: the request needs policy version {policy_version}, but the engine "
                        f"serves version {self.engine.policy_version}"
                    )
                return self.engine.generate(prompts, params)

        results = self._thread.run(run)
        # The client's conventions: `ended` also when it stopped before max_new_tokens.
        return [
            GenerationResult(
                tokens=r.tokens, logprobs=r.logprobs, policy_version=r.policy_version,
                ended=(bool(r.tokens) and end_id is not None and r.tokens[-1] == end_id)
                or len(r.tokens) < max_new_tokens,
            )
            for r in results
        ]  # fmt: skip

    def push_weights(
        self, state_dict: Mapping[str, torch.Tensor], version: int
    ) -> generation_pb2.UpdateWeightsResponse:
        """Copy the weights into the engine's own model as policy `version` (newer than its own)."""
        weights = {
            k: v.detach()
            for k, v in state_dict.items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
        }

        def apply():
            with self._lock:
                if version <= self.engine.policy_version:
                    raise StaleVersion(
                        f"policy_version: {version} is not newer than the engine's version {self.engine.policy_version}"
                    )
                self.engine.load_state_dict(weights, strict=True, policy_version=version)

        self._thread.run(apply)
        num_bytes = sum(t.numel() * t.element_size() for t in weights.values())
        return generation_pb2.UpdateWeightsResponse(
            policy_version=version, num_tensors=len(weights), num_bytes=num_bytes
        )

    def info(self) -> generation_pb2.InfoResponse:
        return generation_pb2.InfoResponse(
            model_name=self.config.triton_model_name,
            engine=self.config.engine,
            policy_version=int(self.engine.policy_version),
            vocab_size=self.limits.vocab_size,
            max_seq_len=self.limits.max_seq_len,
            end_id=-1 if self.limits.default_end_id is None else self.limits.default_end_id,
            pad_id=self.limits.default_pad_id,
        )

    def wait_ready(self, timeout_s: float = 60.0) -> generation_pb2.InfoResponse:
        return self.info()  # loaded in the constructor

    def close(self) -> None:
        self._thread.close()


def use_in_process(run, models: LocalModels, generation: LocalGeneration) -> None:
    """Point a `services.orchestrator.run.PpoRun` at the in-process twins (before `connect()`)."""
    run.remote = run.collector.remote = models
    run.generation = run.collector.generation = generation
