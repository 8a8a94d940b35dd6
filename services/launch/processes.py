"""Service subprocesses on this machine: start, find their ports, wait for health, stop.

Each service is `aligner serve <name> --config FILE --ports-file FILE [overrides]` with port 0, so
nothing clashes; the ports file (written atomically once the server is bound) says where it is.
Stopping sends SIGTERM (a graceful drain), then SIGKILL after a grace period; the whole process
group goes, so nothing is left running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import Unavailable
from common.grpc_client import wait_for_health
from common.logging import get_logger

log = get_logger(__name__)


@dataclass
class ServiceProcess:
    name: str  # generation, reward-critic, reward, critic, reference
    config_path: Path
    overrides: list[str]
    log_path: Path
    ports_file: Path
    torch_threads: int = 1
    nproc: int = 1  # > 1: a tensor-parallel server, the same command under torchrun with this many ranks
    proc: subprocess.Popen | None = None
    info: dict = field(default_factory=dict)

    def start(self) -> None:
        self.ports_file.unlink(missing_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(self.torch_threads), MKL_NUM_THREADS=str(self.torch_threads),
                   PYTHONUNBUFFERED="1")
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # not ours to inherit
            env.pop(key, None)
        launcher = [sys.executable, "-m", "services.cli"]
        overrides = list(self.overrides)
        if self.nproc > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={self.nproc}", "-m", "services.cli"]  # fmt: skip
            overrides.append(f"model.tensor_model_parallel_size={self.nproc}")
        argv = [*launcher, "serve", self.name, "--config", str(self.config_path),
                "--ports-file", str(self.ports_file), *overrides]  # fmt: skip
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            # A new session: the service's own children (Triton) are stopped with it.
            self.proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        log.info("service starting", service=self.name, pid=self.proc.pid, log=str(self.log_path))

    def wait_ready(self, timeout_s: float) -> dict:
        """Wait for the ports file, then for grpc.health SERVING; returns the ports info."""
        deadline = time.monotonic() + timeout_s
        while not self.ports_file.exists():
            if self.proc.poll() is not None:
                raise Unavailable(f"{self.name} exited with code {self.proc.returncode} before serving "
                                  f"(last log lines:\n{self.tail_log()})")
            if time.monotonic() > deadline:
                raise Unavailable(f"{self.name} did not bind a port within {timeout_s:.0f}s (log: {self.log_path})")
            time.sleep(0.1)
        self.info = json.loads(self.ports_file.read_text())
        wait_for_health(f"{self.info['host']}:{self.info['port']}", timeout=max(1.0, deadline - time.monotonic()))
        ports = {k: v for k, v in self.info.items() if k not in ("event", "service", "pid", "model_name")}
        log.info("service started", service=self.name, pid=self.proc.pid, **ports)
        return self.info

    def restart_on_its_ports(self, timeout_s: float) -> dict:
        """Start it again where it was (gRPC, metrics and, for generation, Triton's ports), so that
        every client configured with its address finds it back; returns the new ports info."""
        info = self.info
        pinned = {"server.port": info["port"], "server.metrics_port": info["metrics_port"]}
        for key in ("triton_grpc_port", "triton_http_port", "triton_metrics_port"):
            if key in info:
                pinned[key] = info[key]
        self.stop()
        self.overrides = [o for o in self.overrides if o.split("=")[0] not in pinned]
        self.overrides += [f"{key}={value}" for key, value in pinned.items()]
        self.start()
        return self.wait_ready(timeout_s)

    def tail_log(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            code = self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.warning("service did not drain in time: killing", service=self.name)
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait()
        except ProcessLookupError:
            code = self.proc.wait()
        log.info("service stopped", service=self.name, pid=self.proc.pid, exit_code=code)
        return code


class ServiceGroup:
    """Start several services together; stop all of them on exit, whatever happens."""

    def __init__(self, services: list[ServiceProcess], timeout_s: float = 180.0):
        self.services = services
        self.timeout_s = timeout_s

    def __enter__(self) -> ServiceGroup:
        try:
            for service in self.services:
                service.start()
            for service in self.services:
                service.wait_ready(self.timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()

    def __getitem__(self, name: str) -> ServiceProcess:
        return next(s for s in self.services if s.name == name)
