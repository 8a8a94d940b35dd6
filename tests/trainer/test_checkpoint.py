"""Our checkpoint format: atomic writes (a crash mid-save leaves nothing that looks complete),
exact resume of model + optimizer + scheduler + RNG, value-head variants (reward model -> critic,
SFT -> reward model), Hugging Face directories as starting points, resharding between tensor
parallel 1 and 2 (two real processes), and the `aligner convert` command.

This file is also a worker: `python test_checkpoint.py crash RUN_DIR` saves and then dies in the
middle of a second save; `torchrun ... test_checkpoint.py tp2 DIR` is the TP=2 side."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.config import ModelArchConfig, OptimConfig, SchedConfig
from common.errors import InvalidArgument, NotFound

CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parents[2]
ARCH = ModelArchConfig(
    num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
    vocab_size=256, encoder_seq_length=64,
)  # fmt: skip
OPTIM = OptimConfig(lr=1e-2, weight_decay=0.01, sched=SchedConfig(warmup_steps=2, min_lr=1e-4))
MAX_STEPS = 10
SEED = 7


# ---------------------------------------------------------------------------------------------
# Helpers shared with the workers
# ---------------------------------------------------------------------------------------------


def batch(step: int, vocab: int = ARCH.vocab_size) -> torch.Tensor:
    return torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(100 + step))


def train_step(model, optimizer, scheduler, tokens: torch.Tensor) -> float:
    model.train()
    logits = model(tokens.to(model.device)).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten().to(logits.device))
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def logits_of(model, tokens: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(tokens.to(model.device)).logits.float().cpu()


def build(arch=ARCH, value_head=False, seed=SEED):
    from trainer.model import build_model
    from trainer.optim import build_optimizer, build_scheduler

    model = build_model(arch, value_head=value_head, seed=seed)
    optimizer = build_optimizer(model, OPTIM)
    return model, optimizer, build_scheduler(optimizer, OPTIM, MAX_STEPS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="module")
def parallel():
    from trainer import parallel

    parallel.init_parallel(seed=SEED)
    return parallel


# ---------------------------------------------------------------------------------------------
# Atomic directories and run layout
# ---------------------------------------------------------------------------------------------


def test_write_directory_atomically_replaces_or_leaves_untouched(tmp_path):
    from trainer.checkpoint import write_directory_atomically

    dst = tmp_path / "out"
    write_directory_atomically(dst, lambda d: (d / "a.txt").write_text("one"))
    assert (dst / "a.txt").read_text() == "one"

    def failing(d):
        (d / "a.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_directory_atomically(dst, failing)
    assert (dst / "a.txt").read_text() == "one"  # the old directory is intact
    write_directory_atomically(dst, lambda d: (d / "b.txt").write_text("two"))
    assert sorted(p.name for p in dst.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no tmp or old leftovers


def _fake_checkpoint(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "meta.json").write_text("{}")


def test_latest_checkpoint_sees_only_complete_ones_and_prune_keeps_last(tmp_path):
    from trainer.checkpoint import (
        latest_checkpoint,
        list_checkpoints,
        prune_checkpoints,
        step_checkpoint_path,
    )

    assert latest_checkpoint(tmp_path) is None
    for step in (2, 10, 4):
        _fake_checkpoint(step_checkpoint_path(tmp_path, step))
    root = tmp_path / "checkpoints"
    assert step_checkpoint_path(tmp_path, 10) == root / "step_000010"
    _fake_checkpoint(root / "step_000012.tmp-0a1b2c3d")  # an interrupted save, even with meta.json
    (root / "step_000011").mkdir()  # no meta.json: incomplete
    _fake_checkpoint(root / "notes")
    assert latest_checkpoint(tmp_path) == root / "step_000010"  # numeric, not lexical, order
    assert list_checkpoints(tmp_path) == [root / "step_000002", root / "step_000004", root / "step_000010"]
    deleted = prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in deleted) == ["step_000002", "step_000012.tmp-0a1b2c3d"]
    assert sorted(p.name for p in root.iterdir()) == ["notes", "step_000004", "step_000010", "step_000011"]


def _crash_worker(run_dir: str) -> None:
    """Save step 1, then die (os._exit: no cleanup) after step 2's weights are on disk."""
    from megatron.core import dist_checkpointing

    from trainer import checkpoint, parallel

    torch.set_num_threads(1)
    parallel.init_parallel(seed=SEED)
    model, optimizer, scheduler = build()
    train_step(model, optimizer, scheduler, batch(0))
    checkpoint.save_checkpoint(
        checkpoint.step_checkpoint_path(run_dir, 1), model, optimizer, scheduler, step=1, arch=ARCH
    )
    real_save = dist_checkpointing.save

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        os._exit(17)

    dist_checkpointing.save = save_then_crash
    checkpoint.save_checkpoint(
        checkpoint.step_checkpoint_path(run_dir, 2), model, optimizer, scheduler, step=2, arch=ARCH
    )


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_crash_mid_save_leaves_no_complete_looking_checkpoint(parallel, tmp_path):
    from trainer import checkpoint

    proc = subprocess.run(
        [sys.executable, __file__, "crash", str(tmp_path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 17, proc.stderr[-3000:]
    root = tmp_path / "checkpoints"
    leftovers = [p for p in root.iterdir() if p.name.startswith("step_000002")]
    assert len(leftovers) == 1 and ".tmp-" in leftovers[0].name  # half written, never renamed
    assert (leftovers[0] / "weights").is_dir() and not checkpoint.is_checkpoint(leftovers[0])
    assert checkpoint.latest_checkpoint(tmp_path) == root / "step_000001"
    model, optimizer, scheduler = build(seed=SEED + 1)
    assert checkpoint.load_checkpoint(root / "step_000001", model, optimizer, scheduler).step == 1
    checkpoint.prune_checkpoints(tmp_path, keep_last=5)
    assert [p.name for p in root.iterdir()] == ["step_000001"]


# ---------------------------------------------------------------------------------------------
# Exact resume
# ---------------------------------------------------------------------------------------------


def test_exact_resume_of_model_optimizer_scheduler_and_rng(parallel, tmp_path):
    from trainer import checkpoint
    from trainer.tokenizer import train_bpe

    # Dropout on: the next losses depend on the torch RNG and megatron's tracker state too.
    arch = dataclasses.replace(ARCH, hidden_dropout=0.1, attention_dropout=0.1)
    tokenizer = train_bpe(["some text to train a tokenizer on"] * 3, vocab_size=262)
    model, optimizer, scheduler = build(arch)
    for step in range(2):
        train_step(model, optimizer, scheduler, batch(step))
    path = tmp_path / "ck"
    config = {"name": "sft", "model": {"optim": {"lr": OPTIM.lr}}}
    checkpoint.save_checkpoint(
        path, model, optimizer, scheduler, step=2, config=config, arch=arch, tokenizer=tokenizer,
        consumed_samples=8, extra={"epoch": 0, "data_position": 2},
    )  # fmt: skip
    expected_draws = (random.random(), float(np.random.rand()))
    expected = [train_step(model, optimizer, scheduler, batch(step)) for step in (2, 3)]
    expected_lr = scheduler.get_last_lr()

    parallel.reseed(999)  # a different RNG state and different initial weights
    random.seed(1)
    np.random.seed(1)
    fresh, fresh_opt, fresh_sched = build(arch, seed=SEED + 1)
    meta = checkpoint.load_checkpoint(path, fresh, fresh_opt, fresh_sched)
    assert (meta.step, meta.consumed_samples, meta.extra) == (2, 8, {"epoch": 0, "data_position": 2})
    assert meta.config == config and meta.arch == arch and not meta.has_value_head
    assert (random.random(), float(np.random.rand())) == expected_draws
    resumed = [train_step(fresh, fresh_opt, fresh_sched, batch(step)) for step in (2, 3)]
    assert resumed == expected  # bit-identical
    assert fresh_sched.get_last_lr() == expected_lr
    for a, b in zip(fresh.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)

    assert checkpoint.load_tokenizer(path).encode("some text") == tokenizer.encode("some text")
    assert "name: sft" in (path / "config.yaml").read_text()
    assert checkpoint.read_meta(path).optimizer_state_keys == ["exp_avg", "exp_avg_sq"]


def test_a_save_writes_in_the_saving_thread_without_forking(parallel, tmp_path, monkeypatch):
    """A gRPC server saves its critic while other threads run: a forked writer can deadlock on a
    lock one of them held, so megatron's writer must not fork (nor start a multiprocessing
    manager)."""
    import threading

    from trainer import checkpoint

    def no_fork():
        raise AssertionError("a checkpoint save forked a process")

    monkeypatch.setattr(os, "fork", no_fork)
    model, optimizer, scheduler = build()
    train_step(model, optimizer, scheduler, batch(0))
    busy = threading.Event()
    other = threading.Thread(target=busy.wait, daemon=True)  # another thread, as in a server
    other.start()
    checkpoint.save_checkpoint(tmp_path / "ck", model, optimizer, scheduler, step=1, arch=ARCH)
    busy.set()
    fresh, fresh_opt, fresh_sched = build(seed=SEED + 1)
    assert checkpoint.load_checkpoint(tmp_path / "ck", fresh, fresh_opt, fresh_sched).step == 1
    for a, b in zip(fresh.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    files = sorted(p.name for p in (tmp_path / "ck" / "weights").iterdir() if p.suffix == ".distcp")
    assert len(files) >= 1


def test_resume_before_any_step_and_tied_embeddings(parallel, tmp_path):
    """An optimizer that has not stepped (no state yet) and a tied-embedding model."""
    from trainer import checkpoint

    arch = dataclasses.replace(ARCH, share_embeddings_and_output_weights=True)
    model, optimizer, scheduler = build(arch)
    checkpoint.save_checkpoint(tmp_path / "ck", model, optimizer, scheduler, step=0, arch=arch)
    expected = train_step(model, optimizer, scheduler, batch(0))
    fresh, fresh_opt, fresh_sched = build(arch, seed=SEED + 1)
    checkpoint.load_checkpoint(tmp_path / "ck", fresh, fresh_opt, fresh_sched)
    assert train_step(fresh, fresh_opt, fresh_sched, batch(0)) == expected


def test_resume_with_parameters_that_never_got_a_gradient(parallel, tmp_path):
    """A reward model trained on its value head only: the LM output layer has no Adam state."""
    from trainer import checkpoint

    def rm_step(model, optimizer, tokens):
        model.train()
        loss = model(tokens).values[:, -1].pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    model, optimizer, _ = build(value_head=True)
    rm_step(model, optimizer, batch(0))
    assert not optimizer.state.get(model.gpt.output_layer.weight)
    checkpoint.save_checkpoint(tmp_path / "rm", model, optimizer, step=1, arch=ARCH)
    expected = rm_step(model, optimizer, batch(1))
    fresh, fresh_opt, _ = build(value_head=True, seed=SEED + 1)
    checkpoint.load_checkpoint(tmp_path / "rm", fresh, fresh_opt)
    assert rm_step(fresh, fresh_opt, batch(1)) == expected


# ---------------------------------------------------------------------------------------------
# Value heads, inference loading, errors
# ---------------------------------------------------------------------------------------------


def test_value_head_variants(parallel, tmp_path):
    from trainer import checkpoint
    from trainer.model import build_model

    x = batch(0)
    rm = build_model(ARCH, value_head=True, seed=SEED)
    checkpoint.save_checkpoint(tmp_path / "rm", rm, step=5, arch=ARCH)
    sft = build_model(ARCH, seed=SEED + 3)
    checkpoint.save_checkpoint(tmp_path / "sft", sft, step=3, arch=ARCH)
    rm.eval()
    with torch.no_grad():
        rm_out = rm(x)

    # A critic initialised from the reward model: same trunk and head.
    critic = build_model(ARCH, value_head=True, seed=SEED + 1)
    checkpoint.load_checkpoint(tmp_path / "rm", critic, restore_rng=False)
    critic.eval()
    with torch.no_grad():
        out = critic(x)
    assert torch.equal(out.values, rm_out.values) and torch.equal(out.logits, rm_out.logits)

    # A reward model from an SFT model: the trunk loads, the fresh head stays.
    model = build_model(ARCH, value_head=True, seed=SEED + 2)
    head = model.value_head.weight.detach().clone()
    checkpoint.load_checkpoint(tmp_path / "sft", model, restore_rng=False)
    assert torch.equal(model.value_head.weight, head)
    assert torch.equal(logits_of(model, x), logits_of(sft, x))

    # load_model_for_inference keeps the checkpoint's head unless told otherwise.
    served, arch, tokenizer = checkpoint.load_model_for_inference(tmp_path / "rm")
    assert served.value_head is not None and arch == ARCH and tokenizer is None and not served.training
    with torch.no_grad():
        assert torch.equal(served(x).values, rm_out.values)
    policy, _, _ = checkpoint.load_model_for_inference(tmp_path / "rm", value_head=False)
    assert policy.value_head is None and torch.equal(logits_of(policy, x), rm_out.logits)
    critic, _, _ = checkpoint.load_model_for_inference(tmp_path / "sft", value_head=True)
    assert critic.value_head is not None and torch.equal(logits_of(critic, x), logits_of(sft, x))

    # Resuming an optimizer across a different head is refused.
    model, optimizer, _ = build(value_head=True)
    with pytest.raises(InvalidArgument, match="no optimizer state"):
        checkpoint.load_checkpoint(tmp_path / "rm", model, optimizer)


def test_load_model_for_inference_from_hf_dir_and_run_dir(parallel, tmp_path):
    transformers = pytest.importorskip("transformers")
    from trainer import checkpoint
    from trainer.tokenizer import train_bpe

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
    )  # fmt: skip
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    tokenizer = train_bpe(["hello there general"] * 3, vocab_size=262)
    tokenizer.save(tmp_path / "hf")
    x = batch(1)
    with torch.no_grad():
        expected = hf_model(x).logits

    model, arch, tok = checkpoint.load_model_for_inference(tmp_path / "hf")
    torch.testing.assert_close(logits_of(model, x), expected, atol=1e-4, rtol=1e-4)
    assert tok.encode("hello") == tokenizer.encode("hello") and arch.num_query_groups == 2
    assert checkpoint.checkpoint_arch(tmp_path / "hf") == arch

    # A training run starts from the HF model: load_pretrained into a model built from its arch.
    rm = dataclasses.replace(arch, hidden_dropout=0.0)
    from trainer.model import build_model

    started = build_model(rm, value_head=True, seed=3)
    assert checkpoint.load_pretrained(tmp_path / "hf", started) is None
    torch.testing.assert_close(logits_of(started, x), expected, atol=1e-4, rtol=1e-4)
    checkpoint.save_checkpoint(
        checkpoint.step_checkpoint_path(tmp_path / "run", 4), started, step=4, arch=arch
    )
    # A run directory resolves to its latest checkpoint.
    again, _, _ = checkpoint.load_model_for_inference(tmp_path / "run")
    assert again.value_head is not None
    assert torch.equal(logits_of(again, x), logits_of(started, x))

    wrong = build_model(dataclasses.replace(arch, hidden_size=32, ffn_hidden_size=64), seed=1)
    with pytest.raises(InvalidArgument, match=r"hidden_size 64 != model 32"):
        checkpoint.load_pretrained(tmp_path / "hf", wrong)
    with pytest.raises(InvalidArgument, match=r"ffn_hidden_size 160 != model 64"):
        checkpoint.load_pretrained(tmp_path / "run", wrong)


def test_read_meta_errors(tmp_path):
    from trainer import checkpoint

    with pytest.raises(NotFound, match="does not exist"):
        checkpoint.read_meta(tmp_path / "nope")
    with pytest.raises(NotFound, match="no meta.json"):
        checkpoint.read_meta(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(InvalidArgument, match="format_version 99"):
        checkpoint.read_meta(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFound, match="neither"):
        checkpoint.load_model_for_inference(tmp_path / "empty")


@pytest.mark.skipif(not CUDA, reason="no CUDA device: the GPU checkpoint check needs one")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_save_load_on_cuda(parallel, tmp_path, precision):
    from trainer import checkpoint

    arch = dataclasses.replace(ARCH, precision=precision)
    model, optimizer, scheduler = build(arch)
    assert model.device.type == "cuda"
    train_step(model, optimizer, scheduler, batch(0))
    checkpoint.save_checkpoint(tmp_path / "ck", model, optimizer, scheduler, step=1, arch=arch)
    fresh, fresh_opt, fresh_sched = build(arch, seed=SEED + 1)
    checkpoint.load_checkpoint(tmp_path / "ck", fresh, fresh_opt, fresh_sched)
    assert torch.equal(logits_of(fresh, batch(1)), logits_of(model, batch(1)))


# ---------------------------------------------------------------------------------------------
# Tensor parallel 1 <-> 2
# ---------------------------------------------------------------------------------------------


def _tp2_worker(workdir: str) -> None:
    """Load the TP=1 checkpoint at TP=2 (model + optimizer + scheduler), check its logits, take
    step 2 and save at TP=2; import the HF model at TP=2 and export it back."""
    from trainer import checkpoint, hf, parallel

    torch.set_num_threads(1)
    work = Path(workdir)
    parallel.init_parallel(tensor_model_parallel_size=2, seed=SEED)
    arch = dataclasses.replace(ARCH, tensor_model_parallel_size=2)
    model, optimizer, scheduler = build(arch, seed=SEED + 5)
    meta = checkpoint.load_checkpoint(work / "tp1", model, optimizer, scheduler)
    result = {"step": meta.step, "logits_at_load": logits_of(model, batch(1))}
    result["loss_step2"] = train_step(model, optimizer, scheduler, batch(1))
    checkpoint.save_checkpoint(work / "tp2", model, optimizer, scheduler, step=2, arch=arch)

    served, served_arch, _ = checkpoint.load_model_for_inference(work / "hf")
    result["hf_logits"] = logits_of(served, batch(2))
    result["served_tp"] = served_arch.tensor_model_parallel_size
    hf.export_hf(served, served_arch, None, work / "hf_from_tp2")
    if torch.distributed.get_rank() == 0:
        torch.save(result, work / "tp2_result.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_checkpoints_reshard_between_tp1_and_tp2(parallel, tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from trainer import checkpoint

    # TP=1: one step, save; the reference continues in-process.
    model, optimizer, scheduler = build()
    train_step(model, optimizer, scheduler, batch(0))
    checkpoint.save_checkpoint(tmp_path / "tp1", model, optimizer, scheduler, step=1, arch=ARCH)
    logits_at_save = logits_of(model, batch(1))
    loss_step2 = train_step(model, optimizer, scheduler, batch(1))
    loss_step3 = train_step(model, optimizer, scheduler, batch(2))
    logits_after_3 = logits_of(model, batch(3))

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
    )  # fmt: skip
    torch.manual_seed(1)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        hf_logits = hf_model(batch(2)).logits

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, "tp2", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stderr[-4000:]
    tp2 = torch.load(tmp_path / "tp2_result.pt")

    # TP splits the reductions: equal up to float rounding (the worker is on CPU; with CUDA
    # the in-process reference is on the GPU, whose fp32 kernels round differently).
    tol = dict(atol=1e-4, rtol=1e-4) if CUDA else dict(atol=1e-5, rtol=1e-5)
    assert tp2["step"] == 1 and tp2["served_tp"] == 2
    torch.testing.assert_close(tp2["logits_at_load"], logits_at_save, **tol)
    assert tp2["loss_step2"] == pytest.approx(loss_step2, abs=tol["atol"])
    torch.testing.assert_close(tp2["hf_logits"], hf_logits, atol=1e-4, rtol=1e-4)
    exported = load_file(tmp_path / "hf_from_tp2" / "model.safetensors")
    for name, tensor in hf_model.state_dict().items():
        assert torch.equal(exported[name], tensor), name

    # Back at TP=1: the TP=2 checkpoint (model + optimizer + scheduler) continues like the reference.
    fresh, fresh_opt, fresh_sched = build(seed=SEED + 6)
    assert checkpoint.load_checkpoint(tmp_path / "tp2", fresh, fresh_opt, fresh_sched).step == 2
    assert train_step(fresh, fresh_opt, fresh_sched, batch(2)) == pytest.approx(loss_step3, abs=tol["atol"])
    torch.testing.assert_close(logits_of(fresh, batch(3)), logits_after_3, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# aligner convert
# ---------------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_convert_cli_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    from trainer.tokenizer import train_bpe

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(2)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    tokenizer = train_bpe(["round trip text for the cli"] * 3, vocab_size=262)
    tokenizer.save(tmp_path / "hf")

    aligner = [sys.executable, "-m", "services.cli", "convert"]
    for args in (["import-hf", "hf", "ck"], ["export-hf", "ck", "out"]):
        proc = subprocess.run(
            aligner + args, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=280
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip() == f"wrote {args[2]}"
    assert (tmp_path / "ck" / "tokenizer" / "tokenizer.json").is_file()

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = batch(0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, hf_model(x).logits, atol=1e-4, rtol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf_tok("round trip", add_special_tokens=False)["input_ids"] == tokenizer.encode("round trip")


def test_convert_cli_bad_paths(tmp_path, capsys):
    from services.cli import main

    (tmp_path / "exists").mkdir()
    cases = [
        (["import-hf", str(tmp_path / "missing"), str(tmp_path / "x")], "missing: no such file"),
        (["import-hf", str(tmp_path / "exists"), str(tmp_path / "x")], "config.json: no such file"),
        (["export-hf", str(tmp_path / "exists"), str(tmp_path / "y")], "neither one of our checkpoints"),
        (["export-hf", str(tmp_path / "exists"), str(tmp_path / "exists")], "already exists"),
    ]
    for argv, message in cases:
        assert main(["convert", *argv]) == 2
        # (library import warnings may come first; the error itself is one line, the last)
        lines = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in lines if "error" in line]
        assert errors == [lines[-1]] and lines[-1].startswith("aligner convert: error:"), lines[-3:]
        assert message in lines[-1], lines[-1]


if __name__ == "__main__":
    {"crash": _crash_worker, "tp2": _tp2_worker}[sys.argv[1]](sys.argv[2])
