"""`aligner train-rm` on a tiny model (2 layers, hidden 64) from a short SFT run, on the
synthetic task: the seed's command line through the CLI, outputs (validation accuracy, test
metrics, plots, final reward model), accuracy well above chance, the reward-encoding convention,
exact resume, one-line errors, and `aligner eval rm`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

TINY = [
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=160", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.vocab_size=512", "model.encoder_seq_length=64", "model.data.seq_length=64",
    "torch_threads=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from trainer.data import synthetic
    from trainer.data.datasets import read_texts
    from trainer.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("rm_data")
    synthetic.generate(root, seed=5, num_train=400, num_test=64)
    texts = read_texts(root / "sft_train.jsonl") + read_texts(root / "train_comparisons.jsonl")
    train_bpe(texts, vocab_size=320, out_dir=root / "tok")
    return root


@pytest.fixture(scope="module")
def sft_model(data, tmp_path_factory):
    """A short SFT run: the reward model's starting trunk (and its tokenizer)."""
    from common.config import SftConfig, load_config
    from trainer import sft

    run_dir = tmp_path_factory.mktemp("rm_sft") / "sft"
    sft.train(load_config(SftConfig, None, [
        *TINY, f"tokenizer_path={data / 'tok'}", f"exp_manager.explicit_log_dir={run_dir}",
        f"model.data.data_prefix={{train: [{data / 'sft_train.jsonl'}]}}", "model.global_batch_size=16",
        "model.micro_batch_size=8", "trainer.sft.max_steps=10", "++model.optim.lr=3e-3",
        "model.optim.sched.warmup_steps=2", "trainer.sft.save_interval=0",
    ]))  # fmt: skip
    return run_dir / "final"


def prefix(
    data: Path, train: str = "train_comparisons.jsonl", test: str | None = "test_comparisons.jsonl"
) -> str:
    splits = [f"train: [{data / train}]", f"validation: [{data / 'test_comparisons.jsonl'}]"]
    if test:
        splits.append(f"test: [{data / test}]")
    return "model.data.data_prefix={" + ", ".join(splits) + "}"


def seed_style_args(
    data: Path, sft_model: Path, run_dir: Path, *extra: str, data_prefix: str | None = None
) -> list[str]:
    """The seed's train_reward_model command line, scaled down (no tokenizer_path: the SFT
    checkpoint's tokenizer is used)."""
    return [
        "trainer.num_nodes=1", "trainer.devices=1",
        "++model.micro_batch_size=4", "++model.global_batch_size=16", "++model.data.data_impl=jsonl",
        f"pretrained_checkpoint.restore_from_path={sft_model}", data_prefix or prefix(data),
        f"exp_manager.explicit_log_dir={run_dir}", "trainer.rm.val_check_interval=10",
        "exp_manager.create_wandb_logger=False", "exp_manager.wandb_logger_kwargs.project=rm_test",
        "exp_manager.wandb_logger_kwargs.name=tiny", "trainer.rm.save_interval=10",
        "trainer.rm.max_steps=40", "trainer.rm.max_epochs=2", "trainer.rm.limit_val_batches=2", "++model.tensor_model_parallel_size=1",
        "++model.pipeline_model_parallel_size=1", "model.optim.sched.constant_steps=0",
        "++model.optim.lr=1e-3", "model.optim.sched.warmup_steps=4", "model.optim.sched.min_lr=1e-4",
        "torch_threads=1", *extra,
    ]  # fmt: skip


