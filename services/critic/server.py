"""`aligner serve critic`: the PPO critic behind `aligner.v1.Critic`.

- `Values`: per-token values (next-token space: L-1 per row), dynamically batched.
- `Train`: a client stream of rollout chunks (tokens, mask, returns, old values) that names its
  rollout (`rollout_id`, on the first message). Each chunk is validated as it arrives; when the
  stream ends the critic trains on all of it (`trainer.critic.CriticTrainer`: clipped value
  loss, its own AdamW + schedule, gradient clipping, optional Adam-state offload) and returns the
  loss metrics and its step count.
- `Save` / `Load`: an atomic checkpoint (`trainer.checkpoint`) of weights, optimizer, schedule,
  step and the applied rollout ids, so a resumed PPO run continues exactly. Paths lie inside
  `server.checkpoint_root`. A failed Load changes nothing.
- `Info`: step, incarnation (new at every process start), last applied rollout, weights' origin.

Exactly once. The critic is the one stateful service, and a client cannot tell a Train that
failed from one whose answer it missed (a deadline passes while the server keeps training, a
connection drops). So every rollout carries an id, and the critic applies each id at most once:
a retry of an applied id gets the first answer again (`replayed`), and a retry that arrives while
that id is still training waits for the same training instead of starting another. The applied
ids live with the weights: they are updated on the model thread with each update, written into
every checkpoint and replaced by every Load, so a critic reloaded from a checkpoint refuses
exactly the rollouts that checkpoint had seen.

The critic starts from `critic_checkpoint_path`, or from `checkpoint_path` (the reward model) when
that is unset; a checkpoint without a value head gets a fresh one.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import os
import sys
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

import torch
from aligner.v1 import critic_pb2, critic_pb2_grpc

from common import metrics
from common.codec import ragged_from_proto, ragged_to_proto
from common.config import ModelServiceConfig, to_dict
from common.errors import AlignerError, InvalidArgument, NotFound
from common.grpc_server import GrpcServer
from common.logging import get_logger
from services.model_server import Loadable, ModelWorker, decode_tokens, load_model, load_tokenizer, serve

SERVICE = "critic"
CHECKPOINT_KIND = "critic"  # meta.json extra.kind of a checkpoint written by Save
log = get_logger(__name__)

# How many applied rollout ids the critic remembers, and writes into each checkpoint. A retry only
# ever concerns the last rollout or two (the orchestrator sends one rollout per PPO step and
# retries it until it sees an answer), and a resumed run re-sends only rollouts after its
# checkpoint; a thousand covers that with a wide margin while a checkpoint's record (an id, a
# step and a dozen metrics each, about half a kilobyte of JSON) stays small.
REMEMBERED_ROLLOUTS = 1024
MAX_ROLLOUT_ID_LENGTH = 256


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


@dataclasses.dataclass(frozen=True)
class Applied:
    """What one applied rollout answered."""

    step: int
    metrics: dict[str, float]


class AppliedRollouts:
    """The last `REMEMBERED_ROLLOUTS` applied rollout ids and their answers, oldest first. Written
    on the model thread, read by the handlers, hence the lock."""

    def __init__(self, records: list[tuple[str, Applied]] = ()):
        self._records: OrderedDict[str, Applied] = OrderedDict(records)
        self._lock = threading.Lock()
        self._trim()

    def _trim(self) -> None:
        while len(self._records) > REMEMBERED_ROLLOUTS:
            self._records.popitem(last=False)

    def get(self, rollout_id: str) -> Applied | None:
        with self._lock:
            return self._records.get(rollout_id)

    def add(self, rollout_id: str, applied: Applied) -> None:
        with self._lock:
            self._records[rollout_id] = applied
            self._trim()

    def __len__(self) -> int:
        return len(self._records)

    def to_json(self) -> list[dict]:
        with self._lock:
            return [{"id": k, "step": a.step, "metrics": a.metrics} for k, a in self._records.items()]

    @classmethod
    def from_json(cls, records, where: str) -> AppliedRollouts:
        """From a checkpoint's `extra.applied_rollouts`; `where` names the checkpoint in errors."""
        try:
            return cls([
                (str(r["id"]), Applied(int(r["step"]), {str(k): float(v) for k, v in r["metrics"].items()}))
                for r in records
            ])  # fmt: skip
        except (TypeError, KeyError, ValueError, AttributeError):
            raise InvalidArgument(
                "path", f"{where}: meta.json holds a malformed applied_rollouts list"
            ) from None


