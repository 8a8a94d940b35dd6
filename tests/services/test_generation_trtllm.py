"""The TensorRT-LLM engine: its capability check everywhere; on a GPU machine with TensorRT-LLM
installed, greedy generation and refits compared with the torch engine on the same weights."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from common.config import ModelArchConfig
from common.errors import Unavailable
from services.generation import trtllm_engine

HAVE_TRTLLM = torch.cuda.is_available() and importlib.util.find_spec("tensorrt_llm") is not None


@pytest.mark.skipif(HAVE_TRTLLM, reason="TensorRT-LLM is available here")
def test_capability_check_says_why_it_is_unavailable():
    with pytest.raises(Unavailable) as info:
        trtllm_engine.check_available()
    message = str(info.value)
    assert message.startswith("TensorRT-LLM engine unavailable: ")
    if not torch.cuda.is_available():
        assert "no CUDA device (torch.cuda.is_available() is False)" in message
    if importlib.util.find_spec("tensorrt_llm") is None:
        assert "package tensorrt_llm is not installed (pip install aligner[trtllm] on a GPU image)" in message
    # Constructing the engine runs the same check first: no silent fallback.
    with pytest.raises(Unavailable, match="TensorRT-LLM engine unavailable"):
        trtllm_engine.TrtLlmEngine(torch.nn.Linear(2, 2), ModelArchConfig())


@pytest.mark.parametrize(
    "seq_len, max_new, end_id, expected",
    [
        (7, 4, None, ([10, 11, 12, 13], False)),  # ran to max_new_tokens
        (7, 2, None, ([10, 11], False)),  # a shorter request in a longer batch
        (6, 4, 12, ([10, 11, 12], True)),  # the end token counted in the sequence length
        (5, 4, 12, ([10, 11, 12], True)),  # ... or not: it is taken from the ids
        (5, 4, 99, ([10, 11], False)),  # stopped early without the end id at the next position
    ],
)
def test_row_result_follows_our_conventions(seq_len, max_new, end_id, expected):
    ids = [1, 2, 3, 10, 11, 12, 13, 0]
    logprobs = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, 0.0]
    tokens, lps, ended = trtllm_engine.row_result(ids, logprobs, seq_len, 3, max_new, end_id)
    assert (tokens, ended) == expected
    assert lps == [-1.0, -2.0, -3.0, -4.0][: len(tokens)]


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRTLLM, reason="needs CUDA and tensorrt_llm")
def test_greedy_generation_and_refit_match_the_torch_engine(tmp_path):
    from trainer import parallel
    from trainer.engine import SamplingParams, TorchEngine
    from trainer.model import build_model

    parallel.init_parallel(seed=1234)
    arch = ModelArchConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
        vocab_size=320, encoder_seq_length=48,
    )  # fmt: skip
    torch_model = build_model(arch, seed=3)
    reference = TorchEngine(torch_model, max_seq_len=arch.encoder_seq_length)
    engine = trtllm_engine.TrtLlmEngine(
        build_model(arch, seed=3), arch, max_batch_size=8, dtype="float32", work_dir=tmp_path
    )
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    params = [SamplingParams(max_new_tokens=8, greedy=True) for _ in prompts]
    assert [r.tokens for r in engine.generate(prompts, params)] == [
        r.tokens for r in reference.generate(prompts, params)
    ]

    g = torch.Generator().manual_seed(1)
    new = {
        k: v + 0.05 * torch.randn(v.shape, generator=g).to(v.device)
        for k, v in torch_model.state_dict().items()
        if isinstance(v, torch.Tensor)
    }
    engine.load_state_dict(new)
    reference.load_state_dict(new)
    assert [r.tokens for r in engine.generate(prompts, params)] == [
        r.tokens for r in reference.generate(prompts, params)
    ]
    streamed: dict[int, list[int]] = {}

    def on_step(step, tokens):
        for i, t in enumerate(tokens):
            if t is not None:
                streamed.setdefault(i, []).append(t)

    engine.generate(prompts, params, on_step=on_step)
    assert [streamed[i] for i in range(len(prompts))] == [
        r.tokens for r in reference.generate(prompts, params)
    ]
    engine.close()
