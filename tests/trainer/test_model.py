"""The Llama-style Megatron model: shapes, parameter count against transformers, GQA, tied and
untied embeddings, the value head, padding safety of the ragged passes. Runs on the device of the
process (`trainer.parallel.device()`): CUDA when present (plus bf16), else CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from common.config import ModelArchConfig
from common.errors import InvalidArgument

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")

ARCH = ModelArchConfig(
    num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
    vocab_size=256, encoder_seq_length=64, rotary_base=10000.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def mp():
    from trainer import model, parallel

    parallel.init_parallel(seed=1234)
    return model


# (device, precision). Megatron builds on the GPU whenever CUDA is present, so a process tests
# either the CPU cases or the CUDA ones.
CASES = [
    pytest.param(
        ("cpu", "fp32"), marks=pytest.mark.skipif(CUDA, reason="CUDA present: the model runs on CUDA")
    ),
    pytest.param(
        ("cpu", "bf16"), marks=pytest.mark.skipif(CUDA, reason="CUDA present: the model runs on CUDA")
    ),
    pytest.param(("cuda", "fp32"), marks=needs_cuda),
    pytest.param(("cuda", "bf16"), marks=needs_cuda),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "-".join(c))
def case(request):
    return request.param


@pytest.fixture(scope="module")
def precision(case):
    return case[1]


@pytest.fixture(scope="module")
def critic(mp, precision):
    """One value-head model per precision, reused by every test in this module."""
    return mp.build_model(dataclasses.replace(ARCH, precision=precision), value_head=True, seed=3)


def _tol(precision):
    return dict(atol=1e-5, rtol=1e-5) if precision == "fp32" else dict(atol=3e-2, rtol=3e-2)


def _ragged(lengths, vocab=ARCH.vocab_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def _hf_param_count(arch: ModelArchConfig) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.ffn_hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups,
        max_position_embeddings=arch.encoder_seq_length,
        rms_norm_eps=arch.norm_epsilon,
        rope_theta=arch.rotary_base,
        tie_word_embeddings=arch.share_embeddings_and_output_weights,
        attention_bias=False,
        mlp_bias=False,
    )
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    return sum(p.numel() for p in hf.parameters())


def _count(model) -> int:
    return sum(p.numel() for p in model.gpt.parameters())  # parameters() counts a tied weight once


def test_forward_shapes_and_device(critic, case):
    from trainer import parallel

    device, precision = case
    assert parallel.device().type == device

    tokens = torch.randint(0, ARCH.vocab_size, (3, 11), device=parallel.device())
    out = critic(tokens)
    assert out.logits.shape == (3, 11, ARCH.vocab_size)
    assert out.values.shape == (3, 11)
    assert out.values.dtype == torch.float32
    assert out.logits.device.type == parallel.device().type
    assert (
        critic.gpt.embedding.word_embeddings.weight.dtype
        == {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    )
    assert torch.isfinite(out.logits.float()).all() and torch.isfinite(out.values).all()


@pytest.mark.parametrize(
    "changes",
    [
        {},  # GQA (2 KV heads for 4 query heads), untied
        {"share_embeddings_and_output_weights": True},
        {"num_query_groups": 4},  # plain multi-head attention
        {"num_query_groups": 1, "num_layers": 3, "ffn_hidden_size": 96},  # multi-query
    ],
    ids=["gqa-untied", "gqa-tied", "mha", "mqa"],
)
def test_parameter_count_equals_hf_llama(mp, changes):
    arch = dataclasses.replace(ARCH, **changes)
    model = mp.build_model(arch, seed=1)
    assert _count(model) == _hf_param_count(arch)
    d = arch.hidden_size // arch.num_attention_heads
    qkv = model.state_dict()["gpt.decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.shape == ((arch.num_attention_heads + 2 * arch.num_query_groups) * d, arch.hidden_size)
    out = model(torch.randint(0, arch.vocab_size, (2, 5), device=model.device))
    assert out.logits.shape == (2, 5, arch.vocab_size) and out.values is None


def test_tied_embeddings_share_one_matrix(mp):
    tied = mp.build_model(dataclasses.replace(ARCH, share_embeddings_and_output_weights=True), seed=1)
    untied = mp.build_model(ARCH, seed=1)
    tied_keys = {k for k in tied.state_dict() if not k.endswith("_extra_state")}
    assert "gpt.output_layer.weight" not in tied_keys
    assert "gpt.output_layer.weight" in untied.state_dict()
    assert _count(untied) - _count(tied) == ARCH.vocab_size * ARCH.hidden_size
    # The output projection reads the embedding matrix: logits = h @ E^T.
    hidden = {}
    tied.gpt.decoder.register_forward_hook(lambda m, a, out: hidden.update(h=out))
    tokens = torch.randint(0, ARCH.vocab_size, (2, 6), device=tied.device)
    with torch.no_grad():
        logits = tied(tokens).logits
        expected = hidden["h"].transpose(0, 1) @ tied.gpt.embedding.word_embeddings.weight.T
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_seeded_build_is_reproducible(mp):
    a, b, c = (mp.build_model(ARCH, value_head=True, seed=s) for s in (5, 5, 6))
    for (name, x), y, z in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True
    ):
        if isinstance(x, torch.Tensor) and x.numel() > 1 and "layernorm" not in name:
            assert torch.equal(x, y), name
            assert not torch.equal(x, z), name


def test_value_head_reads_the_final_normed_hidden_state(critic, precision):
    # Capture what the decoder hands to the output layer; logits and values must both be
    # functions of exactly that tensor (one forward pass serves the LM head and the value head).
    hidden = {}
    handle = critic.gpt.decoder.register_forward_hook(lambda m, a, out: hidden.update(h=out))
    try:
        tokens = torch.randint(0, ARCH.vocab_size, (2, 7), device=critic.device)
        with torch.no_grad():
            out = critic(tokens)
            h = hidden["h"].transpose(0, 1)  # [S, B, H] -> [B, S, H]
            expected_logits = h @ critic.gpt.output_layer.weight.T
            expected_values = critic.value_head(h).squeeze(-1).float()
    finally:
        handle.remove()
    torch.testing.assert_close(out.logits, expected_logits, **_tol(precision))
    torch.testing.assert_close(out.values, expected_values, **_tol(precision))
    # RMSNorm output with a unit gain has RMS 1 per token: it is the normalised state.
    rms = h.float().pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=2e-2, rtol=0)


def test_backward_reaches_trunk_and_head(mp):
    model = mp.build_model(ARCH, value_head=True, seed=2)
    out = model(torch.randint(0, ARCH.vocab_size, (2, 8), device=model.device))
    (out.logits.float().logsumexp(-1).mean() + out.values.mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


RECOMPUTE = {  # NeMo's keys -> the Megatron settings they must produce
    "off": ({}, (None, None, None)),
    "shorthand": ({"activations_checkpoint": True}, ("full", "uniform", 1)),
    "selective": ({"activations_checkpoint_granularity": "selective"}, ("selective", None, None)),
    "full-block": (
        {
            "activations_checkpoint_granularity": "full",
            "activations_checkpoint_method": "block",
            "activations_checkpoint_num_layers": 2,
        },
        ("full", "block", 2),
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(RECOMPUTE))
def test_activation_checkpointing_keys_reach_megatron_with_the_same_gradients(mp, case):
    """Each recompute setting is what Megatron's TransformerConfig gets, and it changes only
    memory, never the gradients."""
    keys, (granularity, method, num_layers) = RECOMPUTE[case]
    grads = []
    for arch in (ARCH, dataclasses.replace(ARCH, **keys)):
        model = mp.build_model(arch, value_head=True, seed=4)
        config = model.gpt.config
        out = model(torch.arange(16, device=model.device).view(2, 8))
        (out.logits.float().logsumexp(-1).mean() + out.values.mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == (
        granularity, method, num_layers,
    )  # fmt: skip
    if granularity == "selective":  # megatron wraps each layer's core attention in a checkpoint
        assert all(layer.self_attention.checkpoint_core_attention for layer in model.gpt.decoder.layers)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    "keys, field",
    [
        ({"activations_checkpoint_granularity": "some"}, "model.activations_checkpoint_granularity"),
        ({"activations_checkpoint_granularity": "full", "activations_checkpoint_method": "x"},
         "model.activations_checkpoint_method"),
        ({"activations_checkpoint_granularity": "full", "activations_checkpoint_num_layers": 9},
         "model.activations_checkpoint_num_layers"),
    ],
)  # fmt: skip
def test_bad_recompute_keys_name_the_key(mp, keys, field):
    with pytest.raises(InvalidArgument, match=f"^{field}: "):
        mp.build_model(dataclasses.replace(ARCH, **keys))


def test_right_padding_never_changes_real_positions(critic, precision):
    seq = torch.randint(1, ARCH.vocab_size, (9,), device=critic.device)
    with torch.no_grad():
        alone = critic(seq[None])
        for pad in (0, 17):
            padded = torch.cat([seq, torch.full((6,), pad, device=critic.device)])
            out = critic(padded[None])
            torch.testing.assert_close(out.logits[:, :9], alone.logits, **_tol(precision))
            torch.testing.assert_close(out.values[:, :9], alone.values, **_tol(precision))


def test_pad_batch(mp):
    tokens, lengths = mp.pad_batch([torch.tensor([5, 6, 7]), torch.tensor([8])], pad_id=2)
    assert tokens.tolist() == [[5, 6, 7], [8, 2, 2]]
    assert lengths.tolist() == [3, 1]
    with pytest.raises(InvalidArgument, match="sequences"):
        mp.pad_batch([], pad_id=0)


LENGTHS = [5, 12, 1, 9, 2, 12, 7]


def test_sequence_logprobs_padding_safe(critic, mp, precision):
    seqs = _ragged(LENGTHS)
    batched = mp.sequence_logprobs(critic, seqs, micro_batch_size=4)
    alone = [mp.sequence_logprobs(critic, [s], micro_batch_size=1)[0] for s in seqs]
    assert [len(x) for x in batched] == [n - 1 for n in LENGTHS]
    for b, a in zip(batched, alone, strict=True):
        assert b.dtype == torch.float32 and b.device.type == "cpu"
        torch.testing.assert_close(b, a, **_tol(precision))
        assert (b <= 0).all()
    # They are the log-softmax of the model's own logits at the next token.
    s = seqs[1].to(critic.device)
    with torch.no_grad():
        logp = torch.log_softmax(critic(s[None]).logits[0].float(), -1)
    torch.testing.assert_close(batched[1], logp[torch.arange(11), s[1:]].cpu(), **_tol(precision))


def test_sequence_values_padding_safe(critic, mp, precision):
    seqs = _ragged(LENGTHS, seed=1)
    batched = mp.sequence_values(critic, seqs, micro_batch_size=3)
    alone = [mp.sequence_values(critic, [s], micro_batch_size=1)[0] for s in seqs]
    assert [len(x) for x in batched] == [n - 1 for n in LENGTHS]
    for b, a in zip(batched, alone, strict=True):
        torch.testing.assert_close(b, a, **_tol(precision))
    with torch.no_grad():
        full = critic(seqs[3][None].to(critic.device)).values[0].cpu()
    torch.testing.assert_close(batched[3], full[:-1], **_tol(precision))  # positions 0..L-2


def test_sequence_rewards_padding_safe(critic, mp, precision):
    seqs = _ragged(LENGTHS, seed=2)
    batched = mp.sequence_rewards(critic, seqs, micro_batch_size=5)
    alone = torch.cat([mp.sequence_rewards(critic, [s], micro_batch_size=1) for s in seqs])
    assert batched.shape == (len(LENGTHS),) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, alone, **_tol(precision))
    with torch.no_grad():
        last = critic(seqs[0][None].to(critic.device)).values[0, -1].cpu()
    torch.testing.assert_close(batched[0], last, **_tol(precision))


def test_passes_keep_training_mode_and_use_no_dropout(mp):
    model = mp.build_model(
        dataclasses.replace(ARCH, hidden_dropout=0.5, attention_dropout=0.5), value_head=True, seed=8
    )
    model.train()
    seqs = _ragged([6, 4])
    first = mp.sequence_rewards(model, seqs, micro_batch_size=2)
    second = mp.sequence_rewards(model, seqs, micro_batch_size=1)
    assert model.training
    torch.testing.assert_close(first, second, atol=1e-5, rtol=1e-5)
    # ... while a training-mode forward does drop out.
    tokens = seqs[0][None].to(model.device)
    assert not torch.equal(model(tokens).values, model(tokens).values)


def test_bad_inputs_name_the_field(mp):
    lm = mp.build_model(ARCH, seed=1)
    with pytest.raises(InvalidArgument, match="has no value head"):
        mp.sequence_values(lm, _ragged([3]), micro_batch_size=1)
    with pytest.raises(InvalidArgument, match=r"sequences\[1\].*token ids"):
        mp.sequence_logprobs(lm, [torch.tensor([1, 2]), torch.tensor([3, ARCH.vocab_size])], 2)
    with pytest.raises(InvalidArgument, match=r"sequences\[0\].*encoder_seq_length"):
        mp.sequence_logprobs(lm, _ragged([ARCH.encoder_seq_length + 1]), 2)
    with pytest.raises(InvalidArgument, match=r"sequences\[0\].*at least"):
        mp.sequence_logprobs(lm, [torch.tensor([], dtype=torch.long)], 2)
    with pytest.raises(InvalidArgument, match="micro_batch_size"):
        mp.sequence_logprobs(lm, _ragged([3]), 0)
    with pytest.raises(InvalidArgument, match="model.num_query_groups"):
        mp.build_model(dataclasses.replace(ARCH, num_query_groups=3))
    with pytest.raises(InvalidArgument, match="model.precision"):
        mp.build_model(dataclasses.replace(ARCH, precision="fp8"))
    with pytest.raises(InvalidArgument, match="model.tensor_model_parallel_size"):
        mp.build_model(dataclasses.replace(ARCH, tensor_model_parallel_size=2))
