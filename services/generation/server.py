"""The generation service: a real Triton Inference Server (PyTriton) in front of the sampling
engine, and `aligner.v1.Generation` (weight pushes, Info) in the same process.

    main thread:  asyncio loop with the aligner.v1 gRPC server (common.grpc_server): health,
                  reflection, metrics, auth, SIGTERM drain
    owner thread: loads the checkpoint, builds the engine, starts `tritonserver` and stops it at
                  shutdown (PyTriton starts it with PR_SET_PDEATHSIG, tied to the starting
                  *thread*, so that thread must live as long as the server)
    Triton's handler threads: run `triton_model.GenerationModel` on dynamic batches

Health is NOT_SERVING until the engine is loaded and Triton's models are ready. A weight push is
assembled and validated in full (`weights.WeightAssembler`), then applied under the lock that
every generation holds from its version check to its last token, so no request sees half-old,
half-new weights, and versions only grow.

Triton's ports come from the config (0 = a free port) and bind `server.host` (127.0.0.1 by
default). Once everything is up, one JSON line `{"event": "generation_ready", ...}` with every
bound port is printed (and written to `--ports-file`), for launchers and tests.

Tensor parallel (`torchrun --nproc-per-node N -m services.cli serve generation ...
model.tensor_model_parallel_size=N`, torch engine, `decode=megatron`): every rank loads its
shard of the policy. Rank 0 is the server above, with a `ShardedEngine`: each generate call and
each weight push runs on every rank in the same order (`services.tensor_parallel.ModelGroup`),
a push validated against the full model and each rank sent only its shard. The other ranks run
nothing but those calls (`follow`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import signal
import socket
import sys
import sysconfig
import threading
import time
from pathlib import Path

import torch
from aligner.v1 import generation_pb2, generation_pb2_grpc

from common import metrics
from common.config import ConfigError, GenerationServiceConfig, load_config
from common.errors import AlignerError, InvalidArgument, NotFound, Unavailable
from common.grpc_server import GrpcServer, write_atomic
from common.logging import configure_logging, get_logger
from services.generation.weights import ParamSpec, StaleVersion, WeightAssembler, param_specs

log = get_logger(__name__)

ENGINES = ("torch", "tensorrt_llm")
DECODES = ("fused", "megatron")  # the torch engine's decode paths (trainer.engine.TorchEngine)
SERVICE = "generation"
WATCH_INTERVAL_S = 1.0
# `triton_model` imports the engine and megatron (seconds): it is imported where used, so a bad
# config or an unavailable engine fails at once, with one line.


# ---------------------------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------------------------


def check_engine_available(config: GenerationServiceConfig) -> None:
    """Fail before anything starts when the configured engine cannot run here."""
    if config.engine not in ENGINES:
        raise ConfigError(f"config key 'engine': must be one of {', '.join(ENGINES)}, got {config.engine!r}")
    if config.decode not in DECODES:
        raise ConfigError(f"config key 'decode': must be one of {', '.join(DECODES)}, got {config.decode!r}")
    if config.engine == "tensorrt_llm":
        from services.generation import trtllm_engine

        trtllm_engine.check_available()


def check_tensor_parallel(config: GenerationServiceConfig) -> int:
    """The tensor-parallel size, checked before anything loads: the torch engine with the
    megatron decode path only, a size that equals the job's and divides the model."""
    from services import tensor_parallel

    tp = int(config.model.tensor_model_parallel_size)
    if tp > 1 and config.engine != "torch":
        raise ConfigError(
            f"config key 'engine': {config.engine} serves on one device here; "
            f"{tensor_parallel.KEY}={tp} needs engine=torch (with decode=megatron)"
        )
    if tp > 1 and config.decode == "fused":
        raise ConfigError(
            f"config key 'decode': fused covers tensor-parallel size 1 only; "
            f"use decode=megatron with {tensor_parallel.KEY}={tp}"
        )
    tensor_parallel.check_sizes(tp, config.checkpoint_path)
    return tp


