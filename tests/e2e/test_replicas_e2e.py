"""PPO over replicated services: two generation replicas, two reference replicas and one
reward-critic sharded over two tensor-parallel ranks (torchrun, gloo), each a real `aligner serve`
process on 127.0.0.1. Mid-run one generation replica
and one reference replica are killed (-9) and later restarted on the same ports: the run keeps
stepping on the others, resyncs the restarted generation replica to the current policy and uses
it again, and every rollout is counted exactly once."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from aligner.v1 import orchestrator_pb2, orchestrator_pb2_grpc

from common.config import LaunchConfig
from services.generation.client import GenerationClient
from services.launch.processes import ServiceGroup, ServiceProcess
from services.launch.up import service_processes

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _load(name: str, path: Path):
    """A module by path: importlib mode puts no test folder on sys.path."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_ppo = _load("aligner_e2e_ppo_helpers", Path(__file__).with_name("test_ppo_e2e.py"))
start_ppo, finish, steps, wait_for, control_port = (
    _ppo.start_ppo, _ppo.finish, _ppo.steps, _ppo.wait_for, _ppo.control_port
)  # fmt: skip


def _second(service: ServiceProcess, root: Path) -> ServiceProcess:
    return ServiceProcess(
        name=service.name, config_path=service.config_path, overrides=list(service.overrides),
        log_path=root / "logs" / f"{service.name}-b.log", ports_file=root / "ports" / f"{service.name}-b.json",
        torch_threads=service.torch_threads, nproc=service.nproc,
    )  # fmt: skip


@pytest.fixture(scope="module")
def replicated(assets, tmp_path_factory):
    """{"generation": [a, b], "reference": [a, b], "reward-critic": one, TP=2}, all serving."""
    root = tmp_path_factory.mktemp("replicated")
    cfg = LaunchConfig(run_dir=str(root), policy_checkpoint=str(assets.policy), reward_checkpoint=str(assets.reward),
                       startup_timeout_s=240, reward=[f"server.checkpoint_root={tmp_path_factory.getbasetemp()}"],
                       tensor_parallel={"reward-critic": 2})  # fmt: skip
    generation, reward_critic, reference = service_processes(cfg)
    services = {"generation": [generation, _second(generation, root)], "reward-critic": reward_critic,
                "reference": [reference, _second(reference, root)]}  # fmt: skip
    everything = [*services["generation"], reward_critic, *services["reference"]]
    with ServiceGroup(everything, timeout_s=cfg.startup_timeout_s):
        yield services


def _kill(service: ServiceProcess) -> None:
    os.killpg(service.proc.pid, signal.SIGKILL)
    service.proc.wait()


def _tokens_generated(service: ServiceProcess) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{service.info['metrics_port']}/metrics", timeout=10).read()
    found = re.findall(rb"^aligner_generated_tokens_total\{[^}]*\} ([0-9.e+]+)$", text, re.MULTILINE)
    return sum(float(x) for x in found)


def _served_version(service: ServiceProcess) -> int:
    info = service.info
    with GenerationClient(f"127.0.0.1:{info['triton_grpc_port']}", f"127.0.0.1:{info['port']}") as client:
        return int(client.info().policy_version)


def test_ppo_survives_losing_a_generation_and_a_reference_replica(replicated, assets, ppo_config, tmp_path):
    generation, reference, reward_critic = replicated["generation"], replicated["reference"], replicated["reward-critic"]
    address = lambda s, key="port": f"127.0.0.1:{s.info[key]}"  # noqa: E731
    remote = {
        "retry_max_wait_s": 120.0,
        "probe_interval_s": 0.5,
        "generation": {"replicas": [address(s, "triton_grpc_port") for s in generation]},
        "generation_control": {"replicas": [address(s) for s in generation]},
        "reference": {"replicas": [address(s) for s in reference]},
    }
    critic = ["remote_critic_rm.critic.ip=127.0.0.1", f"remote_critic_rm.critic.port={reward_critic.info['port']}"]
    run_dir, log_path = tmp_path / "run", tmp_path / "ppo.log"
    # Two rollout micro-batches per step: both generation replicas work at once.
    config = ppo_config(assets, run_dir, remote=remote,
                        trainer={"ppo": {"val_check_interval": 0, "save_interval": 5}})  # fmt: skip
    proc = start_ppo(config, [*critic, "trainer.ppo.max_steps=500"], log_path)
    try:
        port = wait_for(lambda: control_port(log_path), 120, proc, "the control server")
        wait_for(lambda: len(steps(run_dir)) >= 2, 240, proc, "two steps")
        assert all(_tokens_generated(s) > 0 for s in generation)  # spread over both

        _kill(generation[1])
        _kill(reference[1])
        at_kill = len(steps(run_dir))
        wait_for(lambda: len(steps(run_dir)) >= at_kill + 3, 240, proc, "steps on the surviving replicas")

        generation[1].restart_on_its_ports(180)
        reference[1].restart_on_its_ports(180)
        # Back in use: the restarted generation replica was resynced and generates again.
        wait_for(lambda: _tokens_generated(generation[1]) > 0, 240, proc, "the restarted replica to generate")
        at_back = len(steps(run_dir))
        wait_for(lambda: len(steps(run_dir)) >= at_back + 2, 240, proc, "steps after the restart")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert orchestrator_pb2_grpc.OrchestratorStub(channel).Stop(
                orchestrator_pb2.StopRequest(save_checkpoint=True)
            ).accepted
    finally:
        code, log = finish(proc, log_path)
    assert code == 3, log[-3000:]  # stopped on request
    done = steps(run_dir)
    last = max(done)
    assert list(done) == list(range(1, last + 1))  # every step completed, once
    assert done[last]["consumed_samples"] == 16 * last  # no prompt lost or counted twice
    versions = [int(done[s]["policy_version"]) for s in range(1, last + 1)]
    assert versions == list(range(versions[0], versions[0] + last))  # one push per step
    assert "replica down" in log and "resyncing generation replica" in log
    # Both generation replicas end on the run's last version.
    assert [_served_version(s) for s in generation] == [versions[-1]] * 2
