"""`aligner up --config FILE [overrides]`: generation, reward-critic (or reward + critic) and
reference as processes on this machine, healthy before it returns; Ctrl-C stops them all."""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from pathlib import Path

from omegaconf import OmegaConf

from common.config import GenerationServiceConfig, LaunchConfig, ModelServiceConfig, load_config
from common.errors import InvalidArgument
from common.grpc_server import write_atomic
from common.logging import configure_logging, get_logger
from services.launch.processes import ServiceGroup, ServiceProcess

log = get_logger(__name__)


def _write_config(path: Path, config) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(config), path)
    return path


def _service(cfg: LaunchConfig, name: str, config, extra: list[str]) -> ServiceProcess:
    run_dir = Path(cfg.run_dir)
    config.server.host = cfg.host
    config.server.port = 0
    config.server.metrics_port = 0
    config.server.torch_threads = cfg.torch_threads
    config.tokenizer_path = cfg.tokenizer_path
    return ServiceProcess(
        name=name,
        config_path=_write_config(run_dir / "configs" / f"{name}.yaml", config),
        overrides=list(extra),
        log_path=run_dir / "logs" / f"{name}.log",
        ports_file=run_dir / "ports" / f"{name}.json",
        torch_threads=cfg.torch_threads,
        nproc=int(cfg.tensor_parallel.get(name, 1)),
    )


SERVICES = ("generation", "reward-critic", "reward", "critic", "reference")


def service_processes(cfg: LaunchConfig) -> list[ServiceProcess]:
    for name, ranks in cfg.tensor_parallel.items():
        if name not in SERVICES:
            raise InvalidArgument(f"tensor_parallel.{name}", f"is not a service (one of {', '.join(SERVICES)})")
        if int(ranks) < 1:
            raise InvalidArgument(f"tensor_parallel.{name}", f"must be >= 1, got {ranks}")
    generation = GenerationServiceConfig(checkpoint_path=cfg.policy_checkpoint)
    reference = ModelServiceConfig(name="reference", checkpoint_path=cfg.policy_checkpoint)
    services = [_service(cfg, "generation", generation, cfg.generation)]
    if cfg.combine_rm_and_critic_server:
        reward = ModelServiceConfig(name="reward-critic", checkpoint_path=cfg.reward_checkpoint,
                                    critic_checkpoint_path=cfg.critic_checkpoint)
        services.append(_service(cfg, "reward-critic", reward, cfg.reward))
    else:
        services.append(_service(cfg, "reward", ModelServiceConfig(name="reward", checkpoint_path=cfg.reward_checkpoint),
                                 cfg.reward))
        critic = ModelServiceConfig(name="critic", checkpoint_path=cfg.reward_checkpoint,
                                    critic_checkpoint_path=cfg.critic_checkpoint)
        services.append(_service(cfg, "critic", critic, cfg.critic))
    services.append(_service(cfg, "reference", reference, cfg.reference))
    return services


def ppo_overrides(group: ServiceGroup, combined: bool) -> list[str]:
    """The `aligner ppo` overrides that point the orchestrator at the launched services."""
    generation = group["generation"].info
    reward = group["reward-critic" if combined else "reward"].info
    overrides = [
        f"remote.generation.ip={generation['host']}",
        f"remote.generation.port={generation['triton_grpc_port']}",
        f"remote.generation_control.ip={generation['host']}",
        f"remote.generation_control.port={generation['port']}",
        f"remote.reference.ip={group['reference'].info['host']}",
        f"remote.reference.port={group['reference'].info['port']}",
        f"remote_critic_rm.combine_rm_and_critic_server={combined}",
        f"remote_critic_rm.reward_model.ip={reward['host']}",
        f"remote_critic_rm.reward_model.port={reward['port']}",
    ]
    critic = reward if combined else group["critic"].info
    overrides += [f"remote_critic_rm.critic.ip={critic['host']}", f"remote_critic_rm.critic.port={critic['port']}"]
    return overrides


def _write_endpoints(cfg: LaunchConfig, group: ServiceGroup, overrides: list[str]) -> None:
    endpoints = {s.name: s.info for s in group.services} | {"ppo_overrides": overrides}
    write_atomic(Path(cfg.run_dir) / "endpoints.json", json.dumps(endpoints, indent=2))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="aligner up", description=__doc__)
    parser.add_argument("--config", help="YAML config (schema: common.config.LaunchConfig)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. policy_checkpoint=runs/sft/final")
    args = parser.parse_args(argv)
    cfg = load_config(LaunchConfig, args.config, args.overrides)
    configure_logging("launcher", fmt="console")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with ServiceGroup(service_processes(cfg), timeout_s=cfg.startup_timeout_s) as group:
        overrides = ppo_overrides(group, cfg.combine_rm_and_critic_server)
        _write_endpoints(cfg, group, overrides)
        print("services up; run PPO against them with:\n  aligner ppo --config <ppo.yaml> " + " ".join(overrides))
        print("Ctrl-C stops every service.", flush=True)
        supervise(group, stop, cfg.startup_timeout_s, on_restart=lambda: _write_endpoints(cfg, group, overrides))
    return 0


def supervise(group: ServiceGroup, stop: threading.Event, startup_timeout_s: float, on_restart=lambda: None,
              first_backoff_s: float = 1.0, max_backoff_s: float = 30.0, healthy_after_s: float = 60.0) -> None:
    """Until `stop`: a service that died is started again on its ports, after a backoff that
    doubles while it keeps dying (reset once it has stayed up `healthy_after_s`); the others are
    never touched."""
    backoff = {s.name: first_backoff_s for s in group.services}
    up_since = {s.name: time.monotonic() for s in group.services}
    retry_at: dict[str, float] = {}
    while not stop.wait(0.5):
        for service in group.services:
            now = time.monotonic()
            if service.proc.poll() is None:
                if now - up_since[service.name] > healthy_after_s:
                    backoff[service.name] = first_backoff_s
                continue
            if service.name not in retry_at:
                retry_at[service.name] = now + backoff[service.name]
                log.error("service died; restarting", service=service.name, exit_code=service.proc.returncode,
                          in_s=backoff[service.name], log=str(service.log_path))  # fmt: skip
                continue
            if now < retry_at[service.name]:
                continue
            del retry_at[service.name]
            backoff[service.name] = min(2 * backoff[service.name], max_backoff_s)
            try:
                service.restart_on_its_ports(startup_timeout_s)
            except Exception as exc:  # noqa: BLE001 - it is retried after its backoff
                log.error("restart failed", service=service.name, error=str(exc))
                continue
            up_since[service.name] = time.monotonic()
            log.info("service restarted", service=service.name, pid=service.proc.pid)
            on_restart()
