"""`aligner.v1.Orchestrator`: watch a PPO run (`Status`) and stop it cleanly (`Stop`).

The server runs on its own thread and event loop beside the training loop; it also serves the
process's Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import threading

from aligner.v1 import orchestrator_pb2, orchestrator_pb2_grpc

from common import metrics
from common.config import ServerConfig
from common.grpc_server import GrpcServer


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServicer):
    def __init__(self, run, run_id: str):
        self.run, self.run_id = run, run_id

    async def Status(self, request, context):  # noqa: N802 - gRPC method name
        run = self.run
        return orchestrator_pb2.StatusResponse(
            run_id=self.run_id,
            step=run.step_index,
            max_steps=run.cfg.trainer.ppo.max_steps,
            phase=run.phase,
            policy_version=run.policy_version,
            last_step_unix_time=metrics.PPO_LAST_STEP_TIMESTAMP._value.get(),  # noqa: SLF001
            stopping=run.stop_requested.is_set(),
            metrics=run.last_metrics,
        )

    async def Stop(self, request, context):  # noqa: N802
        self.run.save_on_stop = request.save_checkpoint
        self.run.stop_requested.set()
        return orchestrator_pb2.StopResponse(accepted=True, step=self.run.step_index)


class ControlServer:
    """Starts the control gRPC server on a background thread; `port` and `metrics_port` once up."""

    def __init__(self, run, run_id: str, config: ServerConfig):
        self._run, self._run_id, self._config = run, run_id, config
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._server: GrpcServer | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)

    def start(self) -> ControlServer:
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error
        return self

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def metrics_port(self) -> int:
        return self._server.metrics_port

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start():
            self._server = GrpcServer(self._config, "orchestrator")
            self._server.add_servicer(
                orchestrator_pb2_grpc.add_OrchestratorServicer_to_server,
                OrchestratorServicer(self._run, self._run_id),
            )
            await self._server.start()
            await self._server.set_serving(True)

        try:
            self._loop.run_until_complete(start())
        except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()

    def stop(self) -> None:
        if self._server is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._server.stop(grace=1.0), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
