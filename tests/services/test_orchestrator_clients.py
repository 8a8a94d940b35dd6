"""The orchestrator's client layer against a real server that requires a bearer token."""

from __future__ import annotations

import grpc
import pytest
import torch

from common.config import ConfigError, PpoConfig
from common.replicas import ServiceError
from services.orchestrator import clients

pytestmark = pytest.mark.integration


def _config(port: int, **remote) -> PpoConfig:
    cfg = PpoConfig()
    cfg.remote.reference.port = port
    for key, value in remote.items():
        setattr(cfg.remote, key, value)
    return cfg


def test_the_clients_send_the_services_token(service_config, start_server, checkpoints, tmp_path):
    reference = start_server("reference", service_config("reference", {
        "checkpoint_path": str(checkpoints.policy), "server.auth_token": "s3cret"}))  # fmt: skip
    port = reference.info["port"]
    (tmp_path / "token").write_text("s3cret\n")
    rows = [torch.tensor([1, 5, 9, 2])]

    scorer, generator = clients.connect(_config(port, auth_token_file=str(tmp_path / "token")))
    try:
        scorer.reference.wait_ready(30)
        assert [r.shape for r in scorer.ref_logprobs(rows)] == [torch.Size([3])]
    finally:
        scorer.close()
        generator.close()

    scorer, generator = clients.connect(_config(port, auth_token="wrong"))
    try:
        with pytest.raises(ServiceError, match=r"^reference at 127\.0\.0\.1:\d+: LogProbs failed: UNAUTHENTICATED") as refused:
            scorer.ref_logprobs(rows)  # not a down replica: no retries, no failover
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        scorer.close()
        generator.close()

    with pytest.raises(ConfigError, match="'remote.auth_token_file': .* does not exist"):
        clients.connect(_config(port, auth_token_file=str(tmp_path / "missing")))
