"""The services in the orchestrator's own process, for measuring what the network costs
(`benchmarks/bench_ppo.py`) and for tests.

    services = InProcessServices(reward_critic_cfg, reference_cfg, generation_cfg)
    run = PpoRun(cfg, run_dir, scorer=services.scorer, generator=services.generator)

Nothing here re-implements a service: each server's own components are built from the same
config (`services.reward_critic.server.build`, `services.reference.server.build`,
`services.generation.server.GenerationService`), loaded on their own model thread, and their
gRPC servicers are called directly: the typed clients get a `DirectStub` instead of a channel
stub, and the generation client a transport that hands the Triton model's infer function the
request tensors PyTriton would. So the requests, validation, batching, sampling rules and
replies are the servers' own; only serialisation and sockets are left out.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from common.config import GenerationServiceConfig, ModelServiceConfig
from common.replicas import ReplicaSet
from services.critic.client import CriticClient
from services.generation.client import GenerationClient
from services.model_server import ModelWorker, _load_all
from services.orchestrator.clients import GenerationReplicas, ModelServices, ServerClients
from services.reference.client import ReferenceClient
from services.reward.client import RewardClient


class EventLoopThread:
    """An asyncio loop on its own thread (the servers' main loop): handlers and batchers run here."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="in-process-loop", daemon=True)
        self._thread.start()

    def run(self, coroutine) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _stream(messages: Iterable) -> Any:
    for message in messages:
        yield message


class DirectStub:
    """A gRPC stub whose methods call a servicer's async handlers on the loop. Request streams
    (an iterator of messages) become the async iterator a handler reads."""

    def __init__(self, servicer: Any, loop: EventLoopThread):
        self._servicer, self._loop = servicer, loop

    def __getattr__(self, method: str):
        handler = getattr(self._servicer, method)

        def call(request, timeout: float | None = None, **_):
            if not hasattr(request, "SerializeToString"):  # a client stream
                request = _stream(request)
            return self._loop.run(handler(request, None))

        return call


class _Servicers:
    """Stands in for the gRPC server in `component.add_to(server)`: keeps each servicer by service."""

    def __init__(self):
        self.by_service: dict[str, Any] = {}

    def add_servicer(self, add_to_server, servicer) -> None:
        name = add_to_server.__name__.removeprefix("add_").removesuffix("Servicer_to_server")
        self.by_service[name] = servicer


def _model_server(build, config: ModelServiceConfig, loop: EventLoopThread):
    """A model server's components, loaded and started: {service name: servicer}, and its worker."""
    worker = ModelWorker(swap_models_to_cpu=config.trainer.ppo.swap_models_to_cpu)
    components = build(config, worker)
    servicers = _Servicers()
    for component in components:
        component.add_to(servicers)
    worker.executor.submit(_load_all, config, components).result()
    for component in components:
        loop.run(component.start())
    return servicers.by_service, worker, components


class InProcessTriton:
    """The generation client's transport to the Triton model's own infer function, on the
    generation service's model thread."""

    def __init__(self, model, max_batch_size: int, model_thread: ThreadPoolExecutor):
        from pytriton.proxy.types import Request

        self._request = Request
        self._model, self._max_batch_size, self._thread = model, max_batch_size, model_thread

    def max_batch_size(self) -> int:
        return self._max_batch_size

    def is_model_ready(self) -> bool:
        return True

    def infer(self, requests: list[dict[str, np.ndarray]], timeout_s: float) -> list[dict[str, np.ndarray]]:
        batch = [self._request(data=arrays) for arrays in requests]
        return self._thread.submit(self._model.infer, batch).result()

    def close(self) -> None:
        self._thread.shutdown(wait=True)


def _one(name: str, client) -> ReplicaSet:
    return ReplicaSet(name, resolve=lambda: [f"in-process:{name}"], connect=lambda _: client, close=lambda _: None)


class InProcessServices:
    """reward-critic, reference and generation in this process, as `.scorer` and `.generator`."""

    def __init__(self, reward_critic: ModelServiceConfig, reference: ModelServiceConfig,
                 generation: GenerationServiceConfig):  # fmt: skip
        from services.generation.server import GenerationService, GenerationServicer, check_engine_available
        from services.reference.server import build as build_reference
        from services.reward_critic.server import build as build_reward_critic

        check_engine_available(generation)
        self._loop = EventLoopThread()
        rc, self._rc_worker, self._rc_components = _model_server(build_reward_critic, reward_critic, self._loop)
        ref, self._ref_worker, self._ref_components = _model_server(build_reference, reference, self._loop)
        stub = lambda service, servicers: DirectStub(servicers[service], self._loop)  # noqa: E731
        reward_critic_set = _one("reward-critic", ServerClients(
            reward=RewardClient("in-process", stub=stub("Reward", rc)),
            critic=CriticClient("in-process", stub=stub("Critic", rc)),
        ))  # fmt: skip
        reference_set = _one("reference", ServerClients(reference=ReferenceClient("in-process", stub=stub("Reference", ref))))
        self.scorer = ModelServices(reward_critic_set, reward_critic_set, reference_set)

        self.generation = GenerationService(generation)
        model_thread = ThreadPoolExecutor(1, "in-process-generation", initializer=torch.set_num_threads,
                                          initargs=(max(1, generation.server.torch_threads),))  # fmt: skip
        model_thread.submit(self.generation.load).result()
        self._triton = InProcessTriton(self.generation.triton_model(), generation.max_batch_size, model_thread)
        client = GenerationClient(
            "in-process", "in-process", model_name=generation.triton_model_name, transport=self._triton,
            control_stub=DirectStub(GenerationServicer(self.generation), self._loop),
        )  # fmt: skip
        self.generator = GenerationReplicas(
            "generation", resolve=lambda: ["in-process:generation"], connect=lambda _: client,
            close=lambda _: None, deadline_base_s=3600.0, deadline_per_token_s=0.0,
        )  # fmt: skip

    def close(self) -> None:
        for component in self._rc_components + self._ref_components:
            self._loop.run(component.close())
        self._rc_worker.shutdown()
        self._ref_worker.shutdown()
        self._triton.close()
        self._loop.close()
