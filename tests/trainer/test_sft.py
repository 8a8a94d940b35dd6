"""`aligner sft` on a tiny model (2 layers, hidden 64) and a small synthetic data set: outputs
(logs, TensorBoard, CSV, plots, checkpoints, final model), the logged loss equals a hand-computed
response-only loss, gradient accumulation does not change the losses, exact resume after a
"crash", start from a checkpoint, one-line CLI errors, and 2-rank data parallelism (torchrun)
computing the same losses as one process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=160", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.vocab_size=512", "model.encoder_seq_length=64", "model.data.seq_length=64",
    "++model.optim.lr=3e-3", "model.optim.sched.warmup_steps=2", "model.optim.sched.min_lr=3e-4",
    "torch_threads=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthetic-task files and a byte-level BPE trained on them."""
    from trainer.data import synthetic
    from trainer.data.datasets import read_texts
    from trainer.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("sft_data")
    synthetic.generate(root, seed=3, num_train=96, num_test=24)
    train_bpe(read_texts(root / "sft_train.jsonl"), vocab_size=320, out_dir=root / "tok")
    return root


def sft_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        *TINY, f"tokenizer_path={data / 'tok'}", f"exp_manager.explicit_log_dir={run_dir}",
        f"model.data.data_prefix={{train: [{data / 'sft_train.jsonl'}], validation: [{data / 'sft_val.jsonl'}]}}",
        "model.global_batch_size=8", "model.micro_batch_size=4", "trainer.sft.max_steps=6",
        "trainer.sft.val_check_interval=3", "trainer.sft.save_interval=3", "trainer.sft.limit_val_batches=2",
        *extra,
    ]  # fmt: skip


def run_sft(args: list[str], resume: bool = False) -> Path:
    from common.config import SftConfig, load_config
    from trainer import sft

    return sft.train(load_config(SftConfig, None, args), resume=resume)


def losses(run_dir: Path) -> dict[int, float]:
    from trainer.plots import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}


@pytest.fixture(scope="module")
def base_run(data, tmp_path_factory):
    """6 steps, global batch 8 = 2 micro-batches of 4, checkpoints at 3 and 6 (all kept)."""
    run_dir = tmp_path_factory.mktemp("sft_runs") / "base"
    run_sft(sft_args(data, run_dir, "exp_manager.checkpoint_keep_last=0"))
    return run_dir


