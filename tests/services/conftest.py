"""Shared by the model-service tests: tiny checkpoints made once per session, and real server
subprocesses (`aligner serve <name>`) on 127.0.0.1 with free ports, always stopped."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from common.config import ModelArchConfig, ModelServiceConfig

ROOT = Path(__file__).resolve().parents[2]
ARCH = ModelArchConfig(
    num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
    vocab_size=320, encoder_seq_length=48,
)  # fmt: skip
TEXTS = [
    "\n\nHuman: What is the capital of France?\n\nAssistant: Paris is the capital of France.",
    "\n\nHuman: Say something kind.\n\nAssistant: You are doing great, keep going!",
    "\n\nHuman: Count to three.\n\nAssistant: One, two, three.",
]


# Critic training settings whose updates are easy to compare: no decay, a constant lr, the whole
# rollout in one optimizer step.
CRITIC_TRAINING = {
    "model.optim.lr": 1e-3,
    "model.optim.weight_decay": 0.0,
    "model.optim.sched.name": "Constant",
    "model.micro_batch_size": 3,
    "model.global_batch_size": 64,
}


def random_sequences(n: int, seed: int = 0) -> list:
    """`n` token rows of 8-29 ids in [3, 320) (the tiny models' vocabulary)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (int(k),), generator=g) for k in torch.randint(8, 30, (n,), generator=g)]


@dataclass
class Checkpoints:
    reward: Path  # value head (a reward model)
    policy: Path  # no value head (the reference / initial policy)
    tokenizer: Path
    arch: ModelArchConfig


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Checkpoints:
    """A tiny reward model and a tiny policy, saved with trainer/checkpoint.py (with a byte-level
    BPE tokenizer trained here)."""
    from trainer import parallel
    from trainer.checkpoint import save_checkpoint
    from trainer.model import build_model
    from trainer.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("model_services")
    tokenizer = train_bpe(TEXTS * 20, vocab_size=300, out_dir=root / "tokenizer")
    parallel.init_parallel(seed=1234)
    reward = build_model(ARCH, value_head=True, seed=11)
    policy = build_model(ARCH, value_head=False, seed=12)
    save_checkpoint(root / "reward", reward, step=0, arch=ARCH, tokenizer=tokenizer)
    save_checkpoint(root / "policy", policy, step=0, arch=ARCH, tokenizer=tokenizer)
    return Checkpoints(
        reward=root / "reward", policy=root / "policy", tokenizer=root / "tokenizer", arch=ARCH
    )


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate (openssl CLI)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("certs")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca")
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "1", *ext)  # fmt: skip
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_argv(nproc: int, program: tuple[str, ...] = ("-m", "services.cli")) -> list[str]:
    """`torchrun --nproc-per-node nproc` on 127.0.0.1 with a free rendezvous port, running
    `program` (a script path or `-m module`); its arguments go after."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *program]  # fmt: skip


def server_env() -> dict:
    """One thread per process, CPU only, and no rank variables inherited from the test process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


class Server:
    """One `aligner serve <name>` subprocess; with `nproc` > 1, a tensor-parallel server: the
    same command under `torchrun --nproc-per-node nproc` (CPU, gloo)."""

    def __init__(
        self, name: str, config: ModelServiceConfig, workdir: Path, overrides: list[str] = (), nproc: int = 1
    ):
        self.name = name
        self.nproc = nproc
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / f"{name}.yaml"
        OmegaConf.save(OmegaConf.structured(config), self.config_path)
        self.ports_file = workdir / f"{name}.ports.json"
        self.log_path = workdir / f"{name}.log"
        self.ports_file.unlink(missing_ok=True)
        launcher = [sys.executable, "-m", "services.cli"] if nproc == 1 else torchrun_argv(nproc)
        if nproc > 1:  # the model's CPU shards, on any machine
            overrides = [*overrides, f"model.tensor_model_parallel_size={nproc}"]
        argv = [*launcher, "serve", name, "--config", str(self.config_path),
                "--ports-file", str(self.ports_file), *overrides]  # fmt: skip
        env = server_env()
        if nproc > 1:
            env["CUDA_VISIBLE_DEVICES"] = ""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.info: dict = {}
        self._terminated = False

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.info['port']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.info['metrics_port']}/metrics"

    def wait_bound(self, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while not self.ports_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not bind in {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        self.info = json.loads(self.ports_file.read_text())
        return self.info

    def wait_serving(self, timeout: float = 120.0, **channel_kwargs) -> None:
        """`channel_kwargs` (ca_file, cert_file, key_file) for a TLS server's health check."""
        from common.grpc_client import wait_for_health

        self.wait_bound(timeout)
        wait_for_health(self.target, timeout=timeout, **channel_kwargs)

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as reply:
            return reply.read().decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        """One SIGTERM (a second one would mean "stop now" to a draining server). Under torchrun
        it goes to rank 0, which drains and then releases the other ranks, so that the job exits 0
        (torchrun itself would kill its workers on SIGTERM and fail)."""
        if self.proc.poll() is None and not self._terminated:
            self._terminated = True
            if self.nproc > 1 and self.info.get("pid"):
                os.kill(self.info["pid"], signal.SIGTERM)
            else:
                self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; kill (and fail) if it does not drain in time."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"{self.name} did not stop within {timeout}s of SIGTERM") from None
        return self.proc.returncode


@pytest.fixture(scope="session")
def service_config(checkpoints):
    """service_config(name, {dotted key: value}) -> a ModelServiceConfig for the tiny checkpoints
    on free ports (gRPC and metrics); checkpoint_path defaults to the reward model."""
    return lambda name, overrides=None: make_service_config(checkpoints, name, overrides)


def make_service_config(
    checkpoints: Checkpoints, name: str, overrides: dict | None = None
) -> ModelServiceConfig:
    config = ModelServiceConfig(name=name, checkpoint_path=str(checkpoints.reward))
    config.server.port = 0
    config.server.metrics_port = 0
    config.server.grace_seconds = 5.0
    cfg = OmegaConf.structured(config)
    for key, value in (overrides or {}).items():
        OmegaConf.update(cfg, key, value, merge=True)
    return OmegaConf.to_object(cfg)


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """start_server(name, config) -> a SERVING Server; every one is stopped (SIGTERM, exit 0
    checked) when the module is done."""
    started: list[Server] = []
    workdir = tmp_path_factory.mktemp("servers")

    def start(
        name: str, config: ModelServiceConfig, overrides: list[str] = (), wait: bool = True, nproc: int = 1
    ) -> Server:
        server = Server(name, config, workdir / f"{name}-{len(started)}", list(overrides), nproc=nproc)
        started.append(server)
        if wait:
            server.wait_serving(timeout=120.0 * nproc)  # every rank loads (and imports) on 2 shared cores
        return server

    yield start
    codes = {}
    for server in started:  # all drain at once
        server.terminate()
    for server in started:
        codes[f"{server.name}@{server.proc.pid}"] = server.stop()
    bad = {k: v for k, v in codes.items() if v != 0}
    assert not bad, f"servers exited with non-zero codes: {bad}"
