"""How the orchestrator reaches the services: two small protocols, one implementation of each.

`PpoRun` needs a **Scorer** (rewards, critic values and training, reference logprobs) and a
**Generator** (rollouts, weight pushes). Both are built on the typed clients of
`services/*/client.py`, the only code that builds requests, held in replica sets
(`common.replicas`):

- over gRPC (`connect(cfg)`): every endpoint of the config is a replica set; calls spread over
  the healthy replicas and fail over when one goes down;
- in the orchestrator's own process (`services.orchestrator.in_process`, for the benchmarks):
  the same classes over clients whose stubs call the server components directly.

The critic is single-writer: it must be exactly one server (in combined mode, the reward-critic
server), because a rollout trains it once and the next step's values must come from the
trained copy. Its `Train` carries a rollout id so that a retry never trains twice.

A generation replica is one pod: its Triton endpoint and its `aligner.v1.Generation` endpoint
(weight pushes) always address the same pod. A weight push goes to every healthy replica; a
replica that missed one (restarted, new pod, down during the push) is resynced by its probe before
it is used again, and a step only generates on replicas that serve the current version.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from common.config import Endpoint, PpoConfig, ServerConfig
from common.errors import InvalidArgument
from common.grpc_client import wait_for_health
from common.grpc_server import read_auth_token
from common.logging import get_logger
from common.replicas import Replica, ReplicaSet, expand, join_address, resolve_host, split_address
from services.critic.client import CriticClient
from services.generation.client import GenerationClient
from services.generation.weights import StaleVersion
from services.reference.client import ReferenceClient
from services.reward.client import RewardClient
from trainer.engine import GenerationResult, SamplingParams

log = get_logger(__name__)

PROBE_TIMEOUT_S = 2.0


class Scorer(Protocol):
    critic_service: str  # the name a ServiceDown carries when the critic is what went down

    def wait_ready(self, timeout_s: float) -> None: ...
    def score(self, sequences: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]: ...
    def ref_logprobs(self, sequences: list[torch.Tensor]) -> list[torch.Tensor]: ...
    def train_critic(self, rollout_id: str, sequences, mask_rows, returns_rows, old_value_rows,
                     chunk_size: int) -> dict[str, float]: ...  # fmt: skip
    def save_critic(self, path: str) -> None: ...
    def load_critic(self, path: str) -> int: ...  # the critic's step
    def reset_critic(self) -> int: ...
    def critic_step(self) -> int: ...
    def close(self) -> None: ...


class Generator(Protocol):
    def wait_ready(self, timeout_s: float) -> int: ...  # the newest policy version served
    def engines(self) -> set[str]: ...  # the engines the replicas run (torch, tensorrt_llm)
    def push_weights(self, weights: Mapping[str, torch.Tensor], version: int) -> None: ...
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, seeds: Sequence[int],
                 policy_version: int) -> list[GenerationResult]: ...  # fmt: skip
    def concurrency(self) -> int: ...  # how many generate calls may usefully run at once
    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# Model services: reward, critic, reference
# ---------------------------------------------------------------------------------------------


@dataclass
class ServerClients:
    """The typed clients of one model-server replica, one per service it serves."""

    reward: RewardClient | None = None
    critic: CriticClient | None = None
    reference: ReferenceClient | None = None

    def close(self) -> None:
        for client in (self.reward, self.critic, self.reference):
            if client is not None:
                client.close()


class ModelServices:
    """The Scorer: reward and reference replica sets, and the one critic (the same set as the
    reward when the reward-critic server combines them)."""

    def __init__(self, reward: ReplicaSet[ServerClients], critic: ReplicaSet[ServerClients],
                 reference: ReplicaSet[ServerClients]):  # fmt: skip
        self.reward, self.critic, self.reference = reward, critic, reference
        self.combined = reward is critic
        self.critic_service = critic.name

    def sets(self) -> list[ReplicaSet[ServerClients]]:
        return [self.reward, self.reference] + ([] if self.combined else [self.critic])

    def wait_ready(self, timeout_s: float) -> None:
        for replicas in self.sets():
            replicas.wait_ready(timeout_s)

    def score(self, sequences: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Rewards [B] and per-token critic values (L-1 each), in one round trip when combined."""
        if self.combined:
            scores = self.critic.call("Score", lambda r: r.client.reward.score(tokens=sequences, return_values=True))
            return scores.rewards, scores.values
        rewards = self.reward.call("Score", lambda r: r.client.reward.score(tokens=sequences).rewards)
        return rewards, self.critic.call("Values", lambda r: r.client.critic.values(sequences))

    def ref_logprobs(self, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.reference.call("LogProbs", lambda r: r.client.reference.logprobs(sequences))

    def train_critic(self, rollout_id: str, sequences, mask_rows, returns_rows, old_value_rows,
                     chunk_size: int) -> dict[str, float]:  # fmt: skip
        """Stream the rollout to the critic; a retry of the same `rollout_id` never trains twice."""
        step, result = self.critic.call("Train", lambda r: r.client.critic.train(
            sequences, mask_rows, returns_rows, old_value_rows, chunk_size=chunk_size, rollout_id=rollout_id,
        ))  # fmt: skip
        return {f"critic_{k}": v for k, v in result.items()} | {"critic_step": float(step)}

    def save_critic(self, path: str) -> None:
        self.critic.call("Save", lambda r: r.client.critic.save(path))

    def load_critic(self, path: str) -> int:
        """Load a critic checkpoint; returns the critic's optimizer step."""
        return int(self.critic.call("Load", lambda r: r.client.critic.load(path)))

    def reset_critic(self) -> int:
        """The critic's initial weights and a fresh optimizer, for a run that starts from step 0."""
        return int(self.critic.call("Load", lambda r: r.client.critic.reset()))

    def critic_step(self) -> int:
        """The critic's optimizer step now (a restarted critic starts again from its initial one)."""
        return int(self.critic.call("Info", lambda r: r.client.critic.info().step))

    def close(self) -> None:
        for replicas in self.sets():
            replicas.close()


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


class GenerationReplicas:
    """The Generator: generation pods that all serve the current policy version."""

    def __init__(self, name: str, *, resolve, connect, deadline_base_s: float, deadline_per_token_s: float,
                 **replica_settings):  # fmt: skip
        self.deadline_base_s, self.deadline_per_token_s = deadline_base_s, deadline_per_token_s
        self.version = 0  # the version every replica must serve; 0 = none pushed yet
        self._weights: Mapping[str, torch.Tensor] | None = None
        self._push_lock = threading.Lock()  # one push (or resync) at a time per orchestrator
        self.replicas: ReplicaSet[GenerationClient] = ReplicaSet(
            name, resolve=resolve, connect=connect, probe=self._probe, **replica_settings
        )

    def _probe(self, replica: Replica[GenerationClient]) -> bool:
        """Healthy = Triton's model is ready and the pod serves the current version (a pod that
        missed a push gets it now)."""
        served = int(replica.client.info().policy_version)
        if not replica.client.transport.is_model_ready():
            return False
        if self._weights is None or served == self.version:
            return True
        if served > self.version:
            log.warning("generation replica serves a newer policy than this run; not used",
                        replica=replica.address, served=served, version=self.version)  # fmt: skip
            return False
        self._resync(replica)
        return True

    def _resync(self, replica: Replica[GenerationClient]) -> None:
        with self._push_lock:
            weights, version = self._weights, self.version
        log.info("resyncing generation replica", replica=replica.address, version=version)
        replica.client.push_weights(weights, version)

    def wait_ready(self, timeout_s: float) -> int:
        self.replicas.wait_ready(timeout_s)
        return self.served_version()

    def engines(self) -> set[str]:
        return set(self.replicas.call_each("Info", lambda r: r.client.info().engine).values())

    def served_version(self) -> int:
        """The newest version any healthy replica serves (a new push must be newer)."""
        served = self.replicas.call_each("Info", lambda r: int(r.client.info().policy_version))
        return max(served.values())

    def push_weights(self, weights: Mapping[str, torch.Tensor], version: int) -> None:
        with self._push_lock:
            self._weights, self.version = weights, version
        self.replicas.call_each("UpdateWeights", lambda r: r.client.push_weights(weights, version))

    def generate(self, prompts, sampling: SamplingParams, seeds, policy_version: int) -> list[GenerationResult]:
        """One micro-batch on one replica. Its deadline is sized to its work; a replica that goes
        down mid-call hands the same call (same seeds) to another."""
        deadline = self.deadline_base_s + self.deadline_per_token_s * len(prompts) * sampling.max_new_tokens

        def generate_on(replica: Replica[GenerationClient]) -> list[GenerationResult]:
            def call():
                return replica.client.generate(
                    prompts, max_new_tokens=sampling.max_new_tokens, min_new_tokens=sampling.min_new_tokens,
                    temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                    greedy=sampling.greedy, end_id=sampling.end_id, seeds=list(seeds),
                    policy_version=policy_version, timeout_s=deadline,
                )  # fmt: skip

            try:
                return call()
            except StaleVersion:  # it restarted since its last probe: resync, then this call
                if self._weights is None:
                    raise
                self._resync(replica)
                return call()

        return self.replicas.call("Generate", generate_on)

    def concurrency(self) -> int:
        return max(1, len(self.replicas.healthy()))

    def close(self) -> None:
        self.replicas.close()


# ---------------------------------------------------------------------------------------------
# From the config
# ---------------------------------------------------------------------------------------------


def addresses(endpoint: Endpoint, key: str) -> list[str]:
    """The configured "host:port" list of an endpoint (its `replicas`, else `ip:port`)."""
    listed = endpoint.replicas or [join_address(endpoint.ip, endpoint.port)]
    for i, address in enumerate(listed):
        split_address(address, f"{key}.replicas[{i}]" if endpoint.replicas else key)
    return list(listed)


def single(endpoint: Endpoint, key: str) -> list[str]:
    """The critic's one address: several replicas would each train on a part of the rollouts."""
    found = expand(addresses(endpoint, key), key)
    if len(found) != 1:
        raise InvalidArgument(
            key,
            f"resolves to {len(found)} addresses ({', '.join(found)}); the critic is single-writer and "
            "must be exactly one server (see docs/deploy.md)",
        )
    return found


def generation_pairs(triton: Endpoint, control: Endpoint) -> list[str]:
    """One "triton+control" address pair per generation pod: by position for lists (each entry one
    pod), by resolved IP for one name (the same pod on both ports)."""
    if triton.replicas or control.replicas:
        if len(triton.replicas) != len(control.replicas):
            raise InvalidArgument(
                "remote.generation_control.replicas",
                f"has {len(control.replicas)} entries for {len(triton.replicas)} in remote.generation.replicas: "
                "list one control address per generation pod, in the same order",
            )
        pairs = []
        for i, (t, c) in enumerate(zip(triton.replicas, control.replicas, strict=True)):
            one = [single_pod(t, f"remote.generation.replicas[{i}]"), single_pod(c, f"remote.generation_control.replicas[{i}]")]
            pairs.append("+".join(one))
        return pairs
    if triton.ip == control.ip:  # one name for the pods: pair their two ports per IP
        return [f"{join_address(ip, triton.port)}+{join_address(ip, control.port)}"
                for ip in resolve_host(triton.ip, "remote.generation.ip")]  # fmt: skip
    return [f"{single_pod(addresses(triton, 'remote.generation')[0], 'remote.generation.ip')}+"
            f"{single_pod(addresses(control, 'remote.generation_control')[0], 'remote.generation_control.ip')}"]


def single_pod(address: str, key: str) -> str:
    found = expand([address], key)
    if len(found) != 1:
        raise InvalidArgument(key, f"{address} resolves to {len(found)} pods; pair each pod's two addresses instead")
    return found[0]


def connect(cfg: PpoConfig) -> tuple[ModelServices, GenerationReplicas]:
    """The Scorer and Generator over gRPC, from `remote` and `remote_critic_rm`. Addresses are
    checked (and resolved) here: a bad one fails at startup, naming its key."""
    remote, rc = cfg.remote, cfg.remote_critic_rm
    settings = dict(retry_max_wait_s=remote.retry_max_wait_s, resolve_interval_s=remote.resolve_interval_s,
                    probe_interval_s=remote.probe_interval_s)  # fmt: skip
    token = read_auth_token(ServerConfig(auth_token=remote.auth_token, auth_token_file=remote.auth_token_file),
                            prefix="remote.")  # fmt: skip
    # The retry policy is the replica set's: channels fail fast, so that a call can move on.
    channel = dict(timeout=remote.deadline_s, token=token, retry=None, wait_for_ready=False)

    def probe(replica: Replica[ServerClients]) -> bool:
        wait_for_health(replica.address, timeout=PROBE_TIMEOUT_S, token=token)
        return True

    def model_set(name: str, resolve, make) -> ReplicaSet[ServerClients]:
        return ReplicaSet(name, resolve=resolve, connect=make, probe=probe, **settings)

    def spread(endpoint: Endpoint, key: str):
        listed = addresses(endpoint, key)
        return lambda: expand(listed, key)

    # Every resolution of the critic (also the periodic ones) must give exactly one address.
    critic_key = "remote_critic_rm.critic"
    one_critic = lambda: single(rc.critic, critic_key)  # noqa: E731
    if rc.combine_rm_and_critic_server:
        reward = critic = model_set("reward-critic", one_critic, lambda a: ServerClients(
            reward=RewardClient(a, **channel), critic=CriticClient(a, **channel)))  # fmt: skip
    else:
        reward = model_set("reward", spread(rc.reward_model, "remote_critic_rm.reward_model"),
                           lambda a: ServerClients(reward=RewardClient(a, **channel)))
        critic = model_set("critic", one_critic, lambda a: ServerClients(critic=CriticClient(a, **channel)))
    reference = model_set("reference", spread(remote.reference, "remote.reference"),
                          lambda a: ServerClients(reference=ReferenceClient(a, **channel)))
    scorer = ModelServices(reward, critic, reference)

    def generation_client(pair: str) -> GenerationClient:
        triton_url, control_url = pair.split("+")
        return GenerationClient(triton_url, control_url, timeout_s=remote.deadline_s, auth_token=token,
                                retry=None, wait_for_ready=False)  # fmt: skip

    generator = GenerationReplicas(
        "generation", resolve=lambda: generation_pairs(remote.generation, remote.generation_control),
        connect=generation_client, deadline_base_s=remote.generate_deadline_base_s,
        deadline_per_token_s=remote.generate_deadline_per_token_s, **settings,
    )  # fmt: skip
    log.info("services", **{name: [r.address for r in replicas.replicas()] for name, replicas in (
        ("generation", generator.replicas), ("reward", reward), ("critic", critic), ("reference", reference))})  # fmt: skip
    return scorer, generator
