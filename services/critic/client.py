"""A typed client for the critic (`aligner serve critic` or `reward-critic`).

    client = CriticClient("127.0.0.1:5556")
    values = client.values([[1, 5, 9, 2]])                       # [tensor of 3 values]
    step, metrics = client.train(tokens, mask, returns, old_values, rollout_id="run-7:12")
    result = client.train_rollout(tokens, mask, returns, old_values, rollout_id="run-7:12")
    result.step, result.metrics, result.replayed                 # replayed: applied before
    client.save("critic/step_000012"); client.load("critic/step_000012")
    client.info().incarnation                                    # changes when the critic restarts

`train` may be retried with the same `rollout_id`: the critic applies each id at most once (a
retry answers the first call's step and metrics; `train_rollout` also says it was `replayed`).
Channel behaviour as in `services.reward.client`; failed calls raise `grpc.RpcError`. Pass
`stub=` (anything with the `aligner.v1.Critic` stub's methods) to call it instead of a channel.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from aligner.v1 import critic_pb2, critic_pb2_grpc

from common.codec import ragged_from_proto, ragged_to_proto
from common.grpc_client import make_sync_channel

Rows = Sequence[Sequence[float] | torch.Tensor]


class TrainResult(NamedTuple):
    step: int  # critic optimizer steps when this rollout was applied
    metrics: dict[str, float]
    replayed: bool  # the rollout had been applied before: this call trained nothing


@dataclass(frozen=True)
class CriticInfo:
    step: int
    incarnation: str  # new at every start of the critic process
    last_rollout_id: str  # "" when none was applied to the current weights
    initial: bool  # weights from the initial checkpoint (not from a Load of a path)
    checkpoint_path: str  # the initial checkpoint, or the last loaded path
    remembered_rollouts: int


class CriticClient:
    def __init__(
        self,
        target: str | None = None,
        *,
        token: str | None = None,
        timeout: float = 300.0,
        stub=None,
        **channel_kwargs,
    ):
        """`target` (host:port) builds a channel (`token`, `timeout` and `channel_kwargs` go to
        `make_sync_channel`); `stub` is called instead when given (the in-process services)."""
        self.target = target
        self.timeout = timeout
        if stub is not None:
            self._channel = None
            self._stub = stub
        elif target:
            self._channel = make_sync_channel(target, token=token, default_timeout=timeout, **channel_kwargs)
            self._stub = critic_pb2_grpc.CriticStub(self._channel)
        else:
            raise ValueError("CriticClient needs a target or a stub")

    def values(self, tokens: Sequence[Sequence[int] | torch.Tensor]) -> list[torch.Tensor]:
        reply = self._stub.Values(critic_pb2.ValuesRequest(tokens=_tokens(tokens)))
        return ragged_from_proto(reply.values, "values", kind="float").rows()

    def train(
        self, tokens, mask: Rows, returns: Rows, old_values: Rows, chunk_size: int = 64, *, rollout_id: str
    ) -> tuple[int, dict[str, float]]:
        """Stream the rollout in `chunk_size`-row messages, `rollout_id` on the first; -> (critic
        step, metrics). The same id on a retry never trains the rollout twice."""
        step, metrics, _ = self.train_rollout(
            tokens, mask, returns, old_values, chunk_size, rollout_id=rollout_id
        )
        return step, metrics

    def train_rollout(
        self, tokens, mask: Rows, returns: Rows, old_values: Rows, chunk_size: int = 64, *, rollout_id: str
    ) -> TrainResult:
        """`train`, answering whether the rollout had been applied before (`replayed`)."""

        def chunks() -> Iterator[critic_pb2.TrainRequest]:
            for start in range(0, len(tokens), chunk_size):
                end = start + chunk_size
                yield critic_pb2.TrainRequest(
                    tokens=_tokens(tokens[start:end]),
                    mask=ragged_to_proto(mask[start:end], dtype=torch.float32),
                    returns=ragged_to_proto(returns[start:end], dtype=torch.float32),
                    old_values=ragged_to_proto(old_values[start:end], dtype=torch.float32),
                    rollout_id=rollout_id if start == 0 else "",
                )

        reply = self._stub.Train(chunks())
        return TrainResult(reply.step, dict(reply.metrics), reply.replayed)

    def save(self, path: str) -> int:
        return self._stub.Save(critic_pb2.SaveRequest(path=str(path))).step

    def load(self, path: str) -> int:
        return self._stub.Load(critic_pb2.LoadRequest(path=str(path))).step

    def reset(self) -> int:
        """Back to the critic's initial checkpoint with a fresh optimizer; returns its step (0)."""
        return self._stub.Load(critic_pb2.LoadRequest(initial=True)).step

    def info(self) -> CriticInfo:
        reply = self._stub.Info(critic_pb2.CriticInfoRequest())
        return CriticInfo(
            step=reply.step, incarnation=reply.incarnation, last_rollout_id=reply.last_rollout_id,
            initial=reply.initial, checkpoint_path=reply.checkpoint_path,
            remembered_rollouts=reply.remembered_rollouts,
        )  # fmt: skip

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    def __enter__(self) -> CriticClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tokens(rows) -> object:
    return ragged_to_proto([torch.as_tensor(r, dtype=torch.int64) for r in rows], dtype=torch.int64)
