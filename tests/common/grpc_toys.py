"""Small real servicers for testing the gRPC plumbing (deterministic, no model).

- `ToyReference.LogProbs`: log p of each next token = -(token % 7) / 10, decoded and validated
  with the codec (vocab 100). Metadata `x-delay-s` makes it sleep first (deadlines, draining).
- `ToyCritic`: `Train` (client stream) counts chunks and sequences; `Save` answers UNAVAILABLE
  for the first `fail_times` calls (retries); `Load` raises NotFound or an unexpected error.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import torch
from aligner.v1 import critic_pb2, critic_pb2_grpc, reference_pb2, reference_pb2_grpc

from common.codec import flat_to_ragged_proto, ragged_from_proto, tokens_from_proto
from common.errors import NotFound, Unavailable

VOCAB = 100


def toy_logprobs(tokens: torch.Tensor) -> torch.Tensor:
    return -(tokens.to(torch.float32) % 7) / 10


def _metadata(context) -> dict[str, str]:
    return {key: value for key, value in context.invocation_metadata() or ()}


class ToyReference(reference_pb2_grpc.ReferenceServicer):
    def __init__(self) -> None:
        self.calls = 0

    async def LogProbs(self, request, context):
        self.calls += 1
        delay = float(_metadata(context).get("x-delay-s", 0))
        if delay:
            await asyncio.sleep(delay)
        tokens = tokens_from_proto(request.tokens, "tokens", vocab_size=VOCAB, min_length=1)
        rows = [toy_logprobs(row[1:]) for row in tokens.rows()]
        values = torch.cat(rows) if rows else torch.empty(0)
        return reference_pb2.LogProbsResponse(logprobs=flat_to_ragged_proto(values, [len(r) for r in rows]))


class ToyCritic(critic_pb2_grpc.CriticServicer):
    def __init__(self, fail_times: int = 0) -> None:
        self.fail_times = fail_times
        self.save_calls: Counter[str] = Counter()

    async def Train(self, request_iterator, context):
        chunks = sequences = 0
        async for chunk in request_iterator:
            tokens = tokens_from_proto(chunk.tokens, "tokens", vocab_size=VOCAB)
            ragged_from_proto(chunk.returns, "returns", kind="float")
            chunks += 1
            sequences += len(tokens)
        return critic_pb2.TrainResponse(step=chunks, metrics={"num_sequences": float(sequences)})

    async def Save(self, request, context):
        self.save_calls[request.path] += 1
        if self.save_calls[request.path] <= self.fail_times:
            raise Unavailable(f"not ready yet (attempt {self.save_calls[request.path]})")
        return critic_pb2.SaveResponse(path=request.path, step=self.save_calls[request.path])

    async def Load(self, request, context):
        if request.path == "missing":
            raise NotFound(f"checkpoint {request.path!r} does not exist")
        raise RuntimeError("secret internal detail")
