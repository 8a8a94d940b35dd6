"""Parallel setup: single-process init, and tensor parallel 2 in two real processes (torchrun on
gloo) giving the same logits, logprobs, values and gradients as tensor parallel 1.

This file is also the TP worker: `torchrun ... test_parallel.py OUT.pt` runs `_worker`."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.config import ModelArchConfig
from common.errors import InvalidArgument

ARCH = ModelArchConfig(
    num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
    vocab_size=256, encoder_seq_length=64, hidden_dropout=0.0, attention_dropout=0.0,
)  # fmt: skip
SEED = 11
LENGTHS = [7, 3, 12, 5]


def _run(tp: int) -> dict:
    """Build the seeded TP-`tp` model and compute what the test compares (gathered full tensors)."""
    from megatron.core import parallel_state

    from trainer import model as M

    arch = dataclasses.replace(ARCH, tensor_model_parallel_size=tp)
    model = M.build_model(arch, value_head=True, seed=SEED)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, arch.vocab_size, (n,), generator=g) for n in LENGTHS]
    result = {
        "logprobs": M.sequence_logprobs(model, seqs, micro_batch_size=3),
        "values": M.sequence_values(model, seqs, micro_batch_size=3),
        "rewards": M.sequence_rewards(model, seqs, micro_batch_size=3),
    }
    from trainer.losses import token_logprobs

    tokens, _ = M.pad_batch(seqs, pad_id=0)
    out = model(tokens.to(model.device))
    loss = -token_logprobs(out.logits, tokens).mean() + out.values.pow(2).mean()
    loss.backward()
    result["loss"] = loss.detach()
    # Replicated parameters get the full gradient on every rank; compare those, and the
    # embedding gradient gathered across the vocab-parallel shards.
    result["grad_final_norm"] = model.gpt.decoder.final_layernorm.weight.grad.clone()
    result["grad_value_head"] = model.value_head.weight.grad.clone()
    emb_grad = model.gpt.embedding.word_embeddings.weight.grad
    if tp > 1:
        parts = [torch.empty_like(emb_grad) for _ in range(tp)]
        torch.distributed.all_gather(parts, emb_grad, group=parallel_state.get_tensor_model_parallel_group())
        emb_grad = torch.cat(parts)
    result["grad_embedding"] = emb_grad.clone()
    return result


def _worker(out_path: str) -> None:
    torch.set_num_threads(1)
    from trainer import parallel

    parallel.init_parallel(tensor_model_parallel_size=2, seed=SEED)
    assert parallel.tp_world_size() == 2
    result = _run(tp=2)
    if torch.distributed.get_rank() == 0:
        torch.save(result, out_path)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_init_parallel_is_idempotent_and_checks_sizes():
    from megatron.core import parallel_state

    from trainer import parallel

    parallel.init_parallel()
    group = parallel_state.get_tensor_model_parallel_group()
    parallel.init_parallel()
    assert parallel_state.get_tensor_model_parallel_group() is group
    assert torch.distributed.get_backend() == ("nccl" if torch.cuda.is_available() else "gloo")
    assert parallel.device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert parallel.tp_rank() == 0 and parallel.tp_world_size() == 1
    with pytest.raises(InvalidArgument, match="tensor_model_parallel_size"):
        parallel.init_parallel(tensor_model_parallel_size=2)
    with pytest.raises(InvalidArgument, match="pipeline_model_parallel_size"):
        parallel.init_parallel(pipeline_model_parallel_size=3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shim only applies without CUDA")
def test_cpu_shim_rng_tracker_forks_a_separate_stream():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from trainer import parallel

    parallel.init_parallel()
    parallel.reseed(5)
    tracker = get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is untouched
    with tracker.fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the forked stream advances
    parallel.reseed(5)
    with tracker.fork():
        assert torch.equal(torch.rand(3), a)  # and is reproducible from the seed


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shim only applies without CUDA")
def test_cpu_shim_megatron_optimizer_clips_gradients():
    # Megatron's optimizer creates 'cuda' scalars and asserts CUDA grads when clipping; with the
    # shim it runs on CPU. SGD (lr 1) makes the applied update equal the clipped gradient.
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from trainer import model as M
    from trainer import parallel

    parallel.init_parallel()
    model = M.build_model(ARCH, seed=3)
    ddp = DistributedDataParallel(
        config=model.gpt.config, ddp_config=DistributedDataParallelConfig(), module=model.gpt
    )
    clip = 0.01
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="sgd", lr=1.0, sgd_momentum=0.0, weight_decay=0.0, clip_grad=clip), [ddp]
    )
    before = [p.detach().clone() for p in model.gpt.parameters()]
    tokens = torch.randint(0, ARCH.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    ddp(input_ids=tokens, position_ids=None, attention_mask=None, labels=tokens).mean().backward()
    ddp.finish_grad_sync()
    expected_norm = torch.cat([p.main_grad.flatten() for p in model.gpt.parameters()]).norm().item()
    ok, grad_norm, _ = opt.step()
    assert ok and grad_norm == pytest.approx(expected_norm, rel=1e-5)
    assert expected_norm > 10 * clip  # so clipping had to act
    update = torch.cat(
        [(b - p.detach()).flatten() for b, p in zip(before, model.gpt.parameters(), strict=True)]
    )
    assert update.norm().item() == pytest.approx(clip, rel=1e-4)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_tensor_parallel_2_matches_tp_1(tmp_path: Path):
    out = tmp_path / "tp2.pt"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "CUDA_VISIBLE_DEVICES": "",  # two processes on one machine: gloo on CPU
    }
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        __file__, str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    tp2 = torch.load(out)

    from trainer import parallel

    parallel.init_parallel(seed=SEED)
    if torch.cuda.is_available():
        pytest.skip("TP=2 ran on CPU; the in-process TP=1 reference would run on CUDA")
    tp1 = _run(tp=1)
    for key in ("logprobs", "values"):
        for a, b in zip(tp2[key], tp1[key], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=key)
    for key in ("rewards", "loss", "grad_final_norm", "grad_value_head", "grad_embedding"):
        torch.testing.assert_close(tp2[key], tp1[key], atol=1e-5, rtol=1e-5, msg=key)


if __name__ == "__main__":
    _worker(sys.argv[1])
