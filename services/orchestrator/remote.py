"""The orchestrator's view of the model services: reward-critic (or reward + critic), reference.

Every call has a deadline. A service that is down or restarting (UNAVAILABLE, or a deadline
missed while it restarts) is retried with exponential backoff for up to `retry_max_wait_s`;
then `ServiceDown` names the service and its endpoint. Scoring, values and logprobs are pure
functions of their input, so a retried call can never count a rollout twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc
import torch
from aligner.v1 import (
    critic_pb2,
    critic_pb2_grpc,
    reference_pb2,
    reference_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
)

from common import metrics
from common.codec import ragged_from_proto, ragged_to_proto, tensor_from_proto
from common.config import PpoConfig
from common.errors import AlignerError, Unavailable
from common.grpc_client import make_sync_channel, wait_for_health
from common.logging import get_logger

log = get_logger(__name__)
T = TypeVar("T")

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class ServiceDown(AlignerError):
    """A service stayed unreachable for longer than the retry budget."""

    def __init__(self, message: str, endpoint: Endpoint | None = None):
        super().__init__(message)
        self.endpoint = endpoint


def _retryable(exc: Exception) -> str | None:
    """Why `exc` is worth a retry (a service down or restarting), or None."""
    if isinstance(exc, grpc.RpcError) and exc.code() in _RETRYABLE:
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, Unavailable):  # the generation client's (tritonclient) way of saying it
        return str(exc)
    return None


class Endpoint:
    """One service at host:port, with a retrying call wrapper (and a gRPC channel when `channel`)."""

    def __init__(self, name: str, target: str, deadline_s: float, retry_max_wait_s: float, channel: bool = True):
        self.name, self.target = name, target
        self.deadline_s, self.retry_max_wait_s = deadline_s, retry_max_wait_s
        # gRPC's own retry policy is off: this class owns retries so that it can count them and
        # give up with a message naming the service.
        self.channel = (
            make_sync_channel(target, retry=None, wait_for_ready=False, default_timeout=deadline_s) if channel else None
        )

    def call(self, what: str, fn: Callable[[], T]) -> T:
        waited, backoff = 0.0, 0.5
        while True:
            try:
                return fn()
            except (grpc.RpcError, Unavailable) as exc:
                reason = _retryable(exc)
                if reason is None:
                    if isinstance(exc, grpc.RpcError):
                        raise AlignerError(
                            f"{self.name} at {self.target}: {what} failed: {exc.code().name}: {exc.details()}"
                        ) from None
                    raise
                if waited >= self.retry_max_wait_s:
                    raise ServiceDown(
                        f"{self.name} at {self.target} unreachable for {waited:.0f}s ({what}: {reason})", self
                    ) from None
                metrics.PPO_SERVICE_RETRIES.labels(self.name).inc()
                log.warning("service unavailable, retrying", target_service=self.name, target=self.target, call=what,
                            reason=reason, waited_s=round(waited, 1))  # fmt: skip
                time.sleep(backoff)
                waited += backoff
                backoff = min(backoff * 2, 8.0)

    def wait_ready(self, timeout: float) -> None:
        """Fail fast, naming the endpoint, when nothing healthy answers there."""
        try:
            wait_for_health(self.target, timeout=timeout)
        except AlignerError as exc:
            raise ServiceDown(f"{self.name}: {exc}", self) from None


def _tokens(sequences: list[torch.Tensor]):
    return ragged_to_proto([s.to(torch.int32) for s in sequences], dtype=torch.int32)


class RemoteModels:
    """reward, critic and reference calls used by one PPO step."""

    def __init__(self, cfg: PpoConfig):
        remote, rc = cfg.remote, cfg.remote_critic_rm
        args = (remote.deadline_s, remote.retry_max_wait_s)
        self.combined = rc.combine_rm_and_critic_server
        reward_name = "reward-critic" if self.combined else "reward"
        self.reward = Endpoint(reward_name, f"{rc.reward_model.ip}:{rc.reward_model.port}", *args)
        self.critic = self.reward if self.combined else Endpoint("critic", f"{rc.critic.ip}:{rc.critic.port}", *args)
        self.reference = Endpoint("reference", f"{remote.reference.ip}:{remote.reference.port}", *args)
        self._reward_stub = reward_pb2_grpc.RewardStub(self.reward.channel)
        self._critic_stub = critic_pb2_grpc.CriticStub(self.critic.channel)
        self._reference_stub = reference_pb2_grpc.ReferenceStub(self.reference.channel)

    def endpoints(self) -> list[Endpoint]:
        return [self.reward, self.reference] + ([] if self.combined else [self.critic])

    def score(self, sequences: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Rewards [B] and per-token critic values (L-1 each), in one round trip when combined."""
        request = reward_pb2.ScoreRequest(tokens=_tokens(sequences), return_values=self.combined)
        reply = self.reward.call("Score", lambda: self._reward_stub.Score(request))
        rewards = tensor_from_proto(reply.rewards, "rewards", kind="float").float()
        if self.combined:
            return rewards, ragged_from_proto(reply.values, "values", kind="float").rows()
        values_request = critic_pb2.ValuesRequest(tokens=_tokens(sequences))
        values = self.critic.call("Values", lambda: self._critic_stub.Values(values_request))
        return rewards, ragged_from_proto(values.values, "values", kind="float").rows()

    def ref_logprobs(self, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
        request = reference_pb2.LogProbsRequest(tokens=_tokens(sequences))
        reply = self.reference.call("LogProbs", lambda: self._reference_stub.LogProbs(request))
        return ragged_from_proto(reply.logprobs, "logprobs", kind="float").rows()

    def train_critic(self, sequences, mask_rows, returns_rows, old_value_rows, chunk_size: int) -> dict[str, float]:
        """Stream the rollout to the critic in chunks; it trains when the stream ends."""

        def chunks() -> Iterator[critic_pb2.TrainRequest]:
            for start in range(0, len(sequences), chunk_size):
                end = start + chunk_size
                yield critic_pb2.TrainRequest(
                    tokens=_tokens(sequences[start:end]),
                    mask=ragged_to_proto(mask_rows[start:end], dtype=torch.float32),
                    returns=ragged_to_proto(returns_rows[start:end], dtype=torch.float32),
                    old_values=ragged_to_proto(old_value_rows[start:end], dtype=torch.float32),
                )

        reply = self.critic.call("Train", lambda: self._critic_stub.Train(chunks()))
        return {f"critic_{k}": v for k, v in reply.metrics.items()} | {"critic_step": float(reply.step)}

    def save_critic(self, path: str) -> None:
        self.critic.call("Save", lambda: self._critic_stub.Save(critic_pb2.SaveRequest(path=path)))

    def load_critic(self, path: str) -> None:
        self.critic.call("Load", lambda: self._critic_stub.Load(critic_pb2.LoadRequest(path=path)))

    def reset_critic(self) -> None:
        """The critic's initial weights and a fresh optimizer, for a run that starts from step 0."""
        self.critic.call("Load", lambda: self._critic_stub.Load(critic_pb2.LoadRequest(initial=True)))
