"""`aligner serve reference`: the frozen initial policy behind `aligner.v1.Reference/LogProbs`.

LogProbs returns log p(token[t+1] | tokens[..t]) for every position of every row (L-1 values per
row, float32), from the model's raw logits; concurrent requests are dynamically batched.
`checkpoint_path` is the policy the PPO run starts from (a value head, if saved, is ignored).
"""

from __future__ import annotations

import sys

import torch
from aligner.v1 import reference_pb2, reference_pb2_grpc

from common.codec import ragged_to_proto
from common.config import ModelServiceConfig
from common.grpc_server import GrpcServer
from services.model_server import Loadable, ModelWorker, decode_tokens, load_model, serve

SERVICE = "reference"


class ReferenceComponent(Loadable):
    """The frozen initial policy: loading and batched logprobs."""

    service = SERVICE

    def __init__(self, config: ModelServiceConfig, worker: ModelWorker):
        self.config = config
        self.worker = worker
        self.arch = None

    def add_to(self, server: GrpcServer) -> None:
        server.add_servicer(reference_pb2_grpc.add_ReferenceServicer_to_server, ReferenceServicer(self))

    def load(self) -> None:
        model, arch, _tokenizer = load_model(
            self.config.checkpoint_path, "checkpoint_path", value_head=False, seed=self.config.seed
        )
        self.arch = arch
        self.worker.add(SERVICE, model)

    def forward_chunk(self, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
        from trainer.model import sequence_logprobs

        model = self.worker.activate(SERVICE)
        return sequence_logprobs(model, sequences, micro_batch_size=len(sequences))

    async def logprobs(self, request: reference_pb2.LogProbsRequest) -> reference_pb2.LogProbsResponse:
        self.require_loaded("LogProbs")
        rows = await self.batcher.submit(decode_tokens(request.tokens, "tokens", self.arch))
        return reference_pb2.LogProbsResponse(logprobs=ragged_to_proto(rows, dtype=torch.float32))


class ReferenceServicer(reference_pb2_grpc.ReferenceServicer):
    def __init__(self, component: ReferenceComponent):
        self.component = component

    async def LogProbs(self, request, context):  # noqa: N802 - gRPC method name
        return await self.component.logprobs(request)


def build(config: ModelServiceConfig, worker: ModelWorker) -> list:
    return [ReferenceComponent(config, worker)]


def main(argv: list[str] | None = None) -> int:
    return serve(SERVICE, sys.argv[1:] if argv is None else argv, build)


if __name__ == "__main__":
    sys.exit(main())
