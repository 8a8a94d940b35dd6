"""`aligner doctor [--config FILE] [--json]`: what a run would use here, and what would stop it.

Checks, in order: Python; torch and CUDA; the `tritonserver` binary the generation service starts
(PyTriton's bundled one, as `pytriton.triton.Triton` finds it) and the Python-backend stub for
this interpreter; PyTriton and tritonclient; TensorRT-LLM; megatron-core; the service ports; the
installed versions of the pinned dependencies against `pyproject.toml` and `constraints.txt`.

Each check prints one line: `ok`, `warn` (works, with a limit worth knowing: no CUDA device,
TensorRT-LLM missing where no config asks for it) or `FAIL` (a blocker: a missing package, a
version that breaks a pin, a port a service needs that is taken). The exit status is 1 when there
is any FAIL line, 0 otherwise. Without `--config` the ports checked are the fixed service ports the
PPO config expects by default (`common.config.RemoteServicesConfig` / `RemoteCriticRmConfig`):
they must be free on 127.0.0.1 to start the services there. With `--config FILE` (a generation,
model-service, `aligner up`, PPO, SFT or reward-model config) the ports are the ones that config binds, and the
generation engine is the one it asks for.
"""

from __future__ import annotations

import argparse
import errno
import importlib.metadata
import importlib.util
import json
import platform
import re
import socket
import sys
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

from common.config import (
    ConfigError,
    GenerationServiceConfig,
    LaunchConfig,
    ModelServiceConfig,
    PpoConfig,
    RemoteCriticRmConfig,
    RemoteServicesConfig,
    SftConfig,
    TrainRmConfig,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]
MIN_PYTHON = (3, 11)
OK, WARN, FAIL = "ok", "warn", "FAIL"

# --config FILE: the schema it is read with. Tried in this order when --kind is not given: each
# schema rejects unknown keys, so the first that loads is the one the file was written for
# (a file that fits several, e.g. only `server.port`, is read as the first; --kind picks another).
KINDS: dict[str, type] = {
    "generation": GenerationServiceConfig,
    "model-service": ModelServiceConfig,  # reward, critic, reward-critic, reference
    "up": LaunchConfig,
    "ppo": PpoConfig,
    "sft": SftConfig,  # training jobs: no ports, no engine; read to say so
    "train-rm": TrainRmConfig,
}


@dataclass
class Check:
    name: str
    status: str  # ok | warn | FAIL
    detail: str

    def line(self) -> str:
        return f"{self.status:<5} {self.name}: {self.detail}"


@dataclass(frozen=True)
class PortUse:
    host: str
    port: int
    what: str  # who binds it, with the config key


# ---------------------------------------------------------------------------------------------
# Facts (module-level functions so tests can replace them)
# ---------------------------------------------------------------------------------------------


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def port_in_use(host: str, port: int) -> bool:
    """True when binding `host:port` fails because something holds it. SO_REUSEADDR, as servers
    set it, so a closed connection lingering in TIME_WAIT does not count as in use."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def port_holder(port: int) -> str:
    """' (pid N, NAME)' of the process listening on `port`, when the OS tells us; '' otherwise."""
    try:
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                return f" (pid {conn.pid}, {psutil.Process(conn.pid).name()})"
    except Exception:  # noqa: BLE001 - who holds it is a hint; permissions may hide it
        pass
    return ""


def default_ports() -> list[PortUse]:
    """The fixed ports the PPO config points at by default, where the services listen when they
    run outside Kubernetes (docs/deploy.md)."""
    remote, critic_rm = RemoteServicesConfig(), RemoteCriticRmConfig()
    return [
        PortUse(critic_rm.reward_model.ip, critic_rm.reward_model.port,
                "reward or reward-critic (remote_critic_rm.reward_model.port)"),
        PortUse(critic_rm.critic.ip, critic_rm.critic.port, "critic (remote_critic_rm.critic.port)"),
        PortUse(remote.reference.ip, remote.reference.port, "reference (remote.reference.port)"),
        PortUse(remote.generation_control.ip, remote.generation_control.port,
                "generation, aligner.v1.Generation (remote.generation_control.port)"),
        PortUse(remote.generation.ip, remote.generation.port, "generation, Triton gRPC (remote.generation.port)"),
    ]  # fmt: skip


def trtllm_unavailable_reasons() -> list[str]:
    """Why the generation service's tensorrt_llm engine cannot run here (its own check)."""
    from services.generation import trtllm_engine

    return trtllm_engine.unavailable_reasons()


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def check_python() -> Check:
    version = platform.python_version()
    if sys.version_info[:2] < MIN_PYTHON:
        need = ".".join(map(str, MIN_PYTHON))
        return Check("python", FAIL, f"{version} ({sys.executable}); aligner needs {need} or newer")
    return Check("python", OK, f"{version} ({sys.executable})")


def check_torch() -> list[Check]:
    try:
        import torch
    except ImportError as exc:
        return [Check("torch", FAIL, f"not importable: {exc}")]
    checks = [Check("torch", OK, torch.__version__)]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        checks.append(Check("cuda", OK, f"CUDA {torch.version.cuda}, {len(names)} device(s): {', '.join(names)}"))
    else:
        checks.append(Check("cuda", WARN, "no CUDA device: training and serving run on CPU"))
    return checks


