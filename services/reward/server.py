"""`aligner serve reward`: the reward model behind `aligner.v1.Reward/Score`.

Score takes token rows (scored as given: the caller includes the EOS if the sequence ended) or
texts (tokenised here as the reward model was trained: BOS, prompt, response, EOS;
`services.model_server.encode_texts`), and returns
one reward per sequence: the value head at the sequence's last token. Concurrent requests are
merged by the dynamic batcher. It is also the public scoring endpoint: set `server.auth_token`
(or `auth_token_file`) and/or `server.tls.*` for bearer-token and mTLS auth;
`server.max_message_mb` bounds request sizes; clients set their own deadlines.

With a critic attached (the reward-critic server), `return_values=true` also returns the
critic's per-token values for the same sequences, computed concurrently.
"""

from __future__ import annotations

import asyncio
import sys

import torch
from aligner.v1 import reward_pb2, reward_pb2_grpc

from common.codec import ragged_to_proto, tensor_to_proto
from common.config import ModelServiceConfig
from common.errors import InvalidArgument
from common.grpc_server import GrpcServer
from services.model_server import (
    Loadable,
    ModelWorker,
    decode_tokens,
    encode_texts,
    load_model,
    load_tokenizer,
    serve,
)

SERVICE = "reward"


class RewardComponent(Loadable):
    """The reward model: loading, its batcher, and scoring."""

    service = SERVICE

    def __init__(self, config: ModelServiceConfig, worker: ModelWorker, critic=None):
        self.config = config
        self.worker = worker
        self.critic = critic  # a services.critic.server.CriticComponent, for return_values
        self.arch = None
        self.tokenizer = None

    def add_to(self, server: GrpcServer) -> None:
        server.add_servicer(reward_pb2_grpc.add_RewardServicer_to_server, RewardServicer(self))

    def load(self) -> None:
        model, arch, tokenizer = load_model(
            self.config.checkpoint_path, "checkpoint_path", value_head=None, seed=self.config.seed
        )
        if model.value_head is None:
            raise InvalidArgument(
                "checkpoint_path",
                f"{self.config.checkpoint_path} has no value head: it is not a reward model",
            )
        self.arch = arch
        self.tokenizer = load_tokenizer(self.config, tokenizer, arch)
        self.worker.add(SERVICE, model)

    def forward_chunk(self, sequences: list[torch.Tensor]) -> list[float]:
        from trainer.model import sequence_rewards

        model = self.worker.activate(SERVICE)
        return sequence_rewards(model, sequences, micro_batch_size=len(sequences)).tolist()

    def sequences(self, request: reward_pb2.ScoreRequest) -> list[torch.Tensor]:
        """The request's sequences, validated (token rows) or tokenised (texts)."""

        which = request.WhichOneof("input")
        if which == "tokens":
            return decode_tokens(request.tokens, "tokens", self.arch)
        if which == "texts":
            return encode_texts(self.tokenizer, list(request.texts.texts), "texts.texts", self.arch)
        raise InvalidArgument("input", "set either tokens or texts")

    async def score(self, request: reward_pb2.ScoreRequest) -> reward_pb2.ScoreResponse:
        self.require_loaded("Score")
        if request.return_values and self.critic is None:
            raise InvalidArgument(
                "return_values", "this server has no critic (serve reward-critic for rewards + values)"
            )
        sequences = self.sequences(request)
        if not request.return_values:
            rewards = await self.batcher.submit(sequences)
            return reward_pb2.ScoreResponse(
                rewards=tensor_to_proto(torch.tensor(rewards, dtype=torch.float32))
            )
        self.critic.require_loaded("Score")
        rewards, values = await asyncio.gather(self.batcher.submit(sequences), self.critic.values(sequences))
        return reward_pb2.ScoreResponse(
            rewards=tensor_to_proto(torch.tensor(rewards, dtype=torch.float32)),
            values=ragged_to_proto(values, dtype=torch.float32),
        )


class RewardServicer(reward_pb2_grpc.RewardServicer):
    def __init__(self, component: RewardComponent):
        self.component = component

    async def Score(self, request, context):  # noqa: N802 - gRPC method name
        return await self.component.score(request)


def build(config: ModelServiceConfig, worker: ModelWorker) -> list:
    return [RewardComponent(config, worker)]


def main(argv: list[str] | None = None) -> int:
    return serve(SERVICE, sys.argv[1:] if argv is None else argv, build)


if __name__ == "__main__":
    sys.exit(main())
