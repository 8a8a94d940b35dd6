"""`aligner up`: every service healthy on 127.0.0.1, then Ctrl-C leaves nothing running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.grpc_client import wait_for_health

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes; /proc says so.
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False


def test_up_starts_every_service_restarts_a_dead_one_and_ctrl_c_stops_them_all(assets, tmp_path):
    run_dir = tmp_path / "services"
    argv = [sys.executable, "-m", "services.cli", "up", f"run_dir={run_dir}", f"policy_checkpoint={assets.policy}",
            f"reward_checkpoint={assets.reward}", "startup_timeout_s=240"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(tmp_path / "up.log", "wb") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    endpoints_file = run_dir / "endpoints.json"
    try:
        deadline = time.monotonic() + 300
        while not endpoints_file.exists():
            assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "aligner up did not come up"
            time.sleep(0.5)
        endpoints = json.loads(endpoints_file.read_text())
        names = {"generation", "reward-critic", "reference"}
        assert names <= set(endpoints)
        for name in names:
            wait_for_health(f"127.0.0.1:{endpoints[name]['port']}", timeout=10)
        assert any(o.startswith("remote.generation.port=") for o in endpoints["ppo_overrides"])
        pids = [endpoints[name]["pid"] for name in names]
        assert all(_alive(pid) for pid in pids)

        # A service that dies is started again on its port; the others are left alone.
        dead = endpoints["reference"]["pid"]
        os.killpg(dead, signal.SIGKILL)
        deadline = time.monotonic() + 240
        while json.loads(endpoints_file.read_text())["reference"]["pid"] == dead:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the reference was not restarted"
            time.sleep(0.5)
        wait_for_health(f"127.0.0.1:{endpoints['reference']['port']}", timeout=30)
        assert all(_alive(endpoints[name]["pid"]) for name in ("generation", "reward-critic"))
        assert "service died; restarting" in (tmp_path / "up.log").read_text()
        pids = [json.loads(endpoints_file.read_text())[name]["pid"] for name in names]

        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=90) == 0
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in pids if _alive(pid)], "services left running after Ctrl-C"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
