"""PPO end to end over real service processes: a run, its control plane, resume equivalence, a
service restart, a service that stays down, and a wrong endpoint."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from aligner.v1 import orchestrator_pb2, orchestrator_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
COMPARED = ("reward_mean", "kl", "policy_loss", "entropy", "critic_value_loss", "response_length", "returns_mean")


def start_ppo(config: Path, overrides: list[str], log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "services.cli", "ppo", "--config", str(config), "--log-format", "json", *overrides]
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def finish(proc: subprocess.Popen, log_path: Path, timeout: float = 300) -> tuple[int, str]:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, log_path.read_text(errors="replace")


def steps(run_dir: Path) -> dict[int, dict]:
    """Metrics per step; a step logged twice (before and after a crash) keeps its last record."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {int(r["step"]): r for r in records}


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def control_port(log_path: Path) -> int | None:
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"control server"' in line:
            return json.loads(line)["port"]
    return None


def test_ppo_run_status_and_stop(services, assets, ppo_config, tmp_path):
    _, overrides = services
    run_dir = tmp_path / "run"
    log_path = tmp_path / "ppo.log"
    (tmp_path / "token").write_text("s3cret\n")
    proc = start_ppo(ppo_config(assets, run_dir, control_auth_token_file=str(tmp_path / "token")),
                     [*overrides, "trainer.ppo.max_steps=50"], log_path)  # fmt: skip
    auth = [("authorization", "Bearer s3cret")]
    try:
        port = wait_for(lambda: control_port(log_path), 120, proc, "the control server")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
            with pytest.raises(grpc.RpcError) as refused:  # no token, no Stop
                stub.Stop(orchestrator_pb2.StopRequest(save_checkpoint=False))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            status = wait_for(lambda: (s := stub.Status(orchestrator_pb2.StatusRequest(), metadata=auth)).step >= 2
                              and s, 240, proc, "two PPO steps")  # fmt: skip
            assert status.max_steps == 50 and status.run_id and status.policy_version >= 2
            assert {"reward_mean", "kl", "time_generate"} <= set(status.metrics)
            reply = stub.Stop(orchestrator_pb2.StopRequest(save_checkpoint=True), metadata=auth)
            assert reply.accepted
    finally:
        code, log = finish(proc, log_path)
    assert code == 3, log[-3000:]  # stopped early, on request
    assert "aligner ppo: stopped on request at step" in log and "(checkpoint saved)" in log
    done = steps(run_dir)
    last = max(done)
    assert 2 <= last < 50
    assert list(done) == list(range(1, last + 1))
    for record in done.values():
        assert set(COMPARED) <= set(record)
        assert {f"time_{p}" for p in ("generate", "score", "logprobs", "actor_train", "critic_train",
                                      "weight_sync")} <= set(record)  # fmt: skip
    assert done[last]["consumed_samples"] == 16 * last
    assert (run_dir / "checkpoints" / f"step_{last:06d}").is_dir()  # saved on Stop
    assert (run_dir / "critic_checkpoints" / f"step_{last:06d}").is_dir()
    validation = [json.loads(line) for line in (run_dir / "validation.jsonl").read_text().splitlines()]
    assert [v["step"] for v in validation][:1] == [2]
    assert (run_dir / "ppo_curves.png").stat().st_size > 1000


def test_resume_after_a_crash_matches_an_uninterrupted_run(services, assets, ppo_config, tmp_path):
    _, overrides = services
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    args = [*overrides, "trainer.ppo.max_steps=4"]
    code, log = finish(start_ppo(ppo_config(assets, straight), args, tmp_path / "a.log"), tmp_path / "a.log")
    assert code == 0, log[-3000:]

    proc = start_ppo(ppo_config(assets, crashed), args, tmp_path / "b.log")
    try:
        wait_for(lambda: (crashed / "checkpoints" / "step_000002").is_dir(), 300, proc, "the step-2 checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a crash: no chance to save anything more
        proc.wait()
    assert not (crashed / "checkpoints" / "step_000004").exists()
    code, log = finish(start_ppo(ppo_config(assets, crashed), [*args, "--resume"], tmp_path / "c.log"),
                       tmp_path / "c.log")  # fmt: skip
    assert code == 0, log[-3000:]
    resumed_from = json.loads(next(line for line in log.splitlines() if '"resumed"' in line))["step"]
    assert resumed_from in (2, 3)

    expected, got = steps(straight), steps(crashed)
    assert sorted(got) == [1, 2, 3, 4]
    # One row per step: the rows of steps the crashed run had logged after its checkpoint went.
    for name in ("metrics.jsonl", "validation.jsonl"):
        rows = [json.loads(line)["step"] for line in (crashed / name).read_text().splitlines()]
        assert rows == sorted(set(rows)), (name, rows)
    for step in range(resumed_from + 1, 5):
        for key in COMPARED:
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-4, abs=1e-5), (step, key)


