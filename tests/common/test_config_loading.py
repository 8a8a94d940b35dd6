"""common.config: defaults, YAML, dotted overrides (as in the seed's commands) and errors naming the key."""

from __future__ import annotations

import pytest

from common.config import (
    ConfigError,
    ModelServiceConfig,
    PpoConfig,
    ServerConfig,
    from_dict,
    load_config,
    to_dict,
    to_yaml,
)


def test_defaults_are_typed_instances():
    cfg = load_config(PpoConfig)
    assert isinstance(cfg, PpoConfig)
    assert cfg.trainer.ppo.max_steps == -1
    assert cfg.model.ppo.ratio_eps == pytest.approx(0.2)
    assert isinstance(load_config(ServerConfig).tls.cert_file, type(None))


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text(
        "trainer:\n  ppo:\n    max_steps: 7\n    save_interval: 3\nmodel:\n  ppo:\n    entropy_bonus: 0.5\n"
    )
    cfg = load_config(PpoConfig, path, ["trainer.ppo.max_steps=15"])
    assert cfg.trainer.ppo.max_steps == 15  # the command line wins over the file
    assert cfg.trainer.ppo.save_interval == 3  # the file wins over the default
    assert cfg.model.ppo.entropy_bonus == pytest.approx(0.5)
    assert cfg.trainer.ppo.val_check_interval == PpoConfig().trainer.ppo.val_check_interval


def test_seed_style_overrides():
    cfg = load_config(
        PpoConfig,
        None,
        [
            "++model.optim.lr=1e-6",
            "+trainer.ppo.initial_policy_kl_penalty=0.02",
            "model.data.data_prefix={train: [a.jsonl], validation: [b.jsonl], test: [c.jsonl]}",
            "remote_critic_rm.pad_to_length=128",
            "trainer.ppo.normalize_advantages=false",
        ],
    )
    assert cfg.model.optim.lr == pytest.approx(1e-6)
    assert cfg.trainer.ppo.initial_policy_kl_penalty == pytest.approx(0.02)
    assert cfg.model.data.data_prefix == {
        "train": ["a.jsonl"],
        "validation": ["b.jsonl"],
        "test": ["c.jsonl"],
    }
    assert cfg.remote_critic_rm.pad_to_length == 128
    assert cfg.trainer.ppo.normalize_advantages is False


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.ppo.max_stepz=1", "trainer.ppo.max_stepz"),
        ("model.ppo.nonsense.deeper=1", "model.ppo.nonsense"),
        ("trainer.ppo.max_steps=abc", "trainer.ppo.max_steps"),
        ("model.ppo.entropy_bonus=[1, 2]", "model.ppo.entropy_bonus"),
        ("trainer.ppo.normalize_advantages=maybe", "trainer.ppo.normalize_advantages"),
    ],
)
def test_unknown_key_or_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(PpoConfig, None, [override])
    assert f"'{key}'" in str(info.value)


def test_unknown_key_in_yaml_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  ppo:\n    bogus: 1\n")
    with pytest.raises(ConfigError, match=r"'trainer\.ppo\.bogus'"):
        load_config(PpoConfig, path)


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PpoConfig, tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml.*not valid YAML"):
        load_config(PpoConfig, broken)
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(PpoConfig, None, ["trainer.ppo.max_steps"])


def test_missing_mandatory_value_names_the_key():
    with pytest.raises(ConfigError, match="checkpoint_path"):
        load_config(ModelServiceConfig)
    assert load_config(ModelServiceConfig, None, ["checkpoint_path=/ckpt"]).checkpoint_path == "/ckpt"


def test_dict_and_yaml_round_trip():
    cfg = load_config(PpoConfig, None, ["trainer.ppo.max_steps=3"])
    assert from_dict(PpoConfig, to_dict(cfg)) == cfg
    assert "max_steps: 3" in to_yaml(cfg)
    with pytest.raises(ConfigError):
        from_dict(PpoConfig, {"trainer": {"ppo": {"max_steps": "three"}}})