def build_engine(config: GenerationServiceConfig):
    """(engine, Limits) for the configured checkpoint and engine kind."""
    from services.generation import triton_model
    from trainer.checkpoint import load_model_for_inference

    model, arch, tokenizer = load_model_for_inference(
        config.checkpoint_path, value_head=False, seed=config.seed
    )
    pad_id = tokenizer.pad_id if tokenizer is not None else 0
    end_id = tokenizer.eos_id if tokenizer is not None else None
    if config.engine == "tensorrt_llm":
        from services.generation.trtllm_engine import TrtLlmEngine

        engine = TrtLlmEngine(model, arch, max_batch_size=config.max_batch_size, pad_id=pad_id)
    else:
        from trainer.engine import TorchEngine

        try:
            engine = TorchEngine(
                model, max_seq_len=arch.encoder_seq_length, pad_id=pad_id, decode=config.decode
            )
        except InvalidArgument as exc:  # e.g. decode=fused on a model it does not cover
            if exc.field != "decode":
                raise
            raise ConfigError(
                f"config key 'decode': {exc.problem}; set decode=megatron for this model"
            ) from None
    limits = triton_model.Limits(
        vocab_size=arch.vocab_size,
        max_seq_len=arch.encoder_seq_length,
        default_end_id=end_id,
        default_pad_id=pad_id,
    )
    return engine, limits


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _allow_ragged_batching() -> None:
    """Make PyTriton's generated model configs say `allow_ragged_batch: true` for `input_ids`.

    Triton's dynamic batcher merges requests only when their inputs have the same shape, unless
    the input allows ragged batches (the stock TensorRT-LLM backend config sets it for
    `input_ids`). PyTriton 0.7 has no option for it, so its config generator is extended here;
    the proxy hands our infer function each request separately either way."""
    import pytriton.models.model as pytriton_model
    from pytriton.model_config.generator import ModelConfigGenerator

    from services.generation import triton_model

    if getattr(pytriton_model.ModelConfigGenerator, "_aligner_ragged", False):
        return

    class RaggedConfigGenerator(ModelConfigGenerator):
        _aligner_ragged = True

        def get_config(self) -> dict:
            config = super().get_config()
            for item in config.get("input", []):
                if item["name"] in triton_model.RAGGED_INPUTS:
                    item["allow_ragged_batch"] = True
            return config

    pytriton_model.ModelConfigGenerator = RaggedConfigGenerator


def start_triton(config: GenerationServiceConfig, model):
    """Start `tritonserver` with both models bound; returns (Triton, ports)."""
    # The Python backend stub links libpython: make it find this interpreter's (PyTriton passes
    # its environment to the server), or every model load fails on a mismatched libpython.
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and not os.environ.get("LD_LIBRARY_PATH", "").startswith(libdir):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{os.environ.get('LD_LIBRARY_PATH', '')}".rstrip(":")
    _allow_ragged_batching()
    from pytriton.triton import Triton, TritonConfig

    from services.generation import triton_model

    host = config.server.host
    ports = {
        "triton_grpc_port": config.triton_grpc_port or free_port(host),
        "triton_http_port": config.triton_http_port or free_port(host),
        "triton_metrics_port": config.triton_metrics_port or free_port(host),
    }
    triton = Triton(
        config=TritonConfig(
            http_address=host, http_port=ports["triton_http_port"],
            grpc_address=host, grpc_port=ports["triton_grpc_port"],
            metrics_address=host, metrics_port=ports["triton_metrics_port"],
            exit_timeout_secs=max(1, int(config.server.grace_seconds)),
        )
    )  # fmt: skip
    try:
        for name, infer, decoupled in (
            (config.triton_model_name, model.infer, False),
            (config.triton_model_name + triton_model.STREAM_SUFFIX, model.infer_stream, True),
        ):
            triton.bind(
                model_name=name,
                infer_func=infer,
                inputs=triton_model.triton_inputs(),
                outputs=triton_model.triton_outputs(),
                config=triton_model.model_config(config.max_batch_size, config.max_queue_delay_us, decoupled),
                strict=True,
            )
        triton.run()
    except BaseException:
        triton.stop()
        raise
    return triton, ports


# ---------------------------------------------------------------------------------------------
# The service
# ---------------------------------------------------------------------------------------------


class ShardedEngine:
    """The leader's engine when the policy is sharded over the ranks of a `ModelGroup`: the
    torch engine's interface, every call run on every rank."""

    def __init__(self, engine, group):
        self.local = engine  # this rank's shard
        self.model = engine.model
        self.size = group.size
        self._generate = group.collective(engine.generate)
        self._load = group.collective_per_rank(engine.load_state_dict)

    @property
    def policy_version(self) -> int:
        return self.local.policy_version

    @policy_version.setter
    def policy_version(self, version: int) -> None:
        self.local.policy_version = version

    def generate(self, prompts, params, on_step=None):
        # A row without a seed gets one here, once: ranks drawing their own would sample apart.
        params = [
            p if p.seed is not None else dataclasses.replace(p, seed=random.SystemRandom().getrandbits(63))
            for p in params
        ]
        return self._generate(prompts, params, on_step=on_step)

    def load_state_dict(self, state_dict, strict: bool = True, policy_version: int | None = None) -> None:
        """A full (TP=1 layout) state dict: each rank is sent and copies only its own shard.
        (Cloned: a slice would be pickled with the whole tensor's storage.)"""
        from trainer.hf import shard_state_dict

        shards = [
            {name: t.clone() for name, t in shard_state_dict(state_dict, rank, self.size).items()}
            for rank in range(self.size)
        ]
        self._load([(shard, strict, policy_version) for shard in shards])


