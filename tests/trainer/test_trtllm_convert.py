"""Conversion of our Megatron Llama weights to TensorRT-LLM's Llama checkpoint layout.

The layout tests run on synthetic state dicts; the semantic test builds our model, converts it,
loads the TensorRT-LLM tensors into a Hugging Face `LlamaForCausalLM` (whose layout TensorRT-LLM's
own HF converter maps 1:1: q/k/v = the qkv row blocks, gate_proj = mlp.fc, up_proj = mlp.gate,
down_proj = mlp.proj) and checks the logits are the same."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from common.config import ModelArchConfig
from common.errors import InvalidArgument
from trainer import trtllm_convert as tc

ARCH = ModelArchConfig(
    num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
    vocab_size=128, encoder_seq_length=32,
)  # fmt: skip
VARIANTS = {
    "gqa": {},
    "mha": {"num_query_groups": 4},
    "mqa": {"num_query_groups": 1},
    "tied": {"share_embeddings_and_output_weights": True},
}


def _random_state_dict(arch: ModelArchConfig, prefix: str = "gpt.", seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = tc.megatron_shapes(arch)
    if arch.share_embeddings_and_output_weights:
        shapes.pop("output_layer.weight")
    sd = {prefix + name: torch.randn(shape, generator=g) for name, shape in shapes.items()}
    sd[prefix + "decoder.layers.0.self_attention.linear_qkv._extra_state"] = None  # megatron metadata
    return sd


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_shapes_match_trtllm_layout(variant):
    arch = dataclasses.replace(ARCH, **VARIANTS[variant])
    out = tc.megatron_to_trtllm(_random_state_dict(arch), arch)
    assert {k: tuple(v.shape) for k, v in out.items()} == tc.trtllm_shapes(arch)
    assert "transformer.layers.1.attention.qkv.weight" in out and "lm_head.weight" in out


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_round_trip_is_exact(variant):
    arch = dataclasses.replace(ARCH, **VARIANTS[variant])
    ours = _random_state_dict(arch)
    back = tc.trtllm_to_megatron(tc.megatron_to_trtllm(ours, arch), arch, prefix="gpt.")
    expected = {k: v for k, v in ours.items() if isinstance(v, torch.Tensor)}
    assert back.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name


def test_qkv_split_puts_each_head_where_trtllm_expects_it():
    # Row r of Megatron's QKV belongs to (group, slot, dim); fill each row with a code for it.
    nh, ng, d, h = 6, 2, 3, 5
    per_group = nh // ng
    rows = []
    for group in range(ng):
        for slot in range(per_group + 2):
            for dim in range(d):
                rows.append(torch.full((h,), float(group * 1000 + slot * 10 + dim)))
    q, k, v = tc.split_megatron_qkv(torch.stack(rows), nh, ng)
    assert q.shape == (nh * d, h) and k.shape == (ng * d, h) and v.shape == (ng * d, h)
    for head in range(nh):  # query head `head` is slot head % per_group of group head // per_group
        for dim in range(d):
            assert q[head * d + dim, 0] == (head // per_group) * 1000 + (head % per_group) * 10 + dim
    for group in range(ng):
        for dim in range(d):
            assert k[group * d + dim, 0] == group * 1000 + per_group * 10 + dim
            assert v[group * d + dim, 0] == group * 1000 + (per_group + 1) * 10 + dim
    assert torch.equal(tc.fuse_megatron_qkv(q, k, v, nh, ng), torch.stack(rows))


def test_gated_fc1_split_order():
    fc1 = torch.cat([torch.zeros(4, 3), torch.ones(4, 3)])  # [gate; up]
    gate, up = tc.split_gated_fc1(fc1)
    assert torch.equal(gate, torch.zeros(4, 3)) and torch.equal(up, torch.ones(4, 3))
    out = tc.megatron_to_trtllm(_random_state_dict(ARCH), ARCH)
    sd = _random_state_dict(ARCH)
    fc1 = sd["gpt.decoder.layers.1.mlp.linear_fc1.weight"]
    assert torch.equal(out["transformer.layers.1.mlp.fc.weight"], fc1[: ARCH.ffn_hidden_size])
    assert torch.equal(out["transformer.layers.1.mlp.gate.weight"], fc1[ARCH.ffn_hidden_size :])


def test_bare_gpt_model_prefix_and_ignored_value_head():
    sd = _random_state_dict(ARCH, prefix="")
    sd["value_head.weight"] = torch.zeros(1, ARCH.hidden_size)
    assert tc.model_prefix(sd) == ""
    out = tc.megatron_to_trtllm(sd, ARCH)
    assert torch.equal(out["transformer.vocab_embedding.weight"], sd["embedding.word_embeddings.weight"])
    assert not any("value_head" in k for k in out)


def test_bad_inputs_name_the_tensor():
    sd = _random_state_dict(ARCH)
    del sd["gpt.decoder.layers.1.mlp.linear_fc2.weight"]
    with pytest.raises(InvalidArgument, match=r"gpt\.decoder\.layers\.1\.mlp\.linear_fc2\.weight.*missing"):
        tc.megatron_to_trtllm(sd, ARCH)
    sd = _random_state_dict(ARCH)
    sd["gpt.decoder.final_layernorm.weight"] = torch.zeros(3)
    with pytest.raises(InvalidArgument, match=r"final_layernorm.*shape \(3,\), expected \(64,\)"):
        tc.megatron_to_trtllm(sd, ARCH)
    with pytest.raises(InvalidArgument, match="not a Megatron GPT state dict"):
        tc.megatron_to_trtllm({"foo": torch.zeros(1)}, ARCH)
    with pytest.raises(InvalidArgument, match="tensor_model_parallel_size"):
        tc.megatron_to_trtllm(sd, dataclasses.replace(ARCH, tensor_model_parallel_size=2))
    with pytest.raises(InvalidArgument, match="dtype"):
        tc.trtllm_config(ARCH, dtype="int4")


def test_checkpoint_directory_is_written_atomically_with_config(tmp_path):
    sd = _random_state_dict(ARCH)
    out = tc.write_checkpoint(sd, ARCH, tmp_path / "ckpt", dtype="bfloat16")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "rank0.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left
    config, tensors = tc.read_checkpoint(out)
    assert config == json.loads((out / "config.json").read_text())
    assert config["architecture"] == "LlamaForCausalLM"
    assert config["num_key_value_heads"] == 2 and config["head_size"] == 16
    assert config["position_embedding_type"] == "rope_gpt_neox" and config["hidden_act"] == "silu"
    assert config["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1}
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    expected = tc.megatron_to_trtllm(sd, ARCH)
    assert tensors.keys() == expected.keys()
    torch.testing.assert_close(
        tensors["lm_head.weight"].float(), expected["lm_head.weight"].bfloat16().float()
    )
    # Rewriting replaces the directory as a whole.
    tc.write_checkpoint(_random_state_dict(ARCH, seed=1), ARCH, out, dtype="float32")
    assert tc.read_checkpoint(out)[0]["dtype"] == "float32"
    with pytest.raises(InvalidArgument, match="does not exist"):
        tc.read_checkpoint(tmp_path / "nothing")


def _hf_from_trtllm(weights: dict[str, torch.Tensor], config: dict):
    """A transformers LlamaForCausalLM holding TensorRT-LLM checkpoint tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            num_key_value_heads=config["num_key_value_heads"],
            max_position_embeddings=config["max_position_embeddings"],
            rms_norm_eps=config["norm_epsilon"],
            rope_theta=config["rotary_base"],
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
        )  # fmt: skip
    )
    nq = config["num_attention_heads"] * config["head_size"]
    nkv = config["num_key_value_heads"] * config["head_size"]
    sd = {"model.embed_tokens.weight": weights["transformer.vocab_embedding.weight"],
          "model.norm.weight": weights["transformer.ln_f.weight"], "lm_head.weight": weights["lm_head.weight"]}  # fmt: skip
    for i in range(config["num_hidden_layers"]):
        t, h = f"transformer.layers.{i}.", f"model.layers.{i}."
        qkv = weights[t + "attention.qkv.weight"]
        sd[h + "self_attn.q_proj.weight"] = qkv[:nq]
        sd[h + "self_attn.k_proj.weight"] = qkv[nq : nq + nkv]
        sd[h + "self_attn.v_proj.weight"] = qkv[nq + nkv :]
        sd[h + "self_attn.o_proj.weight"] = weights[t + "attention.dense.weight"]
        sd[h + "mlp.gate_proj.weight"] = weights[t + "mlp.fc.weight"]
        sd[h + "mlp.up_proj.weight"] = weights[t + "mlp.gate.weight"]
        sd[h + "mlp.down_proj.weight"] = weights[t + "mlp.proj.weight"]
        sd[h + "input_layernorm.weight"] = weights[t + "input_layernorm.weight"]
        sd[h + "post_attention_layernorm.weight"] = weights[t + "post_layernorm.weight"]
    hf.load_state_dict(sd, strict=True)
    return hf.eval()


@pytest.mark.parametrize("variant", ["gqa", "tied"])
def test_converted_weights_compute_the_same_logits(variant):
    from trainer import model as model_lib
    from trainer import parallel

    parallel.init_parallel(seed=1234)
    arch = dataclasses.replace(ARCH, **VARIANTS[variant])
    ours = model_lib.build_model(arch, seed=7).eval()
    # Non-unit norm gains, so a swapped norm would show.
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)
    weights = tc.megatron_to_trtllm(ours.state_dict(), arch)
    hf = _hf_from_trtllm(weights, tc.trtllm_config(arch, dtype="float32"))
    tokens = torch.randint(0, arch.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(tokens).logits
        got = hf(tokens).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