def test_seed_command_line_parses_into_the_schema(data, sft_model, tmp_path):
    from common.config import TrainRmConfig, load_config

    cfg = load_config(TrainRmConfig, None, seed_style_args(data, sft_model, tmp_path))
    assert (cfg.model.micro_batch_size, cfg.model.global_batch_size, cfg.model.data.data_impl) == (
        4,
        16,
        "jsonl",
    )
    assert cfg.model.data.data_prefix == {
        "train": [str(data / "train_comparisons.jsonl")],
        "validation": [str(data / "test_comparisons.jsonl")],
        "test": [str(data / "test_comparisons.jsonl")],
    }
    assert (cfg.trainer.rm.val_check_interval, cfg.trainer.rm.save_interval, cfg.trainer.rm.max_steps) == (
        10,
        10,
        40,
    )
    assert cfg.trainer.rm.limit_val_batches == 2.0 and cfg.exp_manager.explicit_log_dir == str(tmp_path)
    assert cfg.pretrained_checkpoint.restore_from_path == str(sft_model)
    assert cfg.exp_manager.wandb_logger_kwargs.project == "rm_test"


@pytest.fixture(scope="module")
def rm_run(data, sft_model, tmp_path_factory):
    """train-rm through `services.cli.main` with the seed-style command line."""
    from services.cli import main

    run_dir = tmp_path_factory.mktemp("rm_runs") / "rm"
    assert main(["train-rm", *seed_style_args(data, sft_model, run_dir)]) == 0
    return run_dir


def test_run_outputs_and_accuracy_above_chance(rm_run):
    from trainer import checkpoint
    from trainer.plots import read_metrics

    records = read_metrics(rm_run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 41))
    validation = read_metrics(rm_run / "validation.jsonl")
    assert [r["step"] for r in validation] == [10, 20, 30, 40]
    assert (
        validation[-1]["val_accuracy"] > validation[0]["val_accuracy"] or validation[0]["val_accuracy"] > 0.8
    )
    test = json.loads((rm_run / "test_metrics.json").read_text())
    assert test["num_pairs"] == 64 and test["step"] == 40
    # Chance is 0.5; the longer answer alone is chosen in about 3/4 of the synthetic pairs.
    assert test["accuracy"] >= 0.75, test
    assert test["reward_chosen_mean"] > test["reward_rejected_mean"]
    assert (rm_run / "rm_validation.png").stat().st_size > 0 and (rm_run / "rm_curves.png").exists()
    assert (rm_run / "validation.csv").read_text().startswith("step,val_loss,val_accuracy")
    assert list((rm_run / "tensorboard").glob("events.out.tfevents.*"))
    meta = checkpoint.read_meta(rm_run / "final")
    assert meta.has_value_head and meta.step == 40 and meta.arch.hidden_size == 64
    assert [p.name for p in checkpoint.list_checkpoints(rm_run)] == [
        "step_000030",
        "step_000040",
    ]  # keep_last 2


def test_reward_is_read_at_the_eos_of_encode_for_reward(data, rm_run):
    """Training tokens = `encode_for_reward` ([BOS] prompt response [EOS]); the training-side
    reward of a pair equals what `sequence_rewards` (the services' scoring) gives those ids."""
    from trainer import loop
    from trainer.checkpoint import load_model_for_inference
    from trainer.data.datasets import ComparisonDataset, collate_comparisons, read_texts
    from trainer.model import sequence_rewards
    from trainer.rm import encode_for_reward, pair_rewards

    model, arch, tokenizer = load_model_for_inference(rm_run / "final")
    texts = read_texts(data / "test_comparisons.jsonl")[:8]
    dataset = ComparisonDataset(data / "test_comparisons.jsonl", tokenizer, 64)
    ids = [encode_for_reward(tokenizer, t) for t in texts]
    assert [dataset[i]["chosen"].tolist() for i in range(4)] == ids[0::2]
    assert all(x[0] == tokenizer.bos_id and x[-1] == tokenizer.eos_id for x in ids)
    # Whole-text encoding gives the same ids on this format (the prompt ends at a pre-token boundary).
    assert ids == [tokenizer.encode(t, add_bos=True, add_eos=True) for t in texts]
    with torch.no_grad():
        chosen, rejected = pair_rewards(
            model, collate_comparisons([dataset[i] for i in range(4)], tokenizer.pad_id)
        )
    served = sequence_rewards(model, [torch.tensor(x) for x in ids], micro_batch_size=3)
    assert torch.allclose(torch.stack([chosen, rejected], 1).flatten(), served, atol=1e-5)
    assert loop.data_parallel().size == 1