def join_group(engine, group) -> None:
    """Make `engine` (this rank's shard) a target of `group`, taking the leader's tokens and
    decisions at every generation step (trainer.engine)."""
    engine.sync = group.share
    group.add(engine)


def follow(config: GenerationServiceConfig, group) -> None:
    """A follower rank: load its shard, then run the leader's generate calls and weight pushes
    until the leader stops the group. SIGTERM (torchrun sends it to every rank) is the leader's
    to handle: it drains, stops Triton, then releases the followers."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    engine, _ = build_engine(config)
    join_group(engine, group)
    group.follow()


class GenerationService:
    """Engine + Triton, owned by one thread (see the module doc); thread-safe."""

    def __init__(self, config: GenerationServiceConfig, group=None):
        self.config = config
        self.group = group  # the tensor-parallel ranks (a ModelGroup), when the policy is sharded
        self.engine = None
        self.limits = None  # triton_model.Limits once loaded
        self.specs: dict[str, ParamSpec] = {}
        self.ports: dict[str, int] = {}
        # Held by every generation from its version check to its end, and by weight updates.
        self.lock = threading.Lock()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.failure: str | None = None  # set when Triton died under us
        self._owner: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._owner = threading.Thread(target=self._own, name="generation-owner")
        self._owner.start()

    async def wait_ready(self) -> None:
        """Await the engine and Triton (for `GrpcServer.run(ready=...)`); re-raises a startup error."""
        await asyncio.get_running_loop().run_in_executor(None, self._ready.wait)
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Stop Triton and wait for the owner thread (also while it is still starting up); then
        release the tensor-parallel followers, once nothing can call the engine any more."""
        self._stop.set()
        if self._owner is not None:
            self._owner.join()
        if self.group is not None and self.engine is not None:
            # (A load that failed left the followers inside a loading collective: this
            # process's exit breaks their connections and torchrun stops the job.)
            self.group.stop()

    def load(self) -> None:
        """Build the engine (and what validates weight pushes against it: the full model's
        shapes, as the actor pushes its gathered weights whatever the ranks here hold)."""
        engine, limits = build_engine(self.config)
        specs = param_specs(engine.model)
        if self.group is not None:
            from trainer.hf import full_shape

            join_group(engine, self.group)
            specs = {n: ParamSpec(full_shape(n, s.shape, self.group.size), s.dtype) for n, s in specs.items()}
            engine = ShardedEngine(engine, self.group)
        self.engine, self.limits, self.specs = engine, limits, specs

    def triton_model(self):
        """The infer functions Triton serves (`triton_model.GenerationModel`), after `load`."""
        from services.generation import triton_model

        return triton_model.GenerationModel(self.engine, self.lock, self.limits, self.config.engine)

    def _own(self) -> None:
        triton = None
        try:
            started = time.perf_counter()
            self.load()
            loaded = time.perf_counter()
            if not self._stop.is_set():
                triton, self.ports = start_triton(self.config, self.triton_model())
                metrics.MODEL_LOADED.labels(SERVICE).set(1)
                log.info(
                    "generation engine and triton ready", engine=self.config.engine,
                    model_name=self.config.triton_model_name, load_s=round(loaded - started, 2),
                    triton_start_s=round(time.perf_counter() - loaded, 2), **self.ports,
                )  # fmt: skip
        except BaseException as exc:  # noqa: BLE001 - reported through wait_ready
            self._error = exc
        finally:
            self._ready.set()
        # Watch Triton while serving: if it dies, stop the whole process (a supervisor restarts
        # it) rather than answer health checks for a server that cannot generate.
        while not self._stop.wait(timeout=WATCH_INTERVAL_S):
            if triton is not None and not triton.is_alive():
                self.failure = "tritonserver exited unexpectedly (see the log above); stopping the service"
                log.error("triton died", reason=self.failure)
                os.kill(os.getpid(), signal.SIGTERM)  # the gRPC server's graceful-shutdown path
                break
        self._stop.wait()
        if triton is not None:
            metrics.MODEL_LOADED.labels(SERVICE).set(0)
            triton.stop()
            log.info("triton stopped")

    # --- control plane -------------------------------------------------------------------------

    @property
    def policy_version(self) -> int:
        return int(self.engine.policy_version) if self.engine is not None else 0

    def apply_weights(self, version: int, state_dict: dict[str, torch.Tensor]) -> None:
        with self.lock:
            if version <= self.engine.policy_version:
                raise StaleVersion(
                    f"policy_version: {version} is not newer than the engine's version {self.engine.policy_version}"
                )
            self.engine.load_state_dict(state_dict, strict=True)
            self.engine.policy_version = version

    def info(self) -> generation_pb2.InfoResponse:
        limits = self.limits
        return generation_pb2.InfoResponse(
            model_name=self.config.triton_model_name,
            engine=self.config.engine,
            policy_version=self.policy_version,
            vocab_size=limits.vocab_size if limits else 0,
            max_seq_len=limits.max_seq_len if limits else 0,
            end_id=-1 if limits is None or limits.default_end_id is None else limits.default_end_id,
            pad_id=limits.default_pad_id if limits else 0,
        )


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, service: GenerationService):
        self.service = service

    async def UpdateWeights(self, request_iterator, context) -> generation_pb2.UpdateWeightsResponse:  # noqa: N802
        service = self.service
        if service.engine is None:
            raise AlignerError("the engine is still loading; retry when the service reports SERVING")
        assembler = WeightAssembler(service.specs, service.policy_version)
        started = time.perf_counter()
        async for chunk in request_iterator:
            assembler.add(chunk)
        state_dict = assembler.finish()
        # Applying waits for the running generation (the lock): keep the event loop free.
        await asyncio.get_running_loop().run_in_executor(
            None, service.apply_weights, assembler.policy_version, state_dict
        )
        metrics.WEIGHT_UPDATES.labels(service.config.engine).inc()
        metrics.WEIGHT_UPDATE_BYTES.labels(service.config.engine).inc(assembler.num_bytes)
        log.info(
            "weights updated", policy_version=assembler.policy_version, tensors=len(state_dict),
            bytes=assembler.num_bytes, seconds=round(time.perf_counter() - started, 3),
        )  # fmt: skip
        return generation_pb2.UpdateWeightsResponse(
            policy_version=assembler.policy_version,
            num_tensors=len(state_dict),
            num_bytes=assembler.num_bytes,
        )

    async def Info(self, request, context) -> generation_pb2.InfoResponse:  # noqa: N802
        return self.service.info()


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


