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