def test_outputs_of_a_run(base_run):
    from trainer import checkpoint
    from trainer.plots import read_metrics

    records = read_metrics(base_run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["loss"] < records[0]["loss"]  # it learns
    assert records[-1]["consumed_samples"] == 48
    assert [r["step"] for r in read_metrics(base_run / "validation.jsonl")] == [3, 6]
    assert (base_run / "metrics.csv").read_text().splitlines()[0].startswith("step,loss,lr,grad_norm")
    assert len((base_run / "metrics.csv").read_text().splitlines()) == 7
    assert list((base_run / "tensorboard").glob("events.out.tfevents.*"))
    assert (base_run / "sft_curves.png").stat().st_size > 0 and (base_run / "sft_validation.png").exists()
    assert [p.name for p in checkpoint.list_checkpoints(base_run)] == ["step_000003", "step_000006"]
    meta = checkpoint.read_meta(base_run / "final")
    assert meta.step == 6 and not meta.has_optimizer and not meta.has_value_head
    assert meta.arch.hidden_size == 64
    assert checkpoint.load_tokenizer(base_run / "final") is not None
    assert "global_batch_size: 8" in (base_run / "config.yaml").read_text()


def test_logged_loss_is_the_response_token_mean_over_the_global_batch(data, base_run):
    """Step 1's loss, recomputed by hand from the seeded initial model and the sampler's first
    global batch: sum of -log p over response tokens (mask) / number of response tokens."""
    from common.config import SftConfig, load_config
    from trainer import loop
    from trainer.data.datasets import EpochSampler, SftDataset, collate_sft
    from trainer.losses import token_logprobs
    from trainer.model import build_model
    from trainer.tokenizer import Tokenizer

    cfg = load_config(SftConfig, None, sft_args(data, base_run))
    tokenizer = Tokenizer.load(data / "tok")
    dataset = SftDataset(data / "sft_train.jsonl", tokenizer, 64)
    batch = collate_sft(
        [dataset[i] for i in EpochSampler(len(dataset), seed=cfg.seed).take(8)], tokenizer.pad_id
    )
    # The mask covers the response tokens and EOS only: never the prompt, never padding.
    first = dataset[0]
    prompt_len = int((first["loss_mask"] == 0).sum()) + 1
    assert tokenizer.decode(first["tokens"][:prompt_len]).endswith("Assistant:")
    model = build_model(loop.arch_from_config(cfg.model), seed=cfg.seed)
    with torch.no_grad():
        nll = -token_logprobs(model(batch["tokens"]).logits, batch["tokens"])
    expected = float((nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum())
    assert losses(base_run)[1] == pytest.approx(expected, rel=1e-5)


def test_gradient_accumulation_does_not_change_the_losses(data, base_run, tmp_path):
    """Global batch 8 as 8 micro-batches of 1 instead of 2 of 4: the same token-weighted
    gradients, so the same losses at every step."""
    run_dir = run_sft(sft_args(data, tmp_path / "mb1", "model.micro_batch_size=1", "trainer.sft.val_check_interval=0",
                               "trainer.sft.save_interval=0"))  # fmt: skip
    base, mb1 = losses(base_run), losses(run_dir)
    assert sorted(mb1) == sorted(base)
    for step in base:
        assert mb1[step] == pytest.approx(base[step], rel=1e-5)


def test_resume_after_a_crash_continues_exactly(data, base_run, tmp_path):
    """Run 6 steps (dropout on, so the RNG matters) vs the same run "crashed" after its step-3
    checkpoint and resumed: steps 4-6 have bit-identical losses; records logged after the
    checkpoint by the crashed run are replaced, not duplicated."""
    args = ["model.hidden_dropout=0.1", "model.attention_dropout=0.1", "exp_manager.checkpoint_keep_last=0"]
    full = run_sft(sft_args(data, tmp_path / "full", *args))
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    # The state a crash right after step 5 leaves: checkpoint 3, logs up to 5, no final model.
    shutil.rmtree(crashed / "checkpoints" / "step_000006")
    shutil.rmtree(crashed / "final")
    lines = (crashed / "metrics.jsonl").read_text().splitlines()[:5]
    poisoned = [json.dumps({**json.loads(line), "loss": -1.0}) if json.loads(line)["step"] > 3 else line
                for line in lines]  # fmt: skip
    (crashed / "metrics.jsonl").write_text("\n".join(poisoned) + "\n")

    run_sft(sft_args(data, crashed, *args, "exp_manager.resume_if_exists=false"), resume=True)
    resumed, expected = losses(crashed), losses(full)
    assert expected[1] != losses(base_run)[1]  # dropout is on: the RNG state matters
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [expected[s] for s in (4, 5, 6)]
    assert len((crashed / "metrics.jsonl").read_text().splitlines()) == 6


def test_start_from_a_checkpoint_uses_its_arch_and_tokenizer(data, base_run, tmp_path):
    """No tokenizer_path and different model.* arch keys: the checkpoint's win; the starting
    loss is the trained model's (lower than a fresh model's first loss)."""
    from trainer import checkpoint

    args = [a for a in sft_args(data, tmp_path / "from_ckpt") if not a.startswith("tokenizer_path=")]
    run_dir = run_sft([*args, f"pretrained_checkpoint.restore_from_path={base_run / 'final'}",
                       "model.hidden_size=128", "trainer.sft.max_steps=1", "trainer.sft.val_check_interval=0"])  # fmt: skip
    assert checkpoint.read_meta(run_dir / "final").arch.hidden_size == 64
    assert losses(run_dir)[1] < losses(base_run)[1]


def one_line_error(capsys, argv: list[str]) -> str:
    from services.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"aligner {argv[0]}: error:")
    return err


def test_cli_errors_are_one_line(data, base_run, tmp_path, capsys):
    args = sft_args(data, tmp_path / "err")
    no_train = [a for a in args if not a.startswith("model.data.data_prefix")]
    assert "model.data.data_prefix.train" in one_line_error(capsys, ["sft", *no_train])
    assert "does not exist" in one_line_error(
        capsys, ["sft", *args, f"pretrained_checkpoint.restore_from_path={tmp_path / 'nope'}"]
    )
    assert "model.data.data_impl" in one_line_error(capsys, ["sft", *args, "model.data.data_impl=mmap"])
    assert "model.global_batch_size" in one_line_error(capsys, ["sft", *args, "model.micro_batch_size=3"])
    assert "trainer.devices" in one_line_error(capsys, ["sft", *args, "trainer.devices=2"])
    assert "no_such_key" in one_line_error(capsys, ["sft", *args, "model.no_such_key=1"])
    # A run directory with checkpoints is never trained over from scratch.
    assert "--resume" in one_line_error(
        capsys, ["sft", *sft_args(data, base_run), "exp_manager.resume_if_exists=false"]
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_two_data_parallel_ranks_compute_the_same_losses_as_one(data, base_run, tmp_path):
    """torchrun, 2 processes on gloo: each trains on half of every global batch (1 micro-batch of
    4), gradients all-reduced. Losses and final weights match the 1-process run's."""
    from trainer import checkpoint

    run_dir = tmp_path / "dp2"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), "-m", "services.cli", "sft",
        *sft_args(data, run_dir, "trainer.devices=2", "exp_manager.checkpoint_keep_last=0"),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = losses(base_run), losses(run_dir)
    assert sorted(two) == sorted(one)
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4)
    assert checkpoint.read_meta(run_dir / "checkpoints" / "step_000006").world_size == 2