@dataclasses.dataclass
class Training:
    """One rollout being applied: its task on the model thread, and how many retries of the same
    rollout wait for it."""

    task: asyncio.Future
    waiting: int = 0


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where the weights stand after the last completed Train, Save or Load: replaced as a whole
    on the model thread, so `Info` never sees a step from one update and an id from another."""

    step: int
    last_rollout_id: str
    initial: bool  # from the initial checkpoint (not from a Load of a path)
    checkpoint_path: str


class CriticComponent(Loadable):
    """The critic model, its trainer, its values batcher and its checkpoints."""

    service = SERVICE

    def __init__(self, config: ModelServiceConfig, worker: ModelWorker):
        self.config = config
        self.worker = worker
        self.arch = None
        self.tokenizer = None
        self.trainer = None
        self.applied = AppliedRollouts()
        self.progress: Progress | None = None
        # New at every process start: a client that sees it change knows the critic lost its state.
        self.incarnation = uuid.uuid4().hex
        # Resolved once: the working directory of the process start when unset.
        self.checkpoint_root = Path(config.server.checkpoint_root or os.getcwd()).resolve()
        self.training: dict[str, Training] = {}  # rollout id -> its training, while it runs

    def add_to(self, server: GrpcServer) -> None:
        server.add_servicer(critic_pb2_grpc.add_CriticServicer_to_server, CriticServicer(self))

    def load(self) -> None:
        """Build the critic from its initial checkpoint, with a fresh optimizer (also `Load(initial)`).
        Everything is built before anything is replaced, so a failure leaves the critic as it was."""
        from trainer.critic import CriticTrainer

        field = "critic_checkpoint_path" if self.config.critic_checkpoint_path else "checkpoint_path"
        path = getattr(self.config, field)
        model, arch, tokenizer = load_model(path, field, value_head=True, seed=self.config.seed)
        tokenizer = load_tokenizer(self.config, tokenizer, arch)
        trainer = CriticTrainer(
            model,
            self.config.model,
            gradient_clip_val=self.config.trainer.gradient_clip_val,
            max_steps=self.config.trainer.ppo.max_steps,
        )
        self.arch, self.tokenizer, self.trainer = arch, tokenizer, trainer
        self.worker.add(SERVICE, model)
        self.applied = AppliedRollouts()
        self.progress = Progress(step=0, last_rollout_id="", initial=True, checkpoint_path=str(path))

    # -- on the model thread --------------------------------------------------------------------

    def forward_chunk(self, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
        from trainer.model import sequence_values

        model = self.worker.activate(SERVICE)
        return sequence_values(model, sequences, micro_batch_size=len(sequences))

    def _train(self, batch, rollout_id: str) -> Applied:
        self.worker.activate(SERVICE)
        result = self.trainer.train(batch)
        metrics.CRITIC_TRAIN_STEPS.inc(result["optimizer_steps"])
        metrics.CRITIC_VALUE_LOSS.set(result["value_loss"])
        applied = Applied(self.trainer.step, result)
        self.applied.add(rollout_id, applied)
        self.progress = dataclasses.replace(self.progress, step=self.trainer.step, last_rollout_id=rollout_id)
        return applied

    def _save(self, path: Path) -> int:
        from trainer.checkpoint import save_checkpoint

        model = self.worker.activate(SERVICE)
        extra = {"kind": CHECKPOINT_KIND, "applied_rollouts": self.applied.to_json()}
        save_checkpoint(
            path, model, self.trainer.optimizer, self.trainer.scheduler,
            step=self.trainer.step, arch=self.arch, config=to_dict(self.config),
            tokenizer=self.tokenizer, extra=extra,
        )  # fmt: skip
        return self.trainer.step

    def _load(self, path: Path, shown: str) -> int:
        """Load the critic checkpoint at `path` (`shown`: the path as the caller sent it, the only
        one an error message names), all or nothing."""
        from trainer.checkpoint import load_checkpoint, read_meta
        from trainer.critic import move_optimizer_state

        try:
            meta = read_meta(path)
        except NotFound:
            if path.exists():
                raise InvalidArgument(
                    "path", f"{shown!r} is not a complete checkpoint (no meta.json)"
                ) from None
            raise NotFound(f"path: {shown!r} does not exist") from None
        except Exception as exc:
            raise self._load_error(exc, path, shown) from None
        extra = meta.extra if isinstance(meta.extra, dict) else {}
        if extra.get("kind") != CHECKPOINT_KIND or not meta.has_value_head:
            raise InvalidArgument(
                "path", f"{shown!r} is not a critic checkpoint (one written by Critic.Save)"
            )
        applied = AppliedRollouts.from_json(extra.get("applied_rollouts", []), repr(shown))

        model = self.worker.activate(SERVICE)
        optimizer, scheduler = self.trainer.optimizer, self.trainer.scheduler
        # Megatron reads the weights straight into the parameters, so a checkpoint that fails
        # halfway (weights of another shape, a damaged file) has already overwritten some: keep
        # a host-memory copy of the weights for the length of the Load. The optimizer needs no
        # copy: the loader replaces its per-parameter entries and its groups (never the tensors
        # in them), so keeping the old entries is enough; the schedule is a few numbers.
        weights = {
            k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if torch.is_tensor(v)
        }
        optimizer_state, optimizer_groups = dict(optimizer.state), list(optimizer.param_groups)
        scheduler_state = copy.deepcopy(scheduler.state_dict())
        try:
            meta = load_checkpoint(path, model, optimizer, scheduler, restore_rng=False)
        except BaseException as exc:  # torch's CheckpointException is not an Exception
            model.load_state_dict(weights, strict=False)
            optimizer.state.clear()
            optimizer.state.update(optimizer_state)
            optimizer.param_groups[:] = optimizer_groups
            scheduler.load_state_dict(scheduler_state)
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            raise self._load_error(exc, path, shown) from None
        finally:
            model.eval()
        self.trainer.step = meta.step
        if self.config.model.offload_adam_states:
            move_optimizer_state(optimizer, "cpu")
        self.applied = applied
        last = applied.to_json()[-1]["id"] if len(applied) else ""
        self.progress = Progress(step=meta.step, last_rollout_id=last, initial=False, checkpoint_path=shown)
        return meta.step

    def _load_error(self, exc: BaseException, path: Path, shown: str) -> AlignerError:
        """A failed load as one line naming the caller's path: our own errors with the server's
        paths replaced by the caller's, anything else (megatron, torch) by its kind only."""
        if isinstance(exc, AlignerError):
            message = (
                str(exc).replace(str(path), shown).replace(str(self.checkpoint_root), "<checkpoint root>")
            )
            if isinstance(exc, NotFound):
                return NotFound(f"path: {message}")
            return InvalidArgument("path", message.removeprefix(f"{shown}: "))
        log.warning("critic load failed", path=shown, error=f"{type(exc).__name__}: {exc}")
        return InvalidArgument(
            "path",
            f"{shown!r} could not be loaded ({type(exc).__name__}): damaged, or saved from a critic of "
            "another shape; the server log has the details",
        )

    def _load_initial(self) -> int:
        self.load()
        return self.trainer.step

    # -- paths ----------------------------------------------------------------------------------

    def checkpoint_path(self, path: str) -> Path:
        """`path` resolved (symlinks and `..` included) inside the checkpoint root, or
        INVALID_ARGUMENT naming `path`. The root itself is refused: Save replaces its target."""
        if not path:
            raise InvalidArgument("path", "is empty")
        if "\0" in path:
            raise InvalidArgument("path", "contains a NUL character")
        resolved = (self.checkpoint_root / path).resolve()
        if self.checkpoint_root not in resolved.parents:
            raise InvalidArgument(
                "path",
                f"{path!r} is not inside the critic's checkpoint root (server.checkpoint_root): give a "
                "path relative to it, or an absolute one inside it; `..` and symlinks may not lead out",
            )
        return resolved

    def _check_replaceable(self, target: Path, shown: str) -> None:
        """Save replaces a directory only when it is empty or a critic checkpoint: it must never
        delete what it did not write."""
        if not (target.exists() or target.is_symlink()):
            return
        if not target.is_dir():
            raise InvalidArgument("path", f"{shown!r} exists and is not a directory")
        if not any(target.iterdir()):
            return
        try:
            kind = json.loads((target / "meta.json").read_text()).get("extra", {}).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind != CHECKPOINT_KIND:
            raise InvalidArgument(
                "path", f"{shown!r} exists and is not a critic checkpoint; Save replaces only those"
            )

    # -- called from the handlers ---------------------------------------------------------------

    async def values(self, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
        return await self.batcher.submit(sequences)

    async def train(self, chunks) -> critic_pb2.TrainResponse:
        stream = aiter(chunks)
        first = await anext(stream, None)
        if first is None:
            raise InvalidArgument("tokens", "the stream held no rollout rows")
        rollout_id = first.rollout_id
        if not rollout_id:
            raise InvalidArgument("rollout_id", "is required on the stream's first message")
        if len(rollout_id) > MAX_ROLLOUT_ID_LENGTH:
            raise InvalidArgument("rollout_id", f"is longer than {MAX_ROLLOUT_ID_LENGTH} characters")
        # A retry of a known rollout needs none of its data: answer before reading the rest.
        known = await self._known(rollout_id)
        if known is not None:
            return known
        batch, rows = await self._receive(first, stream, rollout_id)
        # Another call with this id may have started or finished while this stream arrived.
        known = await self._known(rollout_id)
        if known is not None:
            return known
        # The training runs as its own task: when this call's client goes away (a missed deadline)
        # it still finishes and is recorded, and a retry waits for it (`_known`).
        task = asyncio.ensure_future(self.worker.run(self._train, batch, rollout_id))
        self.training[rollout_id] = Training(task)
        task.add_done_callback(lambda t: self._trained(rollout_id, t))
        applied = await asyncio.shield(task)
        log.info("critic trained", step=applied.step, sequences=rows, rollout_id=rollout_id, **{
            k: round(v, 6) for k, v in applied.metrics.items() if k in ("value_loss", "grad_norm", "lr")
        })  # fmt: skip
        return _train_response(rollout_id, applied, replayed=False)

    async def _known(self, rollout_id: str) -> critic_pb2.TrainResponse | None:
        """The answer for a rollout that was applied, after waiting for one being applied; None
        for a new one (the caller claims it before its next await)."""
        running = self.training.get(rollout_id)
        if running is not None:
            log.info("critic rollout being applied: waiting for that training", rollout_id=rollout_id)
            running.waiting += 1
            try:
                applied = await asyncio.shield(running.task)
            finally:
                running.waiting -= 1
        else:
            applied = self.applied.get(rollout_id)
            if applied is None:
                return None
        log.info(
            "critic rollout already applied: replaying its answer", rollout_id=rollout_id, step=applied.step
        )
        return _train_response(rollout_id, applied, replayed=True)

    def _trained(self, rollout_id: str, task: asyncio.Future) -> None:
        del self.training[rollout_id]
        if not task.cancelled() and task.exception() is not None:  # also marks it retrieved
            log.warning("critic training failed", rollout_id=rollout_id, error=str(task.exception()))

    async def _receive(self, first, stream, rollout_id: str):
        """The whole rollout, validated chunk by chunk -> (padded batch, rows)."""
        from trainer.critic import pad_rollout

        tokens, mask, returns, old_values = [], [], [], []
        index, chunk = 0, first
        while chunk is not None:
            try:
                if chunk.rollout_id and chunk.rollout_id != rollout_id:
                    raise InvalidArgument(
                        "rollout_id",
                        f"is {chunk.rollout_id!r}, but the stream's first message has {rollout_id!r}",
                    )
                rows = decode_tokens(chunk.tokens, "tokens", self.arch)
                lengths = [len(r) for r in rows]
                mask += _next_token_rows(chunk.mask, "mask", lengths, kind=None)
                returns += _next_token_rows(chunk.returns, "returns", lengths, kind="float")
                old_values += _next_token_rows(chunk.old_values, "old_values", lengths, kind="float")
            except InvalidArgument as exc:
                raise InvalidArgument(exc.field, f"{exc.problem} (stream message {index})") from None
            tokens += rows
            index += 1
            chunk = await anext(stream, None)
        if not tokens:
            raise InvalidArgument("tokens", "the stream held no rollout rows")
        return pad_rollout(tokens, mask, returns, old_values), len(tokens)

    async def save(self, path: str) -> critic_pb2.SaveResponse:
        target = self.checkpoint_path(path)
        self._check_replaceable(target, path)
        step = await self.worker.run(self._save, target)
        log.info("critic saved", path=path, step=step)
        return critic_pb2.SaveResponse(path=path, step=step)

    async def load_checkpoint(self, path: str, initial: bool = False) -> critic_pb2.LoadResponse:
        if initial:
            if path:
                raise InvalidArgument("path", "must be empty when initial is set")
            step = await self.worker.run(self._load_initial)
            log.info("critic reset to its initial checkpoint")
            return critic_pb2.LoadResponse(step=step)
        step = await self.worker.run(self._load, self.checkpoint_path(path), path)
        log.info("critic loaded", path=path, step=step)
        return critic_pb2.LoadResponse(step=step)

    def info(self) -> critic_pb2.CriticInfoResponse:
        p = self.progress
        return critic_pb2.CriticInfoResponse(
            step=p.step, incarnation=self.incarnation, last_rollout_id=p.last_rollout_id,
            initial=p.initial, checkpoint_path=p.checkpoint_path, remembered_rollouts=len(self.applied),
        )  # fmt: skip


def _train_response(rollout_id: str, applied: Applied, *, replayed: bool) -> critic_pb2.TrainResponse:
    return critic_pb2.TrainResponse(
        step=applied.step, metrics=applied.metrics, replayed=replayed, rollout_id=rollout_id
    )


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

    async def Info(self, request, context):  # noqa: N802
        self.component.require_loaded("Info")
        return self.component.info()


def build(config: ModelServiceConfig, worker: ModelWorker) -> list:
    return [CriticComponent(config, worker)]


def main(argv: list[str] | None = None) -> int:
    return serve(SERVICE, sys.argv[1:] if argv is None else argv, build)


if __name__ == "__main__":
    sys.exit(main())
