"""The Dockerfiles (hadolint, and what the images must be: NVIDIA base image as a build argument,
non-root, pinned dependencies, a health check, no secrets, a build context with what they copy)
and the two scripts the images ship: image_requirements.py and the gRPC health check.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from concurrent import futures

import grpc
import pytest
import yaml
from deploy_support import CHART, ROOT, run
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
HEALTHCHECK = DOCKER / "healthcheck.py"
PORTS = yaml.safe_load((CHART / "values.yaml").read_text())["ports"]
# Dockerfile -> (base image family, the port its health check asks, ports it must expose)
EXPECTED = {
    "generation.Dockerfile": ("nvcr.io/nvidia/tritonserver:", PORTS["generation"],
                              {PORTS["generation"], PORTS["tritonHttp"], PORTS["tritonGrpc"], PORTS["tritonMetrics"],
                               PORTS["metrics"]}),
    "model-server.Dockerfile": ("nvcr.io/nvidia/pytorch:", PORTS["reward"],
                                {PORTS["reward"], PORTS["critic"], PORTS["reference"], PORTS["metrics"]}),
    "orchestrator.Dockerfile": ("nvcr.io/nvidia/pytorch:", PORTS["orchestrator"],
                                {PORTS["orchestrator"], PORTS["metrics"], PORTS["rendezvous"]}),
}


def load_module(name: str, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


image_requirements = load_module("aligner_image_requirements", DOCKER / "image_requirements.py")


# --- Dockerfiles -------------------------------------------------------------------------------


def test_one_dockerfile_per_role():
    assert [path.name for path in DOCKERFILES] == sorted(EXPECTED)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(tool, dockerfile):
    result = run([tool("hadolint"), str(dockerfile)])
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_reports_findings(tool, tmp_path):
    """The linter is live: an unpinned, root, untagged Dockerfile fails."""
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    result = run([tool("hadolint"), str(bad)])
    assert result.returncode == 1 and "DL3006" in result.stdout and "DL3008" in result.stdout, result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_contract(dockerfile):
    text = dockerfile.read_text()
    base, health_port, exposed = EXPECTED[dockerfile.name]
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    # The base image is a build argument with an NVIDIA default, and the only FROM.
    assert re.search(rf"^ARG BASE_IMAGE={re.escape(base)}\S+$", text, re.M), dockerfile.name
    assert [line for line in lines if line.startswith("FROM")] == ["FROM ${BASE_IMAGE}"]
    # Runs as a fixed non-root uid (Kubernetes' runAsNonRoot checks a numeric user).
    users = [line for line in lines if line.startswith("USER")]
    assert users == ["USER 10001:10001"], users
    assert lines.index(users[0]) > max(i for i, line in enumerate(lines) if line.startswith("RUN"))
    # Dependencies installed against the project's pins only.
    assert "python -m pip install -c /tmp/constraints.txt -r /tmp/requirements.txt" in text
    assert "python -m pip install --no-deps ." in text
    # The health check asks the role's gRPC port; that port is exposed.
    assert re.search(rf"^ENV ALIGNER_HEALTH_PORT={health_port}$", text, re.M)
    assert re.search(r'^HEALTHCHECK .*CMD \["aligner-healthcheck"\]$', text, re.M)
    (expose,) = [line for line in lines if line.startswith("EXPOSE")]
    assert {int(port) for port in expose.split()[1:]} == exposed
    # No secrets baked in: no credentials in ENV/ARG, nothing copied from outside the allowlist.
    for line in lines:
        if line.startswith(("ENV", "ARG")):
            assert not re.search(r"TOKEN|PASSWORD|SECRET|API_KEY|CREDENTIAL", line, re.I), line


def test_dockerignore_lets_in_exactly_what_the_images_copy():
    allowed = set()
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        if line.startswith("!"):
            allowed.add(line[1:].rstrip("/"))
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*") - 1].startswith("#") and "*" in lines  # deny everything first
    copied = set()
    for dockerfile in DOCKERFILES:
        for match in re.finditer(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile.read_text(), re.M):
            copied |= set(match.group(1).split())
    assert copied == allowed, (copied, allowed)
    for path in copied:
        assert (ROOT / path).exists(), path


# --- image_requirements.py ---------------------------------------------------------------------


def test_image_requirements_keep_the_base_images_torch(tmp_path):
    out_requirements, out_constraints = tmp_path / "requirements.txt", tmp_path / "constraints.txt"
    code = image_requirements.main([str(ROOT / "pyproject.toml"), str(ROOT / "constraints.txt"),
                                    str(out_requirements), str(out_constraints)])
    assert code == 0
    requirements = out_requirements.read_text().splitlines()
    pins = out_constraints.read_text().splitlines()
    names = {image_requirements.requirement_name(line) for line in requirements}
    pinned = {image_requirements.requirement_name(line) for line in pins}
    assert "torch" not in names | pinned
    assert {"megatron-core", "nvidia-pytriton", "grpcio", "tritonclient"} <= names <= pinned
    assert all("==" in pin for pin in pins)


def test_image_requirements_refuse_an_unpinned_dependency():
    pyproject = '[project]\ndependencies = ["torch==2.13.0", "grpcio>=1.0", "leftpad>=1"]\n'
    with pytest.raises(ValueError, match="leftpad"):
        image_requirements.image_lists(pyproject, "grpcio==1.85.3\ntorch==2.13.0+cpu\n")


def test_image_requirements_drop_only_what_the_base_provides():
    pyproject = '[project]\ndependencies = ["torch==2.13.0", "nvidia-pytriton==0.7.0", "Tritonclient[grpc]==2.73"]\n'
    constraints = "torch==2.13.0+cpu\nnvidia-cublas-cu12==12.8\nnvidia-pytriton==0.7.0\ntritonclient==2.73.0\n"
    requirements, pins = image_requirements.image_lists(pyproject, constraints)
    assert requirements == ["nvidia-pytriton==0.7.0", "Tritonclient[grpc]==2.73"]
    assert pins == ["nvidia-pytriton==0.7.0", "tritonclient==2.73.0"]


# --- the health check --------------------------------------------------------------------------


class HealthServer:
    """A real grpc.health.v1 server on 127.0.0.1 (an ephemeral port), optionally with TLS."""

    def __init__(self, credentials: grpc.ServerCredentials | None = None):
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = "127.0.0.1:0"
        self.port = (self.server.add_secure_port(address, credentials) if credentials
                     else self.server.add_insecure_port(address))
        self.set(False)
        self.server.start()

    def set(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set("", status)

    def stop(self) -> None:
        self.server.stop(grace=None)


@pytest.fixture
def health_server():
    server = HealthServer()
    yield server
    server.stop()


def healthcheck(*args: str, env: dict | None = None, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [sys.executable, str(HEALTHCHECK), *args]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return run(command, env=env)


@pytest.mark.integration
def test_healthcheck_reports_serving_and_not_serving(health_server):
    target = f"127.0.0.1:{health_server.port}"
    result = healthcheck("--target", target)
    assert result.returncode == 1 and f"{target}: NOT_SERVING" in result.stderr
    health_server.set(True)
    assert healthcheck("--target", target).returncode == 0
    # The images' default: the port from ALIGNER_HEALTH_PORT.
    env = {"PATH": "/usr/bin:/bin", "ALIGNER_HEALTH_PORT": str(health_server.port)}
    assert healthcheck(env=env).returncode == 0


@pytest.mark.integration
def test_healthcheck_fails_on_an_unreachable_target(health_server):
    health_server.set(True)
    closed = HealthServer()
    port = closed.port
    closed.stop()
    result = healthcheck("--target", f"127.0.0.1:{health_server.port}", "--target", f"127.0.0.1:{port}",
                         "--timeout", "1")
    assert result.returncode == 1 and f"127.0.0.1:{port}: UNAVAILABLE" in result.stderr


@pytest.mark.integration
def test_healthcheck_waits_until_serving(health_server):
    process = healthcheck("--target", f"127.0.0.1:{health_server.port}", "--wait", "60", wait=False)
    try:
        # It reports that it waits (NOT_SERVING), then keeps polling until the server serves.
        assert "waiting for" in process.stderr.readline()
        assert process.poll() is None
        health_server.set(True)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.wait()


def make_certificates(directory, tool) -> dict[str, bytes]:
    """A CA, a server certificate for the scoring Service's DNS name, and a client certificate."""
    openssl = tool("openssl")
    names = {"ca": "/CN=test-ca", "server": "/CN=aligner-scoring.rlhf.svc", "client": "/CN=client"}
    steps = [[openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
              "-keyout", "ca.key", "-out", "ca.crt", "-subj", names["ca"], "-days", "1"]]
    for who in ("server", "client"):
        san = ["-addext", "subjectAltName=DNS:aligner-scoring.rlhf.svc"] if who == "server" else []
        steps.append([openssl, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                      "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", names[who], *san])
        steps.append([openssl, "x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                      "-CAcreateserial", "-out", f"{who}.crt", "-days", "1", "-copy_extensions", "copy"])
    for step in steps:
        result = run(step, cwd=directory)
        assert result.returncode == 0, result.stderr
    return {name.name: name.read_bytes() for name in directory.iterdir()}


@pytest.mark.integration
def test_healthcheck_speaks_mtls(tool, tmp_path):
    """The scoring endpoint's exec probe: TLS with the service's name, client certificate."""
    pem = make_certificates(tmp_path, tool)
    credentials = grpc.ssl_server_credentials([(pem["server.key"], pem["server.crt"])],
                                              root_certificates=pem["ca.crt"], require_client_auth=True)
    server = HealthServer(credentials)
    try:
        server.set(True)
        target = f"127.0.0.1:{server.port}"
        tls = ["--tls-ca", str(tmp_path / "ca.crt"), "--server-name", "aligner-scoring.rlhf.svc"]
        client = ["--tls-cert", str(tmp_path / "client.crt"), "--tls-key", str(tmp_path / "client.key")]
        assert healthcheck("--target", target, *tls, *client, "--timeout", "3").returncode == 0
        # Without the client certificate the server refuses the handshake.
        assert healthcheck("--target", target, *tls, "--timeout", "1").returncode == 1
        # A name the certificate does not carry is refused by the client.
        wrong = ["--tls-ca", str(tmp_path / "ca.crt"), "--server-name", "elsewhere.example"]
        assert healthcheck("--target", target, *wrong, *client, "--timeout", "1").returncode == 1
    finally:
        server.stop()