def test_step_and_validation_arithmetic():
    from common.config import LoopConfig
    from common.errors import InvalidArgument
    from trainer import loop

    # NeMo-Aligner's count: max_epochs x (examples // global batch), capped by max_steps.
    assert loop.total_steps(LoopConfig(max_epochs=2, max_steps=-1), 100, 16, "sft") == 12
    assert loop.total_steps(LoopConfig(max_epochs=2, max_steps=5), 100, 16, "sft") == 5
    assert loop.total_steps(LoopConfig(max_epochs=1, max_steps=1000), 100, 16, "rm") == 6
    assert loop.total_steps(LoopConfig(max_epochs=0, max_steps=50), 100, 16, "rm") == 50
    with pytest.raises(InvalidArgument, match="model.global_batch_size"):
        loop.total_steps(LoopConfig(), 10, 16, "sft")
    with pytest.raises(InvalidArgument, match="trainer.rm.max_steps"):
        loop.total_steps(LoopConfig(max_epochs=0, max_steps=-1), 100, 16, "rm")
    assert loop.check_batch_sizes(16, 2, 2) == 4
    with pytest.raises(InvalidArgument, match="model.global_batch_size"):
        loop.check_batch_sizes(16, 3, 1)
    # limit_val_batches: <= 1.0 a fraction of the batches, > 1 a count, 0 none.
    assert loop.validation_indices(50, 8, 1.0) == list(range(50))
    assert loop.validation_indices(50, 8, 0.5) == list(range(32))  # ceil(0.5 x 7) = 4 batches
    assert loop.validation_indices(50, 8, 2) == list(range(16))
    assert loop.validation_indices(50, 8, 100) == list(range(50))
    assert loop.validation_indices(50, 8, 0) == []
    assert [s for s in range(1, 11) if loop.is_boundary(s, 4, 10)] == [4, 8, 10]
    assert not any(loop.is_boundary(s, 0, 10) for s in range(1, 11))