async def serve(config: GenerationServiceConfig, ports_file: str | None = None, group=None) -> None:
    server = GrpcServer(config.server, SERVICE)
    service = GenerationService(config, group)
    server.add_servicer(generation_pb2_grpc.add_GenerationServicer_to_server, GenerationServicer(service))

    async def ready() -> None:
        await service.wait_ready()
        info = {"event": "generation_ready", "service": SERVICE, "host": config.server.host,
                "port": server.port, "metrics_port": server.metrics_port, **service.ports,
                "model_name": config.triton_model_name, "pid": os.getpid()}  # fmt: skip
        print(json.dumps(info), flush=True)
        if ports_file:
            write_atomic(Path(ports_file), json.dumps(info) + "\n")

    service.start()
    try:
        await server.run(ready=ready)
    finally:
        await asyncio.get_running_loop().run_in_executor(None, service.stop)
    if service.failure:
        raise Unavailable(service.failure)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="aligner serve generation", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (schema: GenerationServiceConfig)")
    parser.add_argument("--ports-file", help="write the bound ports here (JSON) once serving")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. engine=torch server.port=5558")
    args = parser.parse_args(argv)
    config = load_config(GenerationServiceConfig, args.config, args.overrides)
    return run(config, ports_file=args.ports_file)


def run(config: GenerationServiceConfig, ports_file: str | None = None) -> int:
    configure_logging(SERVICE, config.server.log_format)
    check_engine_available(config)
    if not Path(config.checkpoint_path).exists():  # fail before the slow imports
        raise NotFound(f"config key 'checkpoint_path': {config.checkpoint_path} does not exist")
    tp = check_tensor_parallel(config)
    torch.set_num_threads(max(1, config.server.torch_threads))
    group = None
    if tp > 1:
        from services import tensor_parallel

        group = tensor_parallel.init(tp, config.seed)
        if not group.leader:
            follow(config, group)
            return 0
    asyncio.run(serve(config, ports_file, group))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
