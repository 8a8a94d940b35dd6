"""What the reward, critic, reward-critic and reference servers share.

A server is a few *components* (the reward model, the critic, the reference policy), each adding
its gRPC servicer and loading its model, run by `serve(...)`:

1. parse `--config FILE [--ports-file FILE] [overrides]` into a `ModelServiceConfig`;
2. set up JSON logs and the torch thread count (`server.torch_threads`);
3. start the gRPC server (health NOT_SERVING, reflection, metrics, auth, TLS, limits) and announce
   its ports, load every model on the model thread, start the dynamic batchers, go SERVING;
4. on SIGTERM: NOT_SERVING, drain in-flight calls, stop the batchers, exit 0.

Every model computation of a process (forward passes, critic training, checkpoint I/O) runs on one
thread, `ModelWorker.executor`: calls never race on weights, and the event loop stays free to
accept and batch requests meanwhile. `ModelWorker.activate(name)` returns a model ready to compute
on the accelerator; with `swap_models_to_cpu` every other model is moved to CPU memory first, so
only one sits on the accelerator at a time.

With `model.tensor_model_parallel_size=N` under `torchrun --nproc-per-node N`, every rank loads
its shard and builds the same components; rank 0 serves, and every model-thread computation it
runs (`ModelWorker.collective`: forward chunks, critic Train/Save/Load) runs on all ranks
(`services.tensor_parallel`).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import torch

from common import metrics
from common.codec import Ragged, tokens_from_proto
from common.config import ModelServiceConfig, load_config
from common.errors import AlignerError, InvalidArgument, Unavailable
from common.grpc_server import GrpcServer, configure_service_process
from common.logging import get_logger
from services.tensor_parallel import ModelGroup

log = get_logger(__name__)


# ---------------------------------------------------------------------------------------------
# Models and the thread they run on
# ---------------------------------------------------------------------------------------------


class ModelWorker:
    """The process's model thread and the placement of its models."""

    def __init__(self, swap_models_to_cpu: bool = False, group: ModelGroup | None = None):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.swap = swap_models_to_cpu
        self.group = group  # the tensor-parallel ranks, when the model is sharded
        self.models: dict[str, torch.nn.Module] = {}
        self._accelerator: torch.device | None = None

    @property
    def accelerator(self) -> torch.device:
        if self._accelerator is None:
            from trainer.parallel import device

            self._accelerator = device()
        return self._accelerator

    def add(self, name: str, model: torch.nn.Module) -> None:
        """Register a loaded model. With swapping, it waits in CPU memory until it is used."""
        self.models[name] = model
        if self.swap:
            model.to("cpu")

    def activate(self, name: str) -> torch.nn.Module:
        """The model `name`, on the accelerator. Call it on the model thread only."""
        model = self.models[name]
        if self.swap:
            for other_name, other in self.models.items():
                if other_name != name and other.device != torch.device("cpu"):
                    other.to("cpu")
            if model.device != self.accelerator:
                model.to(self.accelerator)
        return model

    def placement(self) -> dict[str, str]:
        return {name: str(model.device) for name, model in self.models.items()}

    def collective(self, method: Callable[..., Any]) -> Callable[..., Any]:
        """`method` (of a component) made to run on every tensor-parallel rank: with TP the
        returned function first sends its call to the other ranks. Call it on the model thread."""
        return method if self.group is None else self.group.collective(method)

    async def run(self, method: Callable[..., Any], *args: Any) -> Any:
        """Run the component method `method(*args)` on the model thread (of every tensor-parallel
        rank) and await its result."""
        fn = self.collective(method)
        return await asyncio.get_running_loop().run_in_executor(self.executor, _plain_exceptions, fn, *args)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)


