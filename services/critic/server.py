"""`aligner serve critic`: the PPO critic behind `aligner.v1.Critic`.

- `Values`: per-token values (next-token space: L-1 per row), dynamically batched.
- `Train`: a client stream of rollout chunks (tokens, mask, returns, old values). Each chunk is
  validated as it arrives; when the stream ends the critic trains on all of it
  (`trainer.critic.CriticTrainer`: clipped value loss, its own AdamW + schedule, gradient
  clipping, optional Adam-state offload) and returns the loss metrics and its step count.
- `Save` / `Load`: an atomic checkpoint (`trainer.checkpoint`) of weights, optimizer, schedule
  and step, so a resumed PPO run continues exactly.

The critic starts from `critic_checkpoint_path`, or from `checkpoint_path` (the reward model) when
that is unset; a checkpoint without a value head gets a fresh one.
"""

from __future__ import annotations

import sys

import torch
from aligner.v1 import critic_pb2, critic_pb2_grpc

from common import metrics
from common.codec import ragged_from_proto, ragged_to_proto
from common.config import ModelServiceConfig, to_dict
from common.errors import InvalidArgument
from common.grpc_server import GrpcServer
from common.logging import get_logger
from services.model_server import Loadable, ModelWorker, decode_tokens, load_model, load_tokenizer, serve

SERVICE = "critic"
log = get_logger(__name__)


def _next_token_rows(msg, field: str, token_lengths: list[int], *, kind: str | None) -> list[torch.Tensor]:
    """Per-token rows that must be one shorter than their token rows, as float32 tensors."""
    ragged = ragged_from_proto(msg, field, kind=kind)
    lengths = ragged.lengths.tolist()
    if len(lengths) != len(token_lengths):
        raise InvalidArgument(
            f"{field}.lengths", f"has {len(lengths)} rows, but tokens has {len(token_lengths)}"
        )
    for i, (n, t) in enumerate(zip(lengths, token_lengths, strict=True)):
        if n != t - 1:
            raise InvalidArgument(
                f"{field}.lengths", f"row {i} has length {n}, but must be tokens.lengths[{i}] - 1 = {t - 1}"
            )
    return [row.to(torch.float32) for row in ragged.rows()]


