"""The PPO keys NeMo-Aligner users pass, as the orchestrator honours them: the sequence length
from the policy checkpoint, max_epochs over the prompts, trainer.devices x num_nodes against the
job, and trainer.ppo.trt_llm.enable against the generation service's engine."""

from __future__ import annotations

import pytest

from common.config import PpoConfig, load_config
from common.errors import InvalidArgument
from services.orchestrator.run import PpoRun


def _cfg(*overrides: str) -> PpoConfig:
    return load_config(PpoConfig, None, list(overrides))


def test_sequence_length_comes_from_the_checkpoint():
    # The tutorial's long responses fit a checkpoint that is long enough, whatever the default.
    cfg = _cfg("++model.ppo.length_params.max_length=1024", "remote_critic_rm.pad_to_length=2048")
    assert PpoRun._seq_length(cfg, 4096) == 4096
    assert PpoRun._seq_length(_cfg("model.encoder_seq_length=128"), 4096) == 128  # shorter: taken
    with pytest.raises(
        InvalidArgument, match="^model.encoder_seq_length: 8192 exceeds the policy checkpoint's 4096"
    ):
        PpoRun._seq_length(_cfg("model.encoder_seq_length=8192"), 4096)
    with pytest.raises(InvalidArgument, match="^model.ppo.length_params.max_length: 1024 leaves no room"):
        PpoRun._seq_length(cfg, 1024)
    with pytest.raises(
        InvalidArgument, match="^remote_critic_rm.pad_to_length: exceeds the sequence length 1536"
    ):
        PpoRun._seq_length(cfg, 1536)


@pytest.mark.parametrize(
    "overrides, prompts, steps",
    [
        ([], 1100, 2),  # the default: one epoch, 2 steps of 512 prompts
        (["trainer.ppo.max_epochs=3"], 1100, 6),
        (["trainer.ppo.max_steps=15"], 1100, 2),  # the tutorial's Slurm line: the epoch ends first
        (["trainer.ppo.max_steps=15", "trainer.ppo.max_epochs=0"], 1100, 15),
        (["trainer.ppo.max_steps=1"], 1100, 1),
    ],
)
def test_max_epochs_over_the_prompts(overrides, prompts, steps):
    assert PpoRun._max_steps(_cfg(*overrides), prompts) == steps


def test_max_steps_and_epochs_errors():
    with pytest.raises(InvalidArgument, match="^trainer.ppo.max_steps: set it or trainer.ppo.max_epochs"):
        PpoRun._max_steps(_cfg("trainer.ppo.max_epochs=0"), 1000)
    with pytest.raises(
        InvalidArgument, match="^trainer.ppo.max_epochs: 1 epoch.* of 100 prompts is less than one step"
    ):
        PpoRun._max_steps(_cfg(), 100)


def test_devices_must_match_the_job(tmp_path):
    with pytest.raises(
        InvalidArgument,
        match=r"^trainer.devices: trainer.num_nodes x trainer.devices = 1 x 8 but this job has 1",
    ):
        PpoRun(_cfg("trainer.devices=8"), tmp_path)


class _Generation:
    def __init__(self, *engines: str):
        self._engines = set(engines)

    def engines(self) -> set[str]:
        return self._engines


def _engine_check(cfg: PpoConfig, generator) -> None:
    run = object.__new__(PpoRun)  # only the config and the generator: no model, no services
    run.cfg, run.generator = cfg, generator
    run._check_engine()


def test_trt_llm_enable_checks_the_generation_engine(caplog):
    with pytest.raises(
        InvalidArgument, match="^trainer.ppo.trt_llm.enable: is true but the generation service runs torch"
    ):
        _engine_check(_cfg("trainer.ppo.trt_llm.enable=True"), _Generation("torch"))
    with pytest.raises(InvalidArgument, match="runs tensorrt_llm, torch"):  # every replica must
        _engine_check(_cfg("trainer.ppo.trt_llm.enable=True"), _Generation("torch", "tensorrt_llm"))
    _engine_check(_cfg("trainer.ppo.trt_llm.enable=True"), _Generation("tensorrt_llm"))
    _engine_check(_cfg(), _Generation("torch"))
    with caplog.at_level("WARNING", logger="aligner.config"):
        _engine_check(_cfg(), _Generation("tensorrt_llm"))
    assert [r.getMessage() for r in caplog.records] == [
        "notice: trainer.ppo.trt_llm.enable=False: the generation service runs TensorRT-LLM all the same"
    ]
