"""Shared setup of the side-by-side benchmarks: thread pinning, the tiny Llama, the same weights in
our Megatron model and in `transformers`, and a timer that interleaves the two contenders."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch

from common.config import ModelArchConfig

# The tiny Llama of the benchmarks: 2 layers, hidden 128, vocab 512 (GQA: 4 heads, 2 KV groups).
ARCH = ModelArchConfig(
    num_layers=2,
    hidden_size=128,
    ffn_hidden_size=384,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=512,
    encoder_seq_length=256,
)


def threads() -> int:
    """Torch threads for both contenders (BENCH_THREADS, default 1: two cores are shared)."""
    n = int(os.environ.get("BENCH_THREADS", "1"))
    torch.set_num_threads(n)
    return n


def same_weights_models(arch: ModelArchConfig = ARCH, seed: int = 0):
    """(our AlignerGPT, transformers LlamaForCausalLM, max |logit difference|) holding the same
    weights: a random `LlamaForCausalLM` imported with `trainer.hf.hf_to_megatron`."""
    import transformers

    from trainer import hf, parallel
    from trainer.model import build_model

    parallel.init_parallel()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**hf.hf_config_from_arch(arch))
    theirs = transformers.LlamaForCausalLM(config).eval()
    ours = build_model(arch, seed=seed).eval()
    hf.load_full_state_dict(ours, hf.hf_to_megatron(theirs.state_dict(), arch))
    probe = torch.randint(0, arch.vocab_size, (2, 32), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        diff = (ours(probe).logits - theirs(probe).logits).abs().max().item()
    return ours, theirs, diff


def interleaved(contenders: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each contender, run in turn (after one warm-up each), so that load from
    other processes on the shared cores hits all of them alike."""
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
