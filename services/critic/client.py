"""A typed client for the critic (`aligner serve critic` or `reward-critic`).

    client = CriticClient("127.0.0.1:5556")
    values = client.values([[1, 5, 9, 2]])                       # [tensor of 3 values]
    metrics = client.train(tokens, mask, returns, old_values)   # rows; streamed in chunks
    client.save("/ckpt/critic"); client.load("/ckpt/critic")

Channel behaviour as in `services.reward.client`; failed calls raise `grpc.RpcError`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from aligner.v1 import critic_pb2, critic_pb2_grpc

from common.codec import ragged_from_proto, ragged_to_proto
from common.grpc_client import make_sync_channel

Rows = Sequence[Sequence[float] | torch.Tensor]


class CriticClient:
    def __init__(
        self, target: str, *, token: str | None = None, timeout: float = 300.0, stub=None, **channel_kwargs
    ):
        """`stub`: call this instead of a channel to `target` (the orchestrator's in-process
        services); `channel_kwargs` go to `make_sync_channel` (e.g. `retry=None`)."""
        self.target = target
        self.timeout = timeout
        self._channel = None
        self._stub = stub
        if stub is None:
            self._channel = make_sync_channel(target, token=token, default_timeout=timeout, **channel_kwargs)
            self._stub = critic_pb2_grpc.CriticStub(self._channel)

    def values(self, tokens: Sequence[Sequence[int] | torch.Tensor]) -> list[torch.Tensor]:
        reply = self._stub.Values(critic_pb2.ValuesRequest(tokens=_tokens(tokens)))
        return ragged_from_proto(reply.values, "values", kind="float").rows()

    def train(
        self, tokens, mask: Rows, returns: Rows, old_values: Rows, chunk_size: int = 64, rollout_id: str = ""
    ) -> tuple[int, dict[str, float]]:
        """Stream the rollout in `chunk_size`-row messages; -> (critic step, metrics).
        `rollout_id` (on the first message) makes a retry of the same rollout train at most once."""

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
        return reply.step, dict(reply.metrics)

    def save(self, path: str) -> int:
        return self._stub.Save(critic_pb2.SaveRequest(path=str(path))).step

    def load(self, path: str) -> int:
        return self._stub.Load(critic_pb2.LoadRequest(path=str(path))).step

    def reset(self) -> int:
        """Back to the critic's initial checkpoint with a fresh optimizer; returns its step (0)."""
        return self._stub.Load(critic_pb2.LoadRequest(initial=True)).step

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    def __enter__(self) -> CriticClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tokens(rows) -> object:
    return ragged_to_proto([torch.as_tensor(r, dtype=torch.int64) for r in rows], dtype=torch.int64)