def test_a_restarted_service_is_retried_and_nothing_is_lost(services, assets, ppo_config, tmp_path):
    group, overrides = services
    reference = group["reference"]
    run_dir = tmp_path / "run"
    proc = start_ppo(ppo_config(assets, run_dir), [*overrides, "trainer.ppo.max_steps=4"], tmp_path / "ppo.log")
    try:
        wait_for(lambda: steps(run_dir), 240, proc, "the first step")
        os.killpg(reference.proc.pid, signal.SIGKILL)  # down, mid-run
        reference.proc.wait()
        time.sleep(2)
        reference.restart_on_its_ports(120)
    finally:
        code, log = finish(proc, tmp_path / "ppo.log")
    assert code == 0, log[-3000:]
    assert "service unavailable, retrying" in log
    done = steps(run_dir)
    assert sorted(done) == [1, 2, 3, 4]
    assert done[4]["consumed_samples"] == 64  # every rollout counted once


def test_a_critic_that_lost_its_state_gets_its_last_checkpoint_back(services, assets, ppo_config, tmp_path):
    group, overrides = services
    critic = group["reward-critic"]
    run_dir = tmp_path / "run"
    proc = start_ppo(ppo_config(assets, run_dir), [*overrides, "trainer.ppo.max_steps=5"], tmp_path / "ppo.log")
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "step_000002").is_dir(), 240, proc, "the step-2 checkpoint")
        os.killpg(critic.proc.pid, signal.SIGKILL)  # its weights and optimizer state are gone
        critic.proc.wait()
        critic.restart_on_its_ports(120)  # back at its initial checkpoint, step 0
    finally:
        code, log = finish(proc, tmp_path / "ppo.log")
    assert code == 0, log[-3000:]
    assert "critic lost its state: reloaded its last checkpoint" in log
    done = steps(run_dir)
    assert sorted(done) == [1, 2, 3, 4, 5] and done[5]["consumed_samples"] == 80
    # Never trained on from scratch: its step count goes on from the reloaded checkpoint.
    critic_steps = [done[s]["critic_step"] for s in sorted(done)]
    assert critic_steps == sorted(critic_steps) and critic_steps[-1] >= 4, critic_steps


def test_a_service_that_stays_down_ends_the_run_after_a_checkpoint(services, assets, ppo_config, tmp_path):
    group, overrides = services
    reference = group["reference"]
    port = reference.info["port"]
    run_dir = tmp_path / "run"
    config = ppo_config(assets, run_dir, remote={"retry_max_wait_s": 3.0})
    proc = start_ppo(config, [*overrides, "trainer.ppo.max_steps=20"], tmp_path / "ppo.log")
    try:
        wait_for(lambda: steps(run_dir), 240, proc, "the first step")
        reference.stop()
        code, log = finish(proc, tmp_path / "ppo.log")
    finally:
        reference.restart_on_its_ports(120)
    assert code == 2, log[-3000:]
    error = log.strip().splitlines()[-1]
    assert error.startswith("aligner ppo: error: reference: no replica answered") and f"127.0.0.1:{port}" in error
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert saved and saved[-1] == f"step_{max(steps(run_dir)):06d}"


def test_a_wrong_endpoint_fails_fast_naming_it(services, assets, ppo_config, tmp_path):
    _, overrides = services
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    config = ppo_config(assets, tmp_path / "run", remote={"connect_timeout_s": 2.0})
    args = [*overrides, f"remote.reference.port={closed}", "trainer.ppo.max_steps=1"]
    started = time.monotonic()
    code, log = finish(start_ppo(config, args, tmp_path / "ppo.log"), tmp_path / "ppo.log", timeout=120)
    assert code == 2
    error = log.strip().splitlines()[-1]
    assert error.startswith("aligner ppo: error: reference: no replica ready within 2s")
    assert f"127.0.0.1:{closed}: " in error and "not SERVING" in error
    assert time.monotonic() - started < 60


def test_two_actor_ranks_under_torchrun_match_one(services, assets, ppo_config, tmp_path):
    """Data parallel over two torchrun ranks: rank 0 talks to the services, both train on half of
    each global batch; the updates (and so the metrics) equal a single-process run's."""
    _, overrides = services
    args = [*overrides, "trainer.ppo.max_steps=2", "trainer.ppo.val_check_interval=0"]
    single, double = tmp_path / "single", tmp_path / "double"
    code, log = finish(start_ppo(ppo_config(assets, single), args, tmp_path / "one.log"), tmp_path / "one.log")
    assert code == 0, log[-3000:]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        master_port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(master_port), "-m", "services.cli", "ppo", "--config", str(ppo_config(assets, double)),
            "--log-format", "json", *args, "trainer.devices=2"]  # fmt: skip
    with open(tmp_path / "two.log", "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    code, log = finish(proc, tmp_path / "two.log")
    assert code == 0, log[-3000:]
    assert log.count('"control server"') == 1  # one control plane per run
    one, two = steps(single), steps(double)
    assert sorted(two) == [1, 2]
    for step in (1, 2):
        for key in COMPARED:
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-4, abs=1e-5), (step, key)
    assert (double / "checkpoints" / "step_000002").is_dir()
