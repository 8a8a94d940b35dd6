"""The KV-cached sampling engine against full recomputation, one-prompt-at-a-time runs and its
own contract (seeds, top-k/top-p, min/max length, end id, logprobs, in-place weight loads), and
at tensor parallel 2 (two processes) against tensor parallel 1.
Runs on the process's device (`trainer.parallel.device()`: CUDA when present, else CPU), in fp32
and bf16; the CUDA-only checks are skipped without a GPU."""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from common.config import ModelArchConfig
from common.errors import InvalidArgument
from trainer import sampling

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")

ARCH = ModelArchConfig(
    num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
    vocab_size=256, encoder_seq_length=64,
)  # fmt: skip
PROMPTS = [[5, 17, 33, 2, 9, 100, 41], [7, 8], [200, 3, 3, 3, 14], [1]]


@pytest.fixture(scope="module")
def mp():
    from trainer import model, parallel

    parallel.init_parallel(seed=1234)
    return model


@pytest.fixture(scope="module")
def model(mp):
    return mp.build_model(ARCH, seed=7)


@pytest.fixture(scope="module", params=["megatron", "fused"])
def engine(model, request):
    """Both decode paths meet the whole contract."""
    from trainer.engine import TorchEngine

    return TorchEngine(model, max_seq_len=ARCH.encoder_seq_length, decode=request.param)


def params(**kw):
    from trainer.engine import SamplingParams

    return SamplingParams(**{"max_new_tokens": 10, **kw})


def greedy(**kw):
    return params(greedy=True, **kw)