class CriticComponent(Loadable):
    """The critic model, its trainer, its values batcher and its checkpoints."""

    service = SERVICE

    def __init__(self, config: ModelServiceConfig, worker: ModelWorker):
        self.config = config
        self.worker = worker
        self.arch = None
        self.tokenizer = None
        self.trainer = None

    def add_to(self, server: GrpcServer) -> None:
        server.add_servicer(critic_pb2_grpc.add_CriticServicer_to_server, CriticServicer(self))

    def load(self) -> None:
        """Build the critic from its initial checkpoint, with a fresh optimizer (also `Load(initial)`)."""
        from trainer.critic import CriticTrainer

        field = "critic_checkpoint_path" if self.config.critic_checkpoint_path else "checkpoint_path"
        model, arch, tokenizer = load_model(
            getattr(self.config, field), field, value_head=True, seed=self.config.seed
        )
        self.arch = arch
        self.tokenizer = load_tokenizer(self.config, tokenizer, arch)
        self.trainer = CriticTrainer(
            model,
            self.config.model,
            gradient_clip_val=self.config.trainer.gradient_clip_val,
            max_steps=self.config.trainer.ppo.max_steps,
        )
        self.worker.add(SERVICE, model)

    # -- on the model thread --------------------------------------------------------------------

    def forward_chunk(self, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
        from trainer.model import sequence_values

        model = self.worker.activate(SERVICE)
        return sequence_values(model, sequences, micro_batch_size=len(sequences))

    def _train(self, batch) -> dict[str, float]:
        self.worker.activate(SERVICE)
        result = self.trainer.train(batch)
        metrics.CRITIC_TRAIN_STEPS.inc(result["optimizer_steps"])
        metrics.CRITIC_VALUE_LOSS.set(result["value_loss"])
        return result

    def _save(self, path: str) -> int:
        from trainer.checkpoint import save_checkpoint

        model = self.worker.activate(SERVICE)
        save_checkpoint(
            path, model, self.trainer.optimizer, self.trainer.scheduler,
            step=self.trainer.step, arch=self.arch, config=to_dict(self.config),
            tokenizer=self.tokenizer, extra={"kind": "critic"},
        )  # fmt: skip
        return self.trainer.step

    def _load(self, path: str) -> int:
        from trainer.checkpoint import load_checkpoint
        from trainer.critic import move_optimizer_state

        model = self.worker.activate(SERVICE)
        meta = load_checkpoint(path, model, self.trainer.optimizer, self.trainer.scheduler, restore_rng=False)
        self.trainer.step = meta.step
        model.eval()
        if self.config.model.offload_adam_states:
            move_optimizer_state(self.trainer.optimizer, "cpu")
        return meta.step

    # -- called from the handlers ---------------------------------------------------------------

    async def values(self, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
        return await self.batcher.submit(sequences)

    async def train(self, chunks) -> critic_pb2.TrainResponse:
        from trainer.critic import pad_rollout

        tokens, mask, returns, old_values = [], [], [], []
        index = 0
        async for chunk in chunks:
            try:
                rows = decode_tokens(chunk.tokens, "tokens", self.arch)
                lengths = [len(r) for r in rows]
                mask += _next_token_rows(chunk.mask, "mask", lengths, kind=None)
                returns += _next_token_rows(chunk.returns, "returns", lengths, kind="float")
                old_values += _next_token_rows(chunk.old_values, "old_values", lengths, kind="float")
            except InvalidArgument as exc:
                raise InvalidArgument(exc.field, f"{exc.problem} (stream message {index})") from None
            tokens += rows
            index += 1
        if not tokens:
            raise InvalidArgument("tokens", "the stream held no rollout rows")
        batch = pad_rollout(tokens, mask, returns, old_values)
        result = await self.worker.run(self._train, batch)
        log.info("critic trained", step=self.trainer.step, sequences=len(tokens), **{
            k: round(v, 6) for k, v in result.items() if k in ("value_loss", "grad_norm", "lr")
        })  # fmt: skip
        return critic_pb2.TrainResponse(step=self.trainer.step, metrics=result)

    async def save(self, path: str) -> critic_pb2.SaveResponse:
        if not path:
            raise InvalidArgument("path", "is empty")
        step = await self.worker.run(self._save, path)
        log.info("critic saved", path=path, step=step)
        return critic_pb2.SaveResponse(path=path, step=step)

    def _load_initial(self) -> int:
        self.load()
        return self.trainer.step

    async def load_checkpoint(self, path: str, initial: bool = False) -> critic_pb2.LoadResponse:
        if initial:
            if path:
                raise InvalidArgument("path", "must be empty when initial is set")
            step = await self.worker.run(self._load_initial)
            log.info("critic reset to its initial checkpoint")
            return critic_pb2.LoadResponse(step=step)
        if not path:
            raise InvalidArgument("path", "is empty")
        step = await self.worker.run(self._load, path)
        log.info("critic loaded", path=path, step=step)
        return critic_pb2.LoadResponse(step=step)


class CriticServicer(critic_pb2_grpc.CriticServicer):
    def __init__(self, component: CriticComponent):
        self.component = component

    async def Values(self, request, context):  # noqa: N802 - gRPC method names
        c = self.component
        c.require_loaded("Values")
        values = await c.values(decode_tokens(request.tokens, "tokens", c.arch))
        return critic_pb2.ValuesResponse(values=ragged_to_proto(values, dtype=torch.float32))

    async def Train(self, request_iterator, context):  # noqa: N802
        self.component.require_loaded("Train")
        return await self.component.train(request_iterator)

    async def Save(self, request, context):  # noqa: N802
        self.component.require_loaded("Save")
        return await self.component.save(request.path)

    async def Load(self, request, context):  # noqa: N802
        self.component.require_loaded("Load")
        return await self.component.load_checkpoint(request.path, request.initial)


def build(config: ModelServiceConfig, worker: ModelWorker) -> list:
    return [CriticComponent(config, worker)]


def main(argv: list[str] | None = None) -> int:
    return serve(SERVICE, sys.argv[1:] if argv is None else argv, build)


if __name__ == "__main__":
    sys.exit(main())
