"""A typed client for the reference policy (`aligner serve reference`).

    logprobs = ReferenceClient("127.0.0.1:5557").logprobs([[1, 5, 9, 2]])   # [tensor of 3]

Channel behaviour as in `services.reward.client`; failed calls raise `grpc.RpcError`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from aligner.v1 import reference_pb2, reference_pb2_grpc

from common.codec import ragged_from_proto, ragged_to_proto
from common.grpc_client import make_sync_channel


class ReferenceClient:
    def __init__(
        self, target: str, *, token: str | None = None, timeout: float = 300.0, stub=None, **channel_kwargs
    ):
        """`stub`: call this instead of a channel to `target` (the orchestrator's in-process
        services); `channel_kwargs` go to `make_sync_channel`."""
        self.target = target
        self.timeout = timeout
        self._channel = None
        self._stub = stub
        if stub is None:
            self._channel = make_sync_channel(target, token=token, default_timeout=timeout, **channel_kwargs)
            self._stub = reference_pb2_grpc.ReferenceStub(self._channel)

    def logprobs(self, tokens: Sequence[Sequence[int] | torch.Tensor]) -> list[torch.Tensor]:
        """log p(token[t+1] | tokens[..t]) per row (L-1 values each)."""
        rows = [torch.as_tensor(r, dtype=torch.int64) for r in tokens]
        reply = self._stub.LogProbs(
            reference_pb2.LogProbsRequest(tokens=ragged_to_proto(rows, dtype=torch.int64)), timeout=self.timeout
        )
        return ragged_from_proto(reply.logprobs, "logprobs", kind="float").rows()

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    def __enter__(self) -> ReferenceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
