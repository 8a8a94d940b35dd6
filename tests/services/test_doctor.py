"""`aligner doctor`: a port taken on 127.0.0.1 and a version that breaks a pin are blockers (exit 1,
a FAIL line naming the port / the package); TensorRT-LLM missing is a notice unless a config asks
for it; one real run on this machine."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from services import doctor

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def busy_port():
    """A port held by a listening socket on 127.0.0.1 for the test's duration."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def fail_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("FAIL")]


def test_a_busy_default_port_is_a_blocker_naming_it(busy_port, monkeypatch, capsys):
    monkeypatch.setattr(doctor, "default_ports", lambda: [doctor.PortUse("127.0.0.1", busy_port, "reward (x.port)")])
    assert doctor.main([]) == 1
    failures = fail_lines(capsys.readouterr().out)
    assert any(f"127.0.0.1:{busy_port}" in line and "in use" in line for line in failures), failures


def test_a_free_port_is_ok(monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(doctor, "default_ports", lambda: [doctor.PortUse("127.0.0.1", port, "reward (x.port)")])
    [check] = doctor.check_ports(doctor.default_ports())
    assert check.status == doctor.OK and str(port) in check.name


def test_a_config_port_in_use_is_named_with_its_key(busy_port, tmp_path, capsys):
    config = tmp_path / "reward.yaml"
    config.write_text(f"name: reward\ncheckpoint_path: /nowhere\nserver: {{port: {busy_port}}}\n")
    assert doctor.main(["--config", str(config), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert any(f"127.0.0.1:{busy_port}" in line and "server.port" in line for line in report["blockers"])


def test_a_mismatched_version_is_a_blocker_naming_the_package(monkeypatch, capsys):
    real = doctor.installed_version
    monkeypatch.setattr(doctor, "installed_version", lambda name: "2.12.0" if name == "torch" else real(name))
    assert doctor.main([]) == 1
    failures = fail_lines(capsys.readouterr().out)
    assert any(line.startswith("FAIL  pin torch:") and "2.12.0" in line and "==2.13.0" in line for line in failures)


def test_constraints_pin_versions_and_a_cuda_build_of_the_pinned_torch_passes(monkeypatch):
    real = doctor.installed_version
    fake = {"tqdm": "4.66.0", "torch": "2.13.0+cu128"}  # tqdm: pyproject says >=4.66, constraints 4.70.1
    monkeypatch.setattr(doctor, "installed_version", lambda name: fake.get(name, real(name)))
    failures = [c for c in doctor.check_pins() if c.status == doctor.FAIL]
    assert [c.name for c in failures] == ["pin tqdm"]
    assert "constraints.txt" in failures[0].detail


def test_a_missing_dependency_is_a_blocker(monkeypatch):
    real = doctor.installed_version
    monkeypatch.setattr(doctor, "installed_version", lambda name: None if name == "omegaconf" else real(name))
    failures = [c for c in doctor.check_pins() if c.status == doctor.FAIL]
    assert [(c.name, "not installed" in c.detail) for c in failures] == [("pin omegaconf", True)]


def test_tensorrt_llm_missing_is_a_notice_unless_a_config_asks_for_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(doctor, "trtllm_unavailable_reasons", lambda: ["package tensorrt_llm is not installed"])
    assert doctor.check_trtllm(None).status == doctor.WARN
    config = tmp_path / "generation.yaml"
    config.write_text("checkpoint_path: /nowhere\nengine: tensorrt_llm\n")
    assert doctor.main(["--config", str(config)]) == 1
    failures = fail_lines(capsys.readouterr().out)
    assert any("tensorrt-llm" in line and "engine=tensorrt_llm" in line for line in failures), failures


def test_config_kinds_are_recognised_and_a_foreign_file_is_a_one_line_error(tmp_path):
    assert doctor.read_config(str(ROOT / "configs" / "demo" / "ppo.yaml"), None)[0] == "ppo"
    assert doctor.read_config(str(ROOT / "configs" / "demo" / "sft.yaml"), None)[0] == "sft"
    assert doctor.read_config(str(ROOT / "configs" / "demo" / "rm.yaml"), None)[0] == "train-rm"
    other = tmp_path / "other.yaml"
    other.write_text("no_such_key: 1\n")
    with pytest.raises(doctor.ConfigError, match="fits no schema"):
        doctor.read_config(str(other), None)


@pytest.mark.integration
def test_aligner_doctor_on_this_machine():
    done = subprocess.run([sys.executable, "-m", "services.cli", "doctor", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    report = json.loads(done.stdout)
    assert done.returncode == (0 if report["ok"] else 1), done.stderr
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    for name in ("python", "torch", "pytriton", "tritonserver", "tritonclient", "tensorrt-llm", "megatron-core"):
        assert name in statuses, statuses
    assert set(statuses.values()) <= {doctor.OK, doctor.WARN, doctor.FAIL}
    torch_detail = next(c["detail"] for c in report["checks"] if c["name"] == "torch")
    assert torch_detail.startswith("2.13.0")
    assert len(report["blockers"]) == list(statuses.values()).count(doctor.FAIL)
