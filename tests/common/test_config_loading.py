"""common.config: defaults, YAML, dotted overrides (as in the seed's commands) and errors naming the key."""

from __future__ import annotations

import pytest

from common.config import (
    NOTICES,
    ConfigError,
    ModelServiceConfig,
    PpoConfig,
    ServerConfig,
    TrainRmConfig,
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
            "++trainer.ppo.initial_policy_kl_penalty=0.02",
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


# --- Hydra's override rules -------------------------------------------------------------------


def test_plain_override_needs_an_existing_key():
    # model.data.data_prefix is an open map: a new entry needs ++ (or +), as in Hydra.
    with pytest.raises(
        ConfigError, match=r"'model\.data\.data_prefix\.train': not in the config yet; add it with \+\+"
    ):
        load_config(PpoConfig, None, ["model.data.data_prefix.train=[a.jsonl]"])
    cfg = load_config(PpoConfig, None, ["++model.data.data_prefix.train=[a.jsonl]"])
    assert cfg.model.data.data_prefix == {"train": ["a.jsonl"]}


def test_double_plus_adds_or_sets_but_never_invents_a_key():
    cfg = load_config(
        PpoConfig, None, ["++trainer.ppo.max_steps=4", "++model.data.data_prefix.test=[t.jsonl]"]
    )
    assert cfg.trainer.ppo.max_steps == 4 and cfg.model.data.data_prefix == {"test": ["t.jsonl"]}
    # Hydra would add it and nothing would read it: here that is an error naming the key.
    with pytest.raises(ConfigError, match=r"'model\.ppo\.not_a_key': not a key of the PpoConfig schema"):
        load_config(PpoConfig, None, ["++model.ppo.not_a_key=1"])
    with pytest.raises(ConfigError, match=r"did you mean model\.optim\.lr\?"):
        load_config(PpoConfig, None, ["++model.optim.lrr=1"])


def test_single_plus_adds_only_a_key_without_a_value():
    cfg = load_config(PpoConfig, None, ["+pretrained_checkpoint.restore_from_path=/sft"])
    assert cfg.pretrained_checkpoint.restore_from_path == "/sft"
    with pytest.raises(
        ConfigError,
        match=r"'trainer\.ppo\.max_steps': \+trainer\.ppo\.max_steps adds a key, but it already has a value",
    ):
        load_config(PpoConfig, None, ["+trainer.ppo.max_steps=3"])
    # A value set by an earlier override (or the file) counts.
    with pytest.raises(ConfigError, match="already has a value"):
        load_config(
            PpoConfig,
            None,
            ["++pretrained_checkpoint.restore_from_path=/a", "+pretrained_checkpoint.restore_from_path=/b"],
        )


def test_delete_override_is_refused():
    with pytest.raises(ConfigError, match="deleting a key"):
        load_config(PpoConfig, None, ["~model.optim.lr"])


def test_unknown_key_exits_2_with_one_line(capsys):
    from services.cli import main

    assert main(["train-rm", "model.no_such_key=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "aligner train-rm: error: config key 'model.no_such_key': not a key of the TrainRmConfig schema, so nothing would read it"
    )


# --- NeMo-Aligner's names and keys --------------------------------------------------------------


def test_server_aliases_resolve_to_the_schema_key(tmp_path):
    cfg = load_config(ModelServiceConfig, None, [
        "trainer.ppo.port=5567", "++pretrained_checkpoint.restore_from_path=/rm",
        "trainer.ppo.inference_micro_batch_size=4", "trainer.devices=2", "trainer.num_nodes=1",
    ])  # fmt: skip
    assert (cfg.server.port, cfg.checkpoint_path, cfg.batching.inference_micro_batch_size) == (5567, "/rm", 4)
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (2, 1)
    # In a --config file too.
    path = tmp_path / "critic.yaml"
    path.write_text("pretrained_checkpoint: {restore_from_path: /rm2}\ntrainer: {ppo: {port: 7}}\n")
    cfg = load_config(ModelServiceConfig, path)
    assert (cfg.checkpoint_path, cfg.server.port) == ("/rm2", 7)
    # One key under two names with two values is ambiguous.
    with pytest.raises(ConfigError, match="'server.port' and 'trainer.ppo.port' are one key"):
        load_config(ModelServiceConfig, None, ["checkpoint_path=/rm", "server.port=1", "trainer.ppo.port=2"])
    with pytest.raises(ConfigError, match="are one key"):
        path.write_text("pretrained_checkpoint: {restore_from_path: /a}\ncheckpoint_path: /b\n")
        load_config(ModelServiceConfig, path)


def test_ppo_aliases_and_use_absolute_kl():
    cfg = load_config(
        PpoConfig,
        None,
        ["++model.ppo.combine_rm_and_critic_server=False", "trainer.trt_llm.model_type=llama"],
    )
    assert cfg.remote_critic_rm.combine_rm_and_critic_server is False
    assert load_config(PpoConfig, None, ["++model.ppo.use_absolute_kl=False"]).model.ppo.kl_estimator == "k1"
    assert load_config(PpoConfig, None, ["++model.ppo.use_absolute_kl=True"]).model.ppo.kl_estimator == "abs"
    assert load_config(PpoConfig).model.ppo.kl_estimator == "abs"
    with pytest.raises(ConfigError, match="use_absolute_kl.*kl_estimator=k1"):
        load_config(PpoConfig, None, ["model.ppo.use_absolute_kl=false", "model.ppo.kl_estimator=k3"])


@pytest.mark.parametrize(
    "override, why",
    [
        ("++model.mcore_gpt=False", "Megatron-core GPTModel"),
        ("trainer.trt_llm.model_type=gptnext", "Llama-style"),
        ("++model.pipeline_model_parallel_size=2", "served passes are not pipelined"),
    ],
)
def test_values_that_cannot_work_are_errors(override, why):
    schema = ModelServiceConfig if "pipeline" in override else PpoConfig
    with pytest.raises(ConfigError, match=why):
        load_config(schema, None, ["checkpoint_path=/c", override] if "pipeline" in override else [override])


def test_mapped_nemo_keys_log_their_notice(caplog):
    overrides = [
        "++model.mcore_gpt=True", "++model.megatron_amp_O2=True", "trainer.ppo.trt_llm.reshard=True",
        "trainer.ppo.trt_llm.unload_engine_train=False", "trainer.ppo.batch_iterator.use_flask=True",
        "remote_critic_rm.pad_to_length=2048", "model.ppo.val_rollout_micro_batch_size=4",
        "trainer.ppo.rollout_batch_seq_length=128",
    ]  # fmt: skip
    with caplog.at_level("WARNING", logger="aligner.config"):
        load_config(PpoConfig, None, overrides)
    notices = [r.getMessage() for r in caplog.records if r.name == "aligner.config"]
    assert len(notices) == len(NOTICES)
    for key, text in NOTICES.items():
        assert any(n.startswith(f"notice: {key}=") and n.endswith(text) for n in notices), key
    assert all("\n" not in n for n in notices)
    caplog.clear()
    with caplog.at_level("WARNING", logger="aligner.config"):
        load_config(TrainRmConfig, None, ["trainer.rm.max_steps=3"])
    assert not caplog.records  # nothing NeMo-only was set


def test_recompute_method_with_selective_gets_a_notice(caplog):
    # The tutorial's PPO line: NeMo ignores the method with selective recompute; here it says so.
    with caplog.at_level("WARNING", logger="aligner.config"):
        cfg = load_config(PpoConfig, None, [
            "++model.activations_checkpoint_granularity=selective", "++model.activations_checkpoint_method=uniform",
        ])  # fmt: skip
    assert cfg.model.activations_checkpoint_granularity == "selective"
    assert [r.getMessage() for r in caplog.records] == [
        "notice: model.activations_checkpoint_method=uniform: applies to full recompute only; "
        "selective recomputes the core attention of every layer"
    ]
