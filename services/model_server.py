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
from common.config import MegatronRuntimeConfig, ModelServiceConfig, load_config, notice
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


# The server's `model.*` runtime keys (activation recompute, ...), set once by `run_service`
# before any model loads: every model of the process is built with them instead of the
# checkpoint's own.
_runtime: MegatronRuntimeConfig | None = None


def load_model(path: str, field: str, *, value_head: bool | None, seed: int):
    """(model, arch, tokenizer) from our checkpoint, a run directory or a HF directory."""
    from trainer.checkpoint import load_model_for_inference

    if not path:
        raise InvalidArgument(field, "is not set")
    try:
        return load_model_for_inference(path, value_head=value_head, seed=seed, runtime=_runtime)
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
    config, ports_file = parse_args(service, argv)
    return run_service(service, config, ports_file, build)


# Which servers hold a critic, and what trainer.ppo.combine_rm_and_critic_server must be there.
COMBINED = {"reward-critic": True, "critic": False}


def check_service_keys(service: str, config: ModelServiceConfig) -> None:
    """Keys that only some servers use are errors on the others (never silently ignored)."""
    combine = config.trainer.ppo.combine_rm_and_critic_server
    key = "trainer.ppo.combine_rm_and_critic_server"
    if service not in COMBINED and combine is not None:
        raise InvalidArgument(key, f"is for the critic servers, not `aligner serve {service}`")
    if service in COMBINED and combine is not None and combine != COMBINED[service]:
        other = "reward-critic" if combine else "critic"
        raise InvalidArgument(
            key,
            f"is {combine} but this is `aligner serve {service}`; use `aligner serve {other}` "
            "(or `aligner serve ppo-critic`, which picks by this key)",
        )


def check_devices(config: ModelServiceConfig, world: int) -> None:
    """trainer.num_nodes x trainer.devices against the processes of this server job. A server
    job is one copy of the model, sharded over its `world` ranks by tensor parallelism; more
    devices than that are more copies, which run as replicas (separate server jobs that the PPO
    client spreads requests over), not inside this job."""
    if config.trainer.num_nodes is None and config.trainer.devices is None:
        return
    nodes, devices = (1 if v is None else int(v) for v in (config.trainer.num_nodes, config.trainer.devices))
    if nodes < 1 or devices < 1:
        raise InvalidArgument(
            "trainer.devices", f"trainer.num_nodes and trainer.devices must be >= 1, got {nodes} x {devices}"
        )
    total = nodes * devices
    if total == world:
        return
    if total % world:
        raise InvalidArgument(
            "trainer.devices",
            f"trainer.num_nodes x trainer.devices = {total} is not a multiple of this server's "
            f"{world} process(es) (one per tensor-parallel rank)",
        )
    notice(
        "trainer.devices",
        devices,
        f"trainer.num_nodes x trainer.devices = {nodes} x {devices}, but this server is one model "
        f"copy on {world} device(s) (model.tensor_model_parallel_size); run the other "
        f"{total // world - 1} copies as replicas of this server for data parallelism",
    )


def run_service(
    service: str,
    config: ModelServiceConfig,
    ports_file: str | None,
    build: Callable[[ModelServiceConfig, ModelWorker], list[Component]],
) -> int:
    """Run the components `build(config, worker)` of `service` with a loaded config."""
    import os

    from services import tensor_parallel

    global _runtime
    configure_service_process(config.server, service)
    check_service_keys(service, config)
    tp = int(config.model.tensor_model_parallel_size)
    for path in filter(None, (config.checkpoint_path, config.critic_checkpoint_path)):
        tensor_parallel.check_sizes(tp, path)
    check_devices(config, int(os.environ.get("WORLD_SIZE", "1")))
    experiment = ExperimentLog.check(service, config)
    _runtime = config.model
    group = tensor_parallel.init(tp, config.seed)
    worker = ModelWorker(swap_models_to_cpu=config.trainer.ppo.swap_models_to_cpu, group=group)
    components = build(config, worker)
    if group is not None:
        for component in components:
            group.add(component)
        if not group.leader:
            _follow(config, worker, components)
            return 0
    asyncio.run(_serve(service, config, ports_file, worker, components, experiment))
    return 0


class ExperimentLog:
    """NeMo's `exp_manager` on a server with a critic: each critic Train call's metrics (value
    loss, clip fraction, grad norm, lr, ...) at the critic's optimizer step, in
    `<explicit_log_dir>/critic.jsonl`, TensorBoard (`tensorboard/`, scalars `critic/<name>`) and
    W&B (offline by default) when `exp_manager.create_wandb_logger` is set. Only the serving rank
    writes. Nothing is written without `exp_manager.explicit_log_dir`."""

    STREAM = "critic"

    def __init__(self, config: ModelServiceConfig):
        self.config = config
        self.metrics = None

    @classmethod
    def check(cls, service: str, config: ModelServiceConfig) -> ExperimentLog | None:
        """Before anything loads: the log this server will write, or None; a logger that cannot
        work is an error, and exp_manager keys on a server that trains nothing get a notice."""
        from trainer.loop import check_loggers

        exp = config.exp_manager
        if service not in COMBINED:
            if exp.explicit_log_dir or exp.create_wandb_logger:
                notice(
                    "exp_manager.explicit_log_dir",
                    exp.explicit_log_dir,
                    f"`aligner serve {service}` trains nothing, so it writes no metrics",
                )
            return None
        if exp.create_wandb_logger and not exp.explicit_log_dir:
            raise InvalidArgument(
                "exp_manager.explicit_log_dir",
                "must be set for exp_manager.create_wandb_logger (the W&B files go there)",
            )
        check_loggers(exp)
        return cls(config) if exp.explicit_log_dir else None

    def start(self) -> None:
        from pathlib import Path

        from trainer.critic import add_train_listener
        from trainer.loop import MetricsLog

        run_dir = Path(self.config.exp_manager.explicit_log_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(
            run_dir, self.config.exp_manager, self.config, resume_step=None, enabled=True
        )
        add_train_listener(self.record)
        log.info("critic metrics", run_dir=str(run_dir))

    def record(self, step: int, values: dict[str, float]) -> None:
        self.metrics.log(self.STREAM, step, values)
        self.metrics.flush()

    def close(self) -> None:
        from trainer.critic import remove_train_listener

        if self.metrics is not None:
            remove_train_listener(self.record)
            self.metrics.close()


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


async def _serve(
    service, config: ModelServiceConfig, ports_file, worker: ModelWorker, components, experiment=None
) -> None:
    server = GrpcServer(config.server, service)
    if experiment is not None:
        experiment.start()
    for component in components:
        component.add_to(server)
    model_loaded = metrics.MODEL_LOADED.labels(service)
    loop = asyncio.get_running_loop()

    followers_serving = False  # the followers reach `follow()` only once every rank has loaded

    async def ready() -> None:
        nonlocal followers_serving
        await loop.run_in_executor(worker.executor, _plain_exceptions, _load_all, config, components)
        followers_serving = True
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
        if worker.group is not None and followers_serving:  # after the drain: release the followers
            await loop.run_in_executor(worker.executor, worker.group.stop)
        # (a load that failed here leaves the followers inside a loading collective: this
        # process's exit breaks their gloo connections and torchrun stops the job)
        worker.shutdown()
        if experiment is not None:
            experiment.close()