def check_triton() -> list[Check]:
    checks = []
    try:
        import pytriton.triton
        from pytriton.utils.distribution import get_stub_path
    except ImportError as exc:
        return [Check("pytriton", FAIL, f"not importable ({exc}); the generation service needs it")]
    checks.append(Check("pytriton", OK, installed_version("nvidia-pytriton") or "importable"))
    # The generation service starts tritonserver through PyTriton, which runs the binary it ships
    # (copied into its workspace from TRITONSERVER_DIST_DIR), never one on PATH.
    binary = Path(pytriton.triton.TRITONSERVER_DIST_DIR) / "bin" / "tritonserver"
    if binary.is_file() and binary.stat().st_mode & 0o111:
        checks.append(Check("tritonserver", OK, f"{binary} (PyTriton's bundled binary)"))
    else:
        checks.append(Check("tritonserver", FAIL, f"missing or not executable: {binary} (reinstall nvidia-pytriton)"))
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    try:
        stub = Path(get_stub_path(python))
        checks.append(Check("triton python stub", OK, f"python {python}: {stub}"))
    except Exception as exc:  # noqa: BLE001 - PyTriton raises its own error types here
        checks.append(Check("triton python stub", FAIL, f"none for python {python}: {exc}"))
    if importlib.util.find_spec("tritonclient") is None or importlib.util.find_spec("tritonclient.grpc") is None:
        checks.append(Check("tritonclient", FAIL, "tritonclient[grpc] is not importable; PPO generates through it"))
    else:
        checks.append(Check("tritonclient", OK, installed_version("tritonclient") or "importable"))
    return checks


def check_trtllm(required_by: str | None) -> Check:
    """A notice where nothing asks for the engine; a blocker where a config does."""
    try:
        reasons = trtllm_unavailable_reasons()
    except ImportError as exc:  # torch itself missing: reported by the torch check
        reasons = [f"cannot check ({exc})"]
    if not reasons:
        return Check("tensorrt-llm", OK, installed_version("tensorrt-llm") or installed_version("tensorrt_llm") or "")
    reason = "; ".join(reasons)
    if required_by:
        return Check("tensorrt-llm", FAIL, f"{required_by} asks for engine=tensorrt_llm, unavailable: {reason}")
    return Check("tensorrt-llm", WARN, f"unavailable ({reason}); generation uses engine=torch")


def check_megatron() -> Check:
    version = installed_version("megatron-core")
    if version is None or importlib.util.find_spec("megatron.core") is None:
        return Check("megatron-core", FAIL, "not installed; every model is built on it")
    return Check("megatron-core", OK, version)


def check_ports(uses: list[PortUse]) -> list[Check]:
    checks = []
    for use in uses:
        name = f"port {use.host}:{use.port}"
        if port_in_use(use.host, use.port):
            checks.append(Check(name, FAIL, f"in use{port_holder(use.port)}; needed by {use.what}"))
        else:
            checks.append(Check(name, OK, f"free ({use.what})"))
    return checks