def test_resume_after_a_crash_continues_exactly(data, sft_model, tmp_path):
    args = ["trainer.rm.max_steps=6", "trainer.rm.save_interval=3", "trainer.rm.val_check_interval=3",
            "exp_manager.checkpoint_keep_last=0", "model.hidden_dropout=0.1"]  # fmt: skip
    from common.config import TrainRmConfig, load_config
    from trainer import rm
    from trainer.plots import read_metrics

    full = rm.train(
        load_config(TrainRmConfig, None, seed_style_args(data, sft_model, tmp_path / "full", *args))
    )
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    for name in ("checkpoints/step_000006", "final"):
        shutil.rmtree(crashed / name)
    (crashed / "test_metrics.json").unlink()
    rm.train(
        load_config(TrainRmConfig, None, seed_style_args(data, sft_model, crashed, *args))
    )  # resume_if_exists

    def by_step(run_dir, key):
        return {r["step"]: r[key] for r in read_metrics(run_dir / "metrics.jsonl")}

    for key in ("loss", "accuracy", "grad_norm"):
        assert by_step(crashed, key) == by_step(full, key)
    assert json.loads((crashed / "test_metrics.json").read_text())["accuracy"] == pytest.approx(
        json.loads((full / "test_metrics.json").read_text())["accuracy"]
    )
    assert [r["step"] for r in read_metrics(crashed / "validation.jsonl")] == [3, 6]


def one_line_error(capsys, argv: list[str]) -> str:
    from services.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"aligner {argv[0]}: error:"), err
    return err


def test_cli_errors_are_one_line(data, sft_model, tmp_path, capsys):
    lines = (data / "train_comparisons.jsonl").read_text().splitlines()
    (tmp_path / "odd.jsonl").write_text("\n".join(lines[:5]) + "\n")
    (tmp_path / "empty.jsonl").write_text("")

    def args(*extra, data_prefix=None):
        return [
            "train-rm",
            *seed_style_args(data, sft_model, tmp_path / "run", *extra, data_prefix=data_prefix),
        ]

    odd = prefix(data, train=str(tmp_path / "odd.jsonl"))
    assert "odd number of lines (5)" in one_line_error(capsys, args(data_prefix=odd))
    empty = prefix(data, test=str(tmp_path / "empty.jsonl"))
    assert "no comparisons (empty file)" in one_line_error(capsys, args(data_prefix=empty))
    no_test = prefix(data, test=None)
    assert "model.data.data_prefix.test: missing" in one_line_error(capsys, args(data_prefix=no_test))
    missing = tmp_path / "no_such_checkpoint"
    assert f"checkpoint {missing} does not exist" in one_line_error(
        capsys, args(f"pretrained_checkpoint.restore_from_path={missing}")
    )
    try:
        import wandb  # noqa: F401
    except ImportError:
        assert "wandb is not installed" in one_line_error(
            capsys, args("exp_manager.create_wandb_logger=True")
        )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_eval_cli_matches_the_end_of_training_test_metrics(data, sft_model, rm_run, tmp_path, capsys):
    from services.cli import main

    out = tmp_path / "eval.json"
    argv = [
        "eval",
        "rm",
        "--checkpoint",
        str(rm_run / "final"),
        "--data",
        str(data / "test_comparisons.jsonl"),
    ]
    assert main([*argv, "--micro-batch-size", "5", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    expected = json.loads((rm_run / "test_metrics.json").read_text())
    assert result["num_pairs"] == expected["num_pairs"]
    assert result["accuracy"] == pytest.approx(expected["accuracy"])
    assert result["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    capsys.readouterr()
    assert "not a reward model" in one_line_error(
        capsys, ["eval", "rm", "--checkpoint", str(sft_model), "--data", "x"]
    )