def full_forward_greedy(model, prompt, n):
    """The reference: recompute the whole sequence for every new token (no KV cache)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq], device=model.device)).logits
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt) :]


def full_forward_logprobs(model, prompt, tokens):
    """log p(tokens[t] | prompt + tokens[:t]) from one uncached forward pass."""
    from trainer.losses import token_logprobs

    seq = torch.tensor([prompt + tokens], device=model.device)
    with torch.no_grad():
        logp = token_logprobs(model(seq).logits, seq)[0]
    return logp[len(prompt) - 1 :].cpu()


# ---------------------------------------------------------------------------------------------
# Correctness of the cached, batched loop
# ---------------------------------------------------------------------------------------------


def test_cached_greedy_equals_full_recompute(engine, model):
    results = engine.generate(PROMPTS, [greedy()] * len(PROMPTS))
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.tokens == full_forward_greedy(model, prompt, 10)
        assert not result.ended and len(result.tokens) == 10


def test_batched_greedy_equals_one_at_a_time(engine):
    # Different prompt lengths and different max_new_tokens (rows leave the batch at different steps).
    ps = [greedy(max_new_tokens=n) for n in (12, 3, 8, 1)]
    batched = engine.generate(PROMPTS, ps)
    for prompt, p, result in zip(PROMPTS, ps, batched, strict=True):
        alone = engine.generate([prompt], [p])[0]
        assert result.tokens == alone.tokens
        assert len(result.tokens) == p.max_new_tokens
        torch.testing.assert_close(
            torch.tensor(result.logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0
        )


def test_batch_may_span_more_slots_than_max_seq_len(engine):
    # 50 + 10 and 2 + 60 tokens each fit max_seq_len 64; together they need 50 + 60 - 1 cache slots.
    long_prompt = [(7 * i) % ARCH.vocab_size for i in range(50)]
    prompts, ps = [long_prompt, [3, 4]], [greedy(max_new_tokens=10), greedy(max_new_tokens=60)]
    batched = engine.generate(prompts, ps)
    for prompt, p, result in zip(prompts, ps, batched, strict=True):
        assert result.tokens == engine.generate([prompt], [p])[0].tokens


def test_logprobs_match_full_forward(engine, model):
    ps = [params(seed=i, temperature=0.7, top_k=40) for i in range(len(PROMPTS))]
    for prompt, result in zip(PROMPTS, engine.generate(PROMPTS, ps), strict=True):
        expected = full_forward_logprobs(model, prompt, result.tokens)
        torch.testing.assert_close(torch.tensor(result.logprobs), expected, atol=1e-5, rtol=0)


def test_on_step_streams_every_token(engine):
    seen: list[tuple[int, list]] = []
    results = engine.generate(
        PROMPTS[:2],
        [greedy(max_new_tokens=4), greedy(max_new_tokens=2)],
        on_step=lambda s, t: seen.append((s, t)),
    )
    assert [s for s, _ in seen] == [0, 1, 2, 3]
    assert [t[0] for _, t in seen] == results[0].tokens
    assert [t[1] for _, t in seen] == results[1].tokens + [None, None]


@pytest.mark.parametrize(
    "change",
    [{}, dict(num_query_groups=4), dict(num_query_groups=1), dict(share_embeddings_and_output_weights=True)],
    ids=["gqa", "mha", "mqa", "tied"],
)
def test_fused_decode_equals_megatron_decode(mp, change):
    from trainer.engine import TorchEngine

    model = mp.build_model(dataclasses.replace(ARCH, **change), seed=5)
    ps = [greedy(max_new_tokens=n) for n in (12, 5, 9, 12)]
    megatron = TorchEngine(model, max_seq_len=64).generate(PROMPTS, ps)
    fused = TorchEngine(model, max_seq_len=64, decode="fused").generate(PROMPTS, ps)
    for a, b in zip(megatron, fused, strict=True):
        assert a.tokens == b.tokens
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_decode_mode_is_checked(model):
    from trainer import fused_decode
    from trainer.engine import TorchEngine

    assert fused_decode.unsupported(model.gpt) is None
    with pytest.raises(InvalidArgument) as err:
        TorchEngine(model, max_seq_len=64, decode="turbo")
    assert err.value.field == "decode"


# ---------------------------------------------------------------------------------------------
# Sampling parameters
# ---------------------------------------------------------------------------------------------


def test_same_seed_same_sample_regardless_of_batch(engine):
    a, b, c = PROMPTS[0], PROMPTS[1], PROMPTS[2]
    first = engine.generate([a, b], [params(seed=11), params(seed=12)])
    second = engine.generate([c, a, b], [params(seed=13), params(seed=11), params(seed=99)])
    assert first[0].tokens == second[1].tokens
    assert first[1].tokens != second[2].tokens  # same prompt, another seed
    assert first[0].tokens != engine.generate([a], [params(seed=12)])[0].tokens


def test_unseeded_requests_differ(engine):
    runs = [engine.generate([PROMPTS[0]], [params()])[0].tokens for _ in range(2)]
    assert runs[0] != runs[1]


@pytest.mark.parametrize(
    "kw",
    [dict(top_k=1), dict(top_p=1e-6), dict(temperature=0.0)],
    ids=["top_k=1", "tiny top_p", "temperature=0"],
)
def test_degenerate_sampling_is_greedy(engine, kw):
    expected = engine.generate(PROMPTS, [greedy()] * len(PROMPTS))
    got = engine.generate(PROMPTS, [params(seed=i, **kw) for i in range(len(PROMPTS))])
    assert [r.tokens for r in got] == [r.tokens for r in expected]


def test_end_id_stops_a_row(engine):
    free = engine.generate([PROMPTS[0]], [greedy()])[0].tokens
    end = free[3]
    stop_at = free.index(end)  # the first occurrence
    out = engine.generate([PROMPTS[0], PROMPTS[1]], [greedy(end_id=end), greedy()])
    assert out[0].tokens == free[: stop_at + 1] and out[0].ended
    assert len(out[1].tokens) == 10 and not out[1].ended


def test_min_new_tokens_masks_the_end_id(engine):
    free = engine.generate([PROMPTS[2]], [greedy()])[0].tokens
    end = free[0]  # greedy would end at once
    assert engine.generate([PROMPTS[2]], [greedy(end_id=end)])[0].tokens == [end]
    out = engine.generate([PROMPTS[2]], [greedy(end_id=end, min_new_tokens=4)])[0]
    assert len(out.tokens) >= 4 and end not in out.tokens[:4]
    assert out.tokens[-1] == end if out.ended else len(out.tokens) == 10


def test_every_row_ended_stops_early(engine):
    free = engine.generate(PROMPTS[:2], [greedy(), greedy()])
    steps = []
    out = engine.generate(
        PROMPTS[:2],
        [
            greedy(max_new_tokens=30, end_id=free[0].tokens[1]),
            greedy(max_new_tokens=30, end_id=free[1].tokens[2]),
        ],
        on_step=lambda s, t: steps.append(s),
    )
    assert all(r.ended for r in out)
    assert len(steps) == max(len(r.tokens) for r in out) <= 3


# ---------------------------------------------------------------------------------------------
# Pure sampling functions
# ---------------------------------------------------------------------------------------------


def test_process_logits_top_k_and_top_p_keep_the_right_tokens():
    probs = torch.tensor(
        [[0.5, 0.25, 0.15, 0.1], [0.5, 0.25, 0.15, 0.1], [0.1, 0.6, 0.05, 0.25], [0.1, 0.6, 0.05, 0.25]]
    )
    out = sampling.process_logits(
        probs.log(),
        temperature=torch.ones(4),
        top_k=torch.tensor([2, 0, 0, 3]),
        top_p=torch.tensor([1.0, 0.6, 0.8, 0.65]),
    )
    kept = torch.isfinite(out).tolist()
    assert kept[0] == [True, True, False, False]  # top-2
    assert kept[1] == [True, True, False, False]  # 0.5 < 0.6 <= 0.5 + 0.25
    assert kept[2] == [False, True, False, True]  # 0.6 < 0.8 <= 0.6 + 0.25
    assert kept[3] == [False, True, False, True]  # top-3 then top-p 0.65 of the renormalised rest
    # The kept tokens are renormalised, in proportion to the model's probabilities.
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(4))
    torch.testing.assert_close(out[0, :2].exp(), torch.tensor([0.5, 0.25]) / 0.75)


def test_process_logits_top_k_shortcut_equals_full_sort():
    # All filtering rows have a top-k: the top-k-candidates path; an unfiltered row keeps every token.
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    temperature = torch.tensor([0.7, 1.0, 1.3])
    fast = sampling.process_logits(
        logits, temperature, torch.tensor([5, 8, 0]), torch.tensor([1.0, 0.5, 1.0])
    )
    # The same rows next to a top-p-only row take the full-sort path.
    slow = sampling.process_logits(
        torch.cat([logits, logits[:1]]),
        torch.cat([temperature, torch.ones(1)]),
        torch.tensor([5, 8, 0, 0]),
        torch.tensor([1.0, 0.5, 1.0, 0.9]),
    )[:3]
    torch.testing.assert_close(fast, slow)
    assert torch.isfinite(fast).sum(-1).tolist()[0] == 5 and torch.isfinite(fast[2]).all()
    torch.testing.assert_close(fast[2], torch.log_softmax(logits[2] / 1.3, -1))


def test_sample_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.0, 0.15, 0.05])
    n = 4000
    uniforms = sampling.draw_uniforms(torch.Generator().manual_seed(0), n, "cpu")
    tokens = sampling.sample(probs.log().expand(n, -1), uniforms, torch.zeros(n, dtype=torch.bool))
    freq = torch.bincount(tokens, minlength=5).float() / n
    assert freq[2] == 0  # a zero-probability token is never drawn
    # 4 standard errors of a binomial proportion at n = 4000.
    assert (freq - probs).abs().max() < 4 * math.sqrt(0.25 / n)


def test_sample_edges_of_the_unit_interval():
    logprobs = torch.tensor([[0.0, 0.5, 0.5, 0.0]]).log().expand(3, -1)
    below_one = torch.tensor([0.0, 0.5, 1.0 - 2**-24])
    assert sampling.sample(logprobs, below_one, torch.zeros(3, dtype=torch.bool)).tolist() == [1, 2, 2]
    greedy = sampling.sample(torch.tensor([[-3.0, -0.1, -2.0]]), torch.tensor([0.0]), torch.tensor([True]))
    assert greedy.tolist() == [1]


def test_temperature_sharpens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    cold = sampling.process_logits(logits, torch.tensor([0.5]), torch.tensor([0]), torch.tensor([1.0]))
    torch.testing.assert_close(cold, torch.log_softmax(logits / 0.5, -1))


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def test_load_state_dict_in_place(mp):
    from trainer.engine import TorchEngine

    model = mp.build_model(ARCH, seed=7)
    engine = TorchEngine(model, max_seq_len=64)
    before = engine.generate(PROMPTS, [greedy()] * 4)
    original = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    ptrs = {k: p.data_ptr() for k, p in model.named_parameters()}
    other = mp.build_model(ARCH, seed=8).state_dict()

    engine.load_state_dict(other, policy_version=5)
    after = engine.generate(PROMPTS, [greedy()] * 4)
    assert [r.tokens for r in after] != [r.tokens for r in before]
    assert {k: p.data_ptr() for k, p in model.named_parameters()} == ptrs
    assert engine.policy_version == 5 and after[0].policy_version == 5

    engine.load_state_dict(original)
    assert [r.tokens for r in engine.generate(PROMPTS, [greedy()] * 4)] == [r.tokens for r in before]


def test_bad_state_dict_leaves_weights_intact(engine, model):
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    good = dict(before)
    wrong_shape = {**good, "gpt.decoder.final_layernorm.weight": torch.ones(3)}
    with pytest.raises(InvalidArgument, match="final_layernorm"):
        engine.load_state_dict(
            {
                **wrong_shape,
                "gpt.embedding.word_embeddings.weight": good["gpt.embedding.word_embeddings.weight"] + 1,
            }
        )
    with pytest.raises(InvalidArgument, match="missing keys"):
        engine.load_state_dict({k: v + 1 for k, v in list(good.items())[1:]})
    with pytest.raises(InvalidArgument, match="unexpected keys"):
        engine.load_state_dict({**good, "gpt.nonsense": torch.zeros(1)})
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k


def test_load_waits_for_a_running_generation(mp):
    from trainer.engine import TorchEngine

    model = mp.build_model(ARCH, seed=7)
    engine = TorchEngine(model, max_seq_len=64)
    old = engine.generate([PROMPTS[0]], [greedy()])[0].tokens
    new_weights = mp.build_model(ARCH, seed=8).state_dict()

    in_step, release = threading.Event(), threading.Event()

    def pause_at_step_2(step, tokens):
        if step == 2:
            in_step.set()
            assert release.wait(10)

    out = {}
    gen = threading.Thread(
        target=lambda: out.update(r=engine.generate([PROMPTS[0]], [greedy()], on_step=pause_at_step_2))
    )
    gen.start()
    assert in_step.wait(10)
    loader = threading.Thread(target=engine.load_state_dict, args=(new_weights,))
    loader.start()
    loader.join(0.3)
    assert loader.is_alive()  # blocked: the generation holds the lock
    release.set()
    gen.join(10)
    loader.join(10)
    assert out["r"][0].tokens == old  # every step used the old weights
    assert engine.generate([PROMPTS[0]], [greedy()])[0].tokens != old


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompts, kw, field",
    [
        ([[]], {}, "prompts[0]"),
        ([[1, 999]], {}, "prompts[0]"),
        ([[1]], dict(max_new_tokens=0), "params[0].max_new_tokens"),
        ([[1]], dict(max_new_tokens=64), "params[0].max_new_tokens"),
        ([[1]], dict(min_new_tokens=11), "params[0].min_new_tokens"),
        ([[1]], dict(temperature=-1.0), "params[0].temperature"),
        ([[1]], dict(top_k=-2), "params[0].top_k"),
        ([[1]], dict(top_p=0.0), "params[0].top_p"),
        ([[1]], dict(end_id=256), "params[0].end_id"),
    ],
)
def test_bad_requests_name_the_field(engine, prompts, kw, field):
    with pytest.raises(InvalidArgument) as err:
        engine.generate(prompts, [params(**kw)])
    assert err.value.field == field


def test_prompt_and_params_counts_must_match(engine):
    with pytest.raises(InvalidArgument, match="params"):
        engine.generate([[1], [2]], [params()])


# ---------------------------------------------------------------------------------------------
# bf16 (on the process's device) and CUDA
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decode", ["megatron", "fused"])
def test_bf16_engine_runs_and_matches_its_full_forward(mp, decode):
    from trainer.engine import TorchEngine

    model = mp.build_model(dataclasses.replace(ARCH, precision="bf16"), seed=7)
    engine = TorchEngine(model, max_seq_len=64, decode=decode)
    results = engine.generate(PROMPTS, [params(seed=i) for i in range(len(PROMPTS))])
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert len(result.tokens) == 10
        expected = full_forward_logprobs(model, prompt, result.tokens)
        torch.testing.assert_close(torch.tensor(result.logprobs), expected, atol=5e-2, rtol=0)


@needs_cuda
def test_cuda_seeded_sampling_is_reproducible(engine):
    assert engine.device.type == "cuda"
    ps = [params(seed=3), params(seed=4)]
    assert [r.tokens for r in engine.generate(PROMPTS[:2], ps)] == [
        r.tokens for r in engine.generate(PROMPTS[:2], ps)
    ]


# ---------------------------------------------------------------------------------------------
# Tensor parallel 2 (this file is also the torchrun worker)
# ---------------------------------------------------------------------------------------------

TP_PARAMS = dict(max_new_tokens=8, temperature=0.8, top_k=50, top_p=0.9)


def _tp_generate(tp: int) -> dict:
    from trainer.engine import SamplingParams, TorchEngine
    from trainer.model import build_model

    model = build_model(dataclasses.replace(ARCH, tensor_model_parallel_size=tp), seed=7)
    engine = TorchEngine(model, max_seq_len=ARCH.encoder_seq_length)
    greedy_out = engine.generate(PROMPTS, [SamplingParams(max_new_tokens=8, greedy=True)] * len(PROMPTS))
    sampled = engine.generate(PROMPTS, [SamplingParams(seed=i, **TP_PARAMS) for i in range(len(PROMPTS))])
    return {"greedy": [(r.tokens, r.logprobs) for r in greedy_out], "sampled": [r.tokens for r in sampled]}


def _tp_worker(out_path: str) -> None:
    torch.set_num_threads(1)
    from trainer import parallel
    from trainer.engine import TorchEngine
    from trainer.model import build_model

    parallel.init_parallel(tensor_model_parallel_size=2, seed=1234)
    result = _tp_generate(tp=2)
    with pytest.raises(InvalidArgument, match="tensor parallel"):
        TorchEngine(build_model(dataclasses.replace(ARCH, tensor_model_parallel_size=2)), 64, decode="fused")
    if torch.distributed.get_rank() == 0:
        torch.save(result, out_path)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_tensor_parallel_2_generates_what_tp_1_does(mp, tmp_path):
    if CUDA:
        pytest.skip("TP=2 runs on CPU (gloo); the in-process TP=1 reference would run on CUDA")
    out = tmp_path / "tp2.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        __file__, str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    tp2, tp1 = torch.load(out), _tp_generate(tp=1)
    for (tokens2, logprobs2), (tokens1, logprobs1) in zip(tp2["greedy"], tp1["greedy"], strict=True):
        assert tokens2 == tokens1
        torch.testing.assert_close(torch.tensor(logprobs2), torch.tensor(logprobs1), atol=1e-5, rtol=0)
    assert tp2["sampled"] == tp1["sampled"]


if __name__ == "__main__":
    _tp_worker(sys.argv[1])
