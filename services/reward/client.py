"""A typed client for the scoring endpoint.

    from services.reward.client import RewardClient

    with RewardClient("scores.example.com:443", token="...", tls=True) as client:
        client.score(texts=["\\n\\nHuman: Hi\\n\\nAssistant: Hello!"]).rewards      # tensor [1]
        client.score(tokens=[[1, 17, 42, 2]]).rewards

The channel (`common.grpc_client.make_sync_channel`) retries UNAVAILABLE with backoff, waits for
the server to be ready, puts a deadline on every call (`timeout`, default 60 s) and sends the bearer
token (TLS: as call credentials; plaintext: as `authorization` metadata). mTLS: pass `ca_file`,
`cert_file` and `key_file`. Failed calls raise `grpc.RpcError` (`.code()`, `.details()`; a
malformed request is INVALID_ARGUMENT naming the field).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from aligner.v1 import reward_pb2, reward_pb2_grpc

from common.codec import ragged_from_proto, ragged_to_proto, tensor_from_proto
from common.grpc_client import make_sync_channel


@dataclass
class Scores:
    rewards: torch.Tensor  # float32 [num_sequences]
    values: list[torch.Tensor] | None = None  # per-token critic values (L-1 each), reward-critic only


class RewardClient:
    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool = False,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        server_name: str | None = None,
        timeout: float = 60.0,
        max_message_mb: int = 256,
        stub=None,
        **channel_kwargs,
    ):
        """`stub`: call this instead of a channel to `target` (the orchestrator's in-process
        services); `channel_kwargs` go to `make_sync_channel` (e.g. `retry=None`)."""
        self.target = target
        self.timeout = timeout
        self._channel = None
        self._stub = stub
        if stub is None:
            self._channel = make_sync_channel(
                target, tls=tls, ca_file=ca_file, cert_file=cert_file, key_file=key_file, server_name=server_name,
                token=token, default_timeout=timeout, max_message_mb=max_message_mb, **channel_kwargs,
            )  # fmt: skip
            self._stub = reward_pb2_grpc.RewardStub(self._channel)

    def score(
        self,
        texts: Sequence[str] | None = None,
        tokens: Sequence[Sequence[int] | torch.Tensor] | None = None,
        *,
        return_values: bool = False,
        timeout: float | None = None,
    ) -> Scores:
        """Score `texts` (tokenised by the server) or `tokens` (rows of ids, scored as given):
        one reward per sequence, and with `return_values` the critic's values too."""
        if (texts is None) == (tokens is None):
            raise ValueError("pass exactly one of texts= or tokens=")
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        if texts is not None:
            request = reward_pb2.ScoreRequest(
                texts=reward_pb2.TextBatch(texts=list(texts)), return_values=return_values
            )
        else:
            rows = [torch.as_tensor(row, dtype=torch.int64) for row in tokens]
            request = reward_pb2.ScoreRequest(
                tokens=ragged_to_proto(rows, dtype=torch.int64), return_values=return_values
            )
        reply = self._stub.Score(request, timeout=self.timeout if timeout is None else timeout)
        rewards = tensor_from_proto(reply.rewards, "rewards", kind="float").float()
        values = (
            ragged_from_proto(reply.values, "values", kind="float").rows()
            if reply.HasField("values")
            else None
        )
        return Scores(rewards=rewards, values=values)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
