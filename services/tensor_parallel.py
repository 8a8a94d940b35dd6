"""Tensor-parallel model servers: one model sharded over the ranks of a `torchrun` job.

    torchrun --nproc-per-node 2 -m services.cli serve reward --config r.yaml \\
        model.tensor_model_parallel_size=2

Every rank parses the same config and loads its shard of the model (loading is itself a
collective). Rank 0, the *leader*, then serves exactly as a single-process server does (gRPC,
batching, Triton). Each model computation it starts (a forward chunk, a critic Train, Save or
Load, a generate call, a weight push) is first sent to the other ranks, the *followers*, as
"call method M of target T with these arguments", and then run locally, so that every rank
enters the same Megatron collectives in the same order. A follower does nothing else: `follow()`
runs the messages it receives until the leader sends the stop message at shutdown. This is
NeMo-Aligner's server pattern (rank 0 runs the server, the other ranks wait on a broadcast).

Messages travel over a separate gloo group as pickled objects, CPU to CPU, with a timeout of a
year: a follower waits for the next request for as long as the server is idle, and the default
backend's timeout (NCCL's watchdog on GPUs) would kill it. The model's own collectives stay on
the default backend. If the leader dies, the followers' receive fails and torchrun stops the job.

A method that raises on the leader raises on the followers too (they run the same code on the
same input); a follower logs it and waits for the next message, as the leader answers the call
with the error and serves on.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from common.errors import InvalidArgument
from common.logging import get_logger

log = get_logger(__name__)

KEY = "model.tensor_model_parallel_size"
IDLE_TIMEOUT = timedelta(days=365)
_STOP = "stop"


def check_sizes(tp: int, checkpoint_path: str) -> None:
    """Before anything starts: the job has exactly `tp` ranks, and `tp` divides every dimension
    Megatron splits (attention heads, KV groups, FFN width, vocabulary) of the checkpoint's model."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1:
        raise InvalidArgument(KEY, f"must be >= 1, got {tp}")
    if world != tp:
        raise InvalidArgument(
            KEY,
            f"is {tp} but the job has {world} process(es); a model sharded over N ranks is served "
            f"with `torchrun --nproc-per-node N -m services.cli serve ... {KEY}=N`",
        )
    if tp == 1:
        return
    from trainer.checkpoint import checkpoint_arch, resolve_checkpoint

    arch = checkpoint_arch(resolve_checkpoint(checkpoint_path))
    for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size"):
        value = int(getattr(arch, name))
        if value % tp:
            raise InvalidArgument(
                KEY, f"{tp} does not divide the model's {name} ({value}) of {checkpoint_path}"
            )


def init(tp: int, seed: int) -> ModelGroup | None:
    """Initialise torch.distributed and Megatron for `tp` ranks; the group of a TP>1 server."""
    from trainer.parallel import init_parallel

    init_parallel(tensor_model_parallel_size=tp, seed=seed)
    return ModelGroup() if tp > 1 else None


class ModelGroup:
    """The ranks of one tensor-parallel server and the leader's messages to the followers.

    Every rank registers the same targets in the same order (`add`); the leader wraps the
    targets' methods with `collective`, the followers run `follow()`."""

    def __init__(self):
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()
        self._group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        self._targets: list[Any] = []
        self._lock = threading.Lock()  # a message and its local run are one step for the leader

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def add(self, target: Any) -> None:
        self._targets.append(target)

    def _address(self, method: Callable) -> tuple[int, str]:
        owner = getattr(method, "__self__", None)
        for index, target in enumerate(self._targets):
            if target is owner:
                return index, method.__name__
        raise ValueError(f"{method!r} is not a method of a registered target")

    def _send(self, messages: Sequence[Any]) -> Any:
        """Scatter one message per rank (the leader keeps its own): every rank receives only its
        part (a weight push's shard), pickled once per rank."""
        received: list[Any] = [None]
        dist.scatter_object_list(received, list(messages), src=0, group=self._group)
        return received[0]

    def collective(self, method: Callable) -> Callable:
        """`method` of a target, run on every rank with the same positional arguments. Keyword
        arguments stay on the leader (callbacks such as a generation's `on_step`, which cannot
        travel and mean nothing on a follower)."""
        index, name = self._address(method)

        def call(*args: Any, **leader_only: Any) -> Any:
            with self._lock:
                self._send([(index, name, args)] * self.size)
                return method(*args, **leader_only)

        return call

    def collective_per_rank(self, method: Callable) -> Callable:
        """`method` of a target, run on every rank with that rank's own arguments: the returned
        function takes the argument tuples of ranks 0..size-1."""
        index, name = self._address(method)

        def call(args_by_rank: Sequence[tuple]) -> Any:
            if len(args_by_rank) != self.size:
                raise ValueError(f"{len(args_by_rank)} argument tuples for {self.size} ranks")
            with self._lock:
                own = self._send([(index, name, tuple(args)) for args in args_by_rank])
                return method(*own[2])

        return call

    def share(self, value: Any) -> Any:
        """The leader's `value` on every rank; every rank calls it at the same point of a
        collective method (e.g. a generation step's tokens and whether the leader cancelled it,
        so that all ranks take the same decision at the same step)."""
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def agree(self, value: bool) -> bool:
        """The leader's yes or no on every rank (see `share`)."""
        return bool(self.share(bool(value)))

    def follow(self) -> None:
        """A follower's life: run the leader's messages until it stops the group."""
        log.info("tensor-parallel follower ready", rank=self.rank, size=self.size)
        while True:
            message = self._send([None] * self.size)
            if message == _STOP:
                break
            index, name, args = message
            try:
                getattr(self._targets[index], name)(*args)
            except Exception as exc:  # noqa: BLE001 - the leader reports the same failure
                log.warning("collective call failed", method=name, error=f"{type(exc).__name__}: {exc}")
        log.info("tensor-parallel follower stopped", rank=self.rank)

    def stop(self) -> None:
        """Leader, at shutdown: release the followers (they return from `follow`)."""
        with self._lock:
            self._send([_STOP] * self.size)