def _constraints(path: Path) -> list[Requirement]:
    lines = (raw.split("#", 1)[0].strip() for raw in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _matches(requirement: Requirement, installed: str, *, ignore_local: bool) -> bool:
    """PEP 440 check. constraints.txt pins the CPU wheels (`torch==2.13.0+cpu`); a CUDA build of
    the same release (`2.13.0+cu128`) differs only in the local label, so constraints compare
    public versions. pyproject's pins (`torch==2.13.0`) ignore local labels by PEP 440 already."""
    try:
        version = Version(installed)
    except InvalidVersion:
        return False
    for spec in requirement.specifier:
        if ignore_local and spec.operator == "==" and "*" not in spec.version:
            if Version(spec.version).public != version.public:
                return False
        elif not spec.contains(version, prereleases=True):
            return False
    return True


def check_pins(root: Path = ROOT) -> list[Check]:
    """Every `dependencies` entry of pyproject.toml must be installed and match; every
    constraints.txt pin must match where the package is installed (it also pins test tools that
    a production image leaves out)."""
    pyproject, constraints_file = root / "pyproject.toml", root / "constraints.txt"
    if not pyproject.is_file() or not constraints_file.is_file():
        return [Check("pins", WARN, f"pyproject.toml / constraints.txt not found under {root}; versions not checked")]
    try:
        dependencies = [Requirement(d) for d in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]
        constraints = _constraints(constraints_file)
    except (InvalidRequirement, KeyError, tomllib.TOMLDecodeError) as exc:
        return [Check("pins", FAIL, f"cannot read the pins: {exc}")]
    checks, checked_constraints = [], 0
    for requirement in dependencies:
        installed = installed_version(requirement.name)
        if installed is None:
            checks.append(Check(f"pin {requirement.name}", FAIL, f"not installed; pyproject.toml wants {requirement}"))
        elif not _matches(requirement, installed, ignore_local=False):
            checks.append(Check(f"pin {requirement.name}", FAIL,
                                f"installed {installed}, pyproject.toml wants {requirement.specifier}"))  # fmt: skip
    for requirement in constraints:
        installed = installed_version(requirement.name)
        if installed is None:
            continue
        if not _matches(requirement, installed, ignore_local=True):
            checks.append(Check(f"pin {requirement.name}", FAIL,
                                f"installed {installed}, constraints.txt wants {requirement.specifier}"))  # fmt: skip
        checked_constraints += 1
    if not checks:
        torch_pin = next((str(r.specifier) for r in dependencies if _normal(r.name) == "torch"), "")
        checks.append(Check("pins", OK, f"installed versions match the {len(dependencies)} pyproject.toml dependencies "
                                        f"(torch{torch_pin}) and {checked_constraints} constraints.txt pins"))  # fmt: skip
    return checks


# ---------------------------------------------------------------------------------------------
# A config's ports and engine
# ---------------------------------------------------------------------------------------------


def read_config(path: str, kind: str | None) -> tuple[str, Any]:
    """(kind, config) for `--config FILE`; ConfigError naming the file when no schema fits."""
    kinds = [kind] if kind else list(KINDS)
    errors = []
    for name in kinds:
        try:
            return name, load_config(KINDS[name], path)
        except ConfigError as exc:
            errors.append(f"as {name}: {exc}")
    if kind:
        raise ConfigError(errors[0])
    raise ConfigError(f"config file {path!r} fits no schema doctor knows ({', '.join(KINDS)}); "
                      f"use --kind. First problem {errors[0]}")  # fmt: skip


def _bound(host: str, ports: dict[str, int], who: str) -> list[PortUse]:
    """Ports > 0 a server binds (0 picks a free port, -1 turns a listener off)."""
    return [PortUse(host, port, f"{who} ({key})") for key, port in ports.items() if port > 0]


# What the ports line says when a config fixes no port.
NO_FIXED_PORTS = {
    "sft": "none: a training job binds no port",
    "train-rm": "none: a training job binds no port",
    "up": "none fixed: aligner up starts every service on a free port",
}


def config_needs(kind: str, config: Any) -> tuple[list[PortUse], str | None]:
    """(ports the config binds, who asks for engine=tensorrt_llm or None)."""
    if kind == "generation":
        server = config.server
        ports = _bound(server.host, {"server.port": server.port, "server.metrics_port": server.metrics_port,
                                     "triton_grpc_port": config.triton_grpc_port,
                                     "triton_http_port": config.triton_http_port,
                                     "triton_metrics_port": config.triton_metrics_port}, "generation")  # fmt: skip
        return ports, "the generation config" if config.engine == "tensorrt_llm" else None
    if kind == "model-service":
        server = config.server
        return _bound(server.host, {"server.port": server.port, "server.metrics_port": server.metrics_port},
                      config.name), None  # fmt: skip
    if kind in ("sft", "train-rm"):
        return [], None
    if kind == "ppo":
        return _bound(config.host, {"control_port": config.control_port, "metrics_port": config.metrics_port},
                      "the PPO orchestrator"), None  # fmt: skip
    # `aligner up`: every service on a free port; the generation overrides may pick the engine.
    generation = load_config(GenerationServiceConfig, None, ["checkpoint_path=unused", *config.generation])
    return [], "aligner up's generation overrides" if generation.engine == "tensorrt_llm" else None


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def run_checks(config_path: str | None = None, kind: str | None = None) -> list[Check]:
    ports, engine_required_by = default_ports(), None
    checks: list[Check] = []
    if config_path is not None:
        kind, config = read_config(config_path, kind)
        ports, engine_required_by = config_needs(kind, config)
        checks.append(Check("config", OK, f"{config_path} (read as {kind})"))
    steps: list[Callable[[], Check | list[Check]]] = [
        check_python, check_torch, check_triton, lambda: check_trtllm(engine_required_by), check_megatron,
        lambda: check_ports(ports) if ports else Check("ports", OK, NO_FIXED_PORTS.get(kind, "none fixed (0 = a free port)")),
        check_pins,
    ]  # fmt: skip
    for step in steps:
        result = step()
        checks.extend(result if isinstance(result, list) else [result])
    return checks


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="aligner doctor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--config", help=f"check this config's ports and engine ({', '.join(KINDS)})")
    parser.add_argument("--kind", choices=sorted(KINDS), help="the config's schema when the file fits several")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    args = parser.parse_args(argv)
    if args.kind and not args.config:
        raise ConfigError("--kind needs --config FILE")
    checks = run_checks(args.config, args.kind)
    blockers = [c for c in checks if c.status == FAIL]
    if args.json:
        print(json.dumps({"ok": not blockers, "checks": [asdict(c) for c in checks],
                          "blockers": [c.line() for c in blockers]}, indent=2))  # fmt: skip
    else:
        for check in checks:
            print(check.line())
        print(f"{len(blockers)} blocker(s)" if blockers else "ready")
    return 1 if blockers else 0
