"""End-to-end fixtures: a tiny synthetic task, tokenizer and checkpoints made once per session,
and the services started by the real launcher (`services.launch`) on 127.0.0.1, always stopped."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from common.config import LaunchConfig, ModelArchConfig
from services.launch.processes import ServiceGroup
from services.launch.up import ppo_overrides, service_processes

ARCH = ModelArchConfig(
    num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
    vocab_size=512, encoder_seq_length=64,
)  # fmt: skip


@dataclass
class Assets:
    root: Path
    data: Path
    tokenizer: Path
    policy: Path
    reward: Path


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Assets:
    from trainer import parallel
    from trainer.checkpoint import save_checkpoint
    from trainer.data.synthetic import generate
    from trainer.model import build_model
    from trainer.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("e2e")
    generate(root / "data", seed=3, num_train=200, num_test=40)
    texts = [json.loads(line)["text"] for line in (root / "data" / "sft_train.jsonl").read_text().splitlines()]
    tokenizer = train_bpe(texts, vocab_size=ARCH.vocab_size, out_dir=root / "tokenizer")
    parallel.init_parallel(seed=1)
    save_checkpoint(root / "policy", build_model(ARCH, seed=1), step=0, arch=ARCH, tokenizer=tokenizer)
    save_checkpoint(root / "reward", build_model(ARCH, value_head=True, seed=2), step=0, arch=ARCH, tokenizer=tokenizer)
    return Assets(root, root / "data", root / "tokenizer", root / "policy", root / "reward")


def _ppo_config(assets: Assets, run_dir: Path, **extra) -> Path:
    """A small PPO config file: 16 rollouts of up to 12 tokens a step, two optimizer steps."""
    config = {
        "pretrained_checkpoint": {"restore_from_path": str(assets.policy)},
        "exp_manager": {"explicit_log_dir": str(run_dir), "checkpoint_keep_last": 3},
        # max_steps bounds these runs (max_epochs would end them after 12 steps of the 200 prompts).
        "trainer": {"ppo": {"val_check_interval": 2, "save_interval": 1, "initial_policy_kl_penalty": 0.05,
                            "max_epochs": 100}},
        "remote": {"retry_max_wait_s": 60.0, "connect_timeout_s": 30.0},
        "model": {
            "encoder_seq_length": ARCH.encoder_seq_length,
            "global_batch_size": 8,
            "micro_batch_size": 4,
            "optim": {"lr": 1e-3, "sched": {"warmup_steps": 0}},
            "data": {"data_prefix": {"train": [str(assets.data / "train_prompts.jsonl")],
                                     "validation": [str(assets.data / "test_prompts.jsonl")]}},
            "ppo": {"num_rollout_samples": 16, "rollout_micro_batch_size": 8, "num_val_samples": 8,
                    "length_params": {"max_length": 12}},
        },
    }  # fmt: skip
    path = run_dir.parent / f"{run_dir.name}.yaml"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.merge(OmegaConf.create(config), OmegaConf.create(extra)), path)
    return path


@pytest.fixture
def ppo_config():
    """`ppo_config(assets, run_dir, **sections)` writes a small PPO config file; returns its path."""
    return _ppo_config


@pytest.fixture(scope="module")
def services(assets, tmp_path_factory):
    """generation + reward-critic + reference, started by the launcher; yields (group, overrides)."""
    cfg = LaunchConfig(run_dir=str(tmp_path_factory.mktemp("services")), policy_checkpoint=str(assets.policy),
                       reward_checkpoint=str(assets.reward), startup_timeout_s=240,
                       # the PPO runs' folders (tmp_path), where the critic saves its checkpoints
                       reward=[f"server.checkpoint_root={tmp_path_factory.getbasetemp()}"])  # fmt: skip
    with ServiceGroup(service_processes(cfg), timeout_s=cfg.startup_timeout_s) as group:
        yield group, ppo_overrides(group, combined=True)
