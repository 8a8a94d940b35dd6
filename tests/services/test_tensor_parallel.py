"""Tensor-parallel model servers: a TP=2 reference server under torchrun (gloo, 127.0.0.1)
returns the logprobs of a TP=1 server within 1e-5; bad TP sizes fail at startup naming the key."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from tests.services.conftest import ROOT, Server

pytestmark = pytest.mark.integration
ROWS = [[1, 5, 9, 2, 7, 30], [3, 4, 5], [200, 17, 8, 8, 1, 90, 4, 11]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "services.cli"]  # fmt: skip


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.mark.timeout(400)
def test_reference_tp2_matches_tp1(checkpoints, service_config, start_server, tmp_path):
    from services.reference.client import ReferenceClient

    tp1 = start_server("reference", service_config("reference", {"checkpoint_path": str(checkpoints.policy)}))
    with ReferenceClient(tp1.target) as client:
        expected = client.logprobs(ROWS)
    config = service_config("reference", {"checkpoint_path": str(checkpoints.policy)})
    tp2 = Server("reference", config, tmp_path / "tp2", ["model.tensor_model_parallel_size=2"])
    tp2.proc.kill()  # relaunch the same config under torchrun
    tp2.proc.wait()
    with open(tp2.log_path, "wb") as log:
        argv = [*_torchrun(2), "serve", "reference", "--config", str(tp2.config_path),
                "--ports-file", str(tp2.ports_file), "model.tensor_model_parallel_size=2"]  # fmt: skip
        tp2.proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=_env())
    try:
        tp2.wait_serving(timeout=300)
        with ReferenceClient(tp2.target) as client:
            got = client.logprobs(ROWS)
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        os.kill(tp2.info["pid"], signal.SIGTERM)  # rank 0 drains, then releases rank 1
        assert tp2.proc.wait(timeout=60) == 0, tp2.log()[-3000:]
        assert "tensor-parallel follower stopped" in tp2.log()
    finally:
        if tp2.proc.poll() is None:
            tp2.proc.send_signal(signal.SIGTERM)
            time.sleep(5)
            tp2.proc.kill()
            tp2.proc.wait()


@pytest.mark.timeout(120)
def test_tp_size_must_match_the_job_and_the_heads(checkpoints, tmp_path):
    base = [
        sys.executable,
        "-m",
        "services.cli",
        "serve",
        "reference",
        f"checkpoint_path={checkpoints.policy}",
    ]
    proc = subprocess.run([*base, "model.tensor_model_parallel_size=2"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=100)  # fmt: skip
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "model.tensor_model_parallel_size" in line and "torchrun" in line
    env = dict(_env(), WORLD_SIZE="3")  # 4 heads are not divisible by 3
    proc = subprocess.run([*base, "model.tensor_model_parallel_size=3"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=100)  # fmt: skip
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "model.tensor_model_parallel_size" in line and "num_attention_heads (4)" in line, line