def _plain_exceptions(fn: Callable[..., Any], *args: Any) -> Any:
    """Some libraries raise BaseException subclasses that are not errors of the process (torch's
    distributed `CheckpointException`); re-raise them as RuntimeError so that the gRPC layer maps
    them to a status like any other failure instead of letting them escape the handler."""
    try:
        return fn(*args)
    except (Exception, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        raise RuntimeError(f"{type(exc).__name__}: {exc}") from exc


class Component(Protocol):
    """One model of a server and its gRPC service."""

    def add_to(self, server: GrpcServer) -> None: ...  # register the servicer (before start)
    def load(self) -> None: ...  # on the model thread: load weights, register with the worker
    async def start(self) -> None: ...  # in the event loop, after load: start batchers
    async def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------


def decode_tokens(msg, field: str, arch, *, min_length: int = 1) -> list[torch.Tensor]:
    """A validated ragged token batch as a list of 1-D int64 tensors: integer dtype, lengths
    adding up, ids < vocab_size, 1 <= length <= encoder_seq_length, at least one row."""
    ragged: Ragged = tokens_from_proto(
        msg, field, vocab_size=arch.vocab_size, min_length=min_length, max_length=arch.encoder_seq_length
    )
    return ragged.rows()


def encode_texts(tokenizer, texts: Sequence[str], field: str, arch) -> list[torch.Tensor]:
    """Tokenise texts for scoring exactly as the reward model was trained on them
    (`trainer.rm.encode_for_reward`): BOS (when the tokenizer has one), the prompt up to the last
    Assistant marker, the response, EOS. A text without dialogue markers is all response."""
    from trainer.rm import encode_for_reward

    if tokenizer is None:
        raise AlignerError(
            f"{field}: this server has no tokenizer (set tokenizer_path or use a checkpoint with one)"
        )
    if not texts:
        raise InvalidArgument(field, "is empty: the batch needs at least one text")
    sequences = []
    for i, text in enumerate(texts):
        ids = encode_for_reward(tokenizer, text)
        if len(ids) > arch.encoder_seq_length:
            raise InvalidArgument(
                f"{field}[{i}]",
                f"is {len(ids)} tokens long, more than the model's maximum {arch.encoder_seq_length}",
            )
        sequences.append(torch.tensor(ids, dtype=torch.long))
    return sequences


class Loadable:
    """A model component whose forward requests go through one dynamic batcher (`forward_chunk`
    on the model thread). Raises UNAVAILABLE for calls that arrive before the model is loaded
    (health says NOT_SERVING then, but a client may call anyway)."""

    service: str  # the metrics label
    config: Any
    worker: ModelWorker
    loaded = False
    batcher: Any = None

    def require_loaded(self, what: str) -> None:
        if not self.loaded:
            raise Unavailable(f"{what}: the model is still loading")

    def forward_chunk(self, sequences: list[torch.Tensor]) -> list:
        raise NotImplementedError

    async def start(self) -> None:
        from services.batching import DynamicBatcher

        b = self.config.batching
        self.batcher = DynamicBatcher(
            self.service,
            self.worker.collective(self.forward_chunk),
            self.worker.executor,
            max_batch_size=b.max_batch_size,
            max_queue_delay_us=b.max_queue_delay_us,
            micro_batch_size=b.inference_micro_batch_size,
        )
        await self.batcher.start()
        self.loaded = True

    async def close(self) -> None:
        self.loaded = False
        if self.batcher is not None:
            await self.batcher.close()


# ---------------------------------------------------------------------------------------------
# Loading models and tokenizers
# ---------------------------------------------------------------------------------------------


def load_model(path: str, field: str, *, value_head: bool | None, seed: int):
    """(model, arch, tokenizer) from our checkpoint, a run directory or a HF directory."""
    from trainer.checkpoint import load_model_for_inference

    if not path:
        raise InvalidArgument(field, "is not set")
    try:
        return load_model_for_inference(path, value_head=value_head, seed=seed)
    except InvalidArgument as exc:
        raise InvalidArgument(field, str(exc)) from None
    except AlignerError as exc:
        raise type(exc)(f"{field}: {exc}") from None


def load_tokenizer(config: ModelServiceConfig, checkpoint_tokenizer, arch):
    """`tokenizer_path` when set, else the checkpoint's own (None when neither exists)."""
    tokenizer = checkpoint_tokenizer
    if config.tokenizer_path:
        from trainer.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(config.tokenizer_path)
    if tokenizer is not None and tokenizer.vocab_size > arch.vocab_size:
        raise InvalidArgument(
            "tokenizer_path",
            f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's {arch.vocab_size}",
        )
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def parse_args(service: str, argv: list[str]) -> tuple[ModelServiceConfig, str | None]:
    parser = argparse.ArgumentParser(
        prog=f"aligner serve {service}",
        description=f"Serve the {service} model over gRPC (aligner.v1).",
    )
    parser.add_argument("--config", help="YAML config (ModelServiceConfig)")
    parser.add_argument("--ports-file", help="write the bound ports here as JSON once listening")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. server.port=5555")
    args = parser.parse_intermixed_args(argv)
    return load_config(ModelServiceConfig, args.config, args.overrides), args.ports_file


def serve(
    service: str,
    argv: list[str],
    build: Callable[[ModelServiceConfig, ModelWorker], list[Component]],
) -> int:
    """`aligner serve <service>`: run the components `build(config, worker)` until SIGTERM (on a
    tensor-parallel follower rank: until the leader stops)."""
    from services import tensor_parallel

    config, ports_file = parse_args(service, argv)
    configure_service_process(config.server, service)
    tp = int(config.model.tensor_model_parallel_size)
    for path in filter(None, (config.checkpoint_path, config.critic_checkpoint_path)):
        tensor_parallel.check_sizes(tp, path)
    group = tensor_parallel.init(tp, config.seed)
    worker = ModelWorker(swap_models_to_cpu=config.trainer.ppo.swap_models_to_cpu, group=group)
    components = build(config, worker)
    if group is not None:
        for component in components:
            group.add(component)
        if not group.leader:
            _follow(config, worker, components)
            return 0
    asyncio.run(_serve(service, config, ports_file, worker, components))
    return 0


def _load_all(config: ModelServiceConfig, components: list[Component]) -> None:
    torch.set_num_threads(max(1, int(config.server.torch_threads)))  # the model thread's own pool
    for component in components:
        component.load()


def _follow(config: ModelServiceConfig, worker: ModelWorker, components: list[Component]) -> None:
    """A follower rank: load its shards, then run the leader's calls until it stops. SIGTERM (which
    torchrun sends every rank) is left to the leader, which drains and then stops the group."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker.executor.submit(_load_all, config, components).result()
    worker.executor.submit(worker.group.follow).result()
    worker.shutdown()


async def _serve(service, config: ModelServiceConfig, ports_file, worker: ModelWorker, components) -> None:
    server = GrpcServer(config.server, service)
    for component in components:
        component.add_to(server)
    model_loaded = metrics.MODEL_LOADED.labels(service)
    loop = asyncio.get_running_loop()

    async def ready() -> None:
        await loop.run_in_executor(worker.executor, _plain_exceptions, _load_all, config, components)
        for component in components:
            await component.start()
        model_loaded.set(1)
        log.info("models loaded", placement=worker.placement())

    try:
        await server.run(ready=ready, ports_file=ports_file)
    finally:
        model_loaded.set(0)
        for component in components:
            await component.close()
        if worker.group is not None:  # after the drain: release the followers
            await loop.run_in_executor(worker.executor, worker.group.stop)
        worker.shutdown()
