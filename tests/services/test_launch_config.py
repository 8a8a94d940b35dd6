"""`aligner up`'s service list from its config (no process started)."""

from __future__ import annotations

import pytest

from common.config import LaunchConfig
from common.errors import InvalidArgument
from services.launch.up import service_processes


def _config(tmp_path, **changes) -> LaunchConfig:
    return LaunchConfig(run_dir=str(tmp_path), policy_checkpoint="p", reward_checkpoint="r", **changes)


def test_tensor_parallel_services_run_under_torchrun(tmp_path):
    ranks = {s.name: s.nproc for s in service_processes(_config(tmp_path, tensor_parallel={"reward-critic": 2}))}
    assert ranks == {"generation": 1, "reward-critic": 2, "reference": 1}


@pytest.mark.parametrize("sizes, problem", [({"rewards": 2}, "is not a service"), ({"reference": 0}, "must be >= 1")])
def test_bad_tensor_parallel_sizes_name_the_key(tmp_path, sizes, problem):
    with pytest.raises(InvalidArgument, match=rf"^tensor_parallel\.{next(iter(sizes))}: {problem}"):
        service_processes(_config(tmp_path, tensor_parallel=sizes))


class _Proc:
    def __init__(self, alive: bool):
        self.alive, self.returncode, self.pid = alive, None if alive else -9, 0

    def poll(self):
        return self.returncode


class _Service:
    """Stands in for a ServiceProcess: dies `deaths` times, then stays up."""

    def __init__(self, name: str, deaths: int):
        self.name, self.log_path, self.deaths, self.restarts = name, f"{name}.log", deaths, 0
        self.proc = _Proc(alive=deaths == 0)

    def restart_on_its_ports(self, timeout_s: float) -> dict:
        self.restarts += 1
        self.proc = _Proc(alive=self.restarts >= self.deaths)
        return {}


def test_up_restarts_a_dead_service_until_it_stays_up_and_leaves_the_others_alone():
    import threading
    from types import SimpleNamespace

    from services.launch.up import supervise

    dying, healthy = _Service("reference", deaths=2), _Service("generation", deaths=0)
    stop, restarted = threading.Event(), []

    def on_restart():
        restarted.append(dying.restarts)
        if dying.proc.poll() is None:
            stop.set()

    threading.Timer(30, stop.set).start()  # a bound, should supervise never stop it
    supervise(SimpleNamespace(services=[dying, healthy]), stop, 5.0, on_restart=on_restart, first_backoff_s=0.01)
    assert dying.restarts == 2 and restarted == [1, 2]  # died again after the first restart
    assert healthy.restarts == 0
