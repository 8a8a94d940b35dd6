"""Hugging Face Llama/Mistral import and export: tiny random `transformers` models (GQA and not,
tied and untied embeddings, one file and sharded) must give the same logits as our Megatron model
after import, and again in `transformers` after export; bad checkpoints give clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.config import ModelArchConfig
from common.errors import InvalidArgument, NotFound

transformers = pytest.importorskip("transformers")

CUDA = torch.cuda.is_available()
VOCAB = 320
TOL = dict(atol=1e-4, rtol=1e-4)
TEXT = ["the quick brown fox jumps over the lazy dog", "a tokenizer for tests", "hello world 123"] * 4


@pytest.fixture(scope="module")
def parallel():
    from trainer import parallel

    parallel.init_parallel(seed=1234)
    return parallel


@pytest.fixture(scope="module")
def tokenizer():
    from trainer.tokenizer import train_bpe

    return train_bpe(TEXT, vocab_size=300)


def make_hf_model(
    directory: Path, *, kv_heads=2, tied=False, kind="llama", shard=None, tokenizer=None, **extra
):
    """Save a tiny random LlamaForCausalLM (or Mistral) with non-trivial norm weights."""
    cls_config = transformers.MistralConfig if kind == "mistral" else transformers.LlamaConfig
    cls_model = transformers.MistralForCausalLM if kind == "mistral" else transformers.LlamaForCausalLM
    config = cls_config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=64, tie_word_embeddings=tied,
        rms_norm_eps=1e-5, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    model = cls_model(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # ones would hide a norm mix-up
                param.uniform_(0.5, 1.5)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(directory, **kwargs)
    if tokenizer is not None:
        tokenizer.save(directory)
    return model


def tokens(batch=2, length=24, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def import_model(parallel, src: Path):
    from trainer import hf
    from trainer.model import build_model

    arch, state = hf.import_hf(src)
    model = build_model(arch)
    hf.load_full_state_dict(model, state)
    return model.eval(), arch


def ours(model, x):
    with torch.no_grad():
        return model(x.to(model.device)).logits.float().cpu()


def theirs(model, x):
    with torch.no_grad():
        return model(x).logits.float()


@pytest.mark.parametrize(
    "kv_heads,tied,shard",
    [(2, False, None), (4, True, None), (1, False, "60KB")],
    ids=["gqa-untied", "mha-tied", "mqa-sharded"],
)
def test_import_matches_transformers_logits(parallel, tmp_path, kv_heads, tied, shard):
    hf_model = make_hf_model(tmp_path, kv_heads=kv_heads, tied=tied, shard=shard)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    model, arch = import_model(parallel, tmp_path)
    assert (arch.num_query_groups, arch.share_embeddings_and_output_weights) == (kv_heads, tied)
    assert ("gpt.output_layer.weight" in model.state_dict()) != tied
    x = tokens()
    torch.testing.assert_close(ours(model, x), theirs(hf_model, x), **TOL)


def test_import_mistral(parallel, tmp_path):
    hf_model = make_hf_model(tmp_path, kind="mistral", sliding_window=32)
    model, arch = import_model(parallel, tmp_path)
    # Sliding-window attention equals full attention within the window: the length is capped.
    assert arch.encoder_seq_length == 32
    x = tokens(length=32)
    torch.testing.assert_close(ours(model, x), theirs(hf_model, x), **TOL)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_reloads_in_transformers(parallel, tmp_path, tokenizer, tied):
    from trainer import hf

    hf_model = make_hf_model(tmp_path / "src", tied=tied)
    model, arch = import_model(parallel, tmp_path / "src")
    dst = tmp_path / "exported"
    hf.export_hf(model, arch, tokenizer, dst)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in dst.iterdir()
    }
    assert not list(tmp_path.glob("exported.tmp-*"))

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(dst).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    x = tokens(seed=1)
    torch.testing.assert_close(theirs(reloaded, x), ours(model, x), **TOL)
    torch.testing.assert_close(theirs(reloaded, x), theirs(hf_model, x), **TOL)
    assert reloaded.config.eos_token_id == tokenizer.eos_id

    hf_tok = transformers.AutoTokenizer.from_pretrained(dst)
    text = "the lazy fox says hello"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    assert hf_tok.eos_token_id == tokenizer.eos_id and hf_tok.pad_token_id == tokenizer.pad_id


def test_export_sharded_and_bf16(parallel, tmp_path):
    from trainer import hf

    make_hf_model(tmp_path / "src")
    model, arch = import_model(parallel, tmp_path / "src")
    dst = tmp_path / "sharded"
    hf.export_hf(model, arch, None, dst, dtype=torch.bfloat16, max_shard_bytes=40_000)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    config = json.loads((dst / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["num_key_value_heads"] == 2
    # Our own import reads the sharded export back exactly (bf16 weights, same arch).
    arch2, state2 = hf.import_hf(dst)
    assert arch2 == arch
    full = hf.full_state_dict(model)
    for name, tensor in state2.items():
        assert tensor.dtype == torch.bfloat16
        torch.testing.assert_close(tensor, full[name].to(torch.bfloat16), atol=0, rtol=0)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    x = tokens(seed=2)
    torch.testing.assert_close(theirs(reloaded, x), ours(model, x), atol=0.1, rtol=0.05)


def test_qkv_and_tensor_parallel_layout_round_trip():
    from trainer import hf

    arch = ModelArchConfig(
        num_layers=1,
        hidden_size=64,
        ffn_hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=16,
    )
    q, k, v = torch.randn(64, 64), torch.randn(32, 64), torch.randn(32, 64)
    qkv = hf.fuse_qkv(q, k, v, arch)
    # Group 0 = query heads 0-1, key head 0, value head 0 (16 rows each).
    torch.testing.assert_close(qkv[:32], q[:32])
    torch.testing.assert_close(qkv[32:48], k[:16])
    torch.testing.assert_close(qkv[48:64], v[:16])
    for a, b in zip(hf.split_qkv(qkv, arch), (q, k, v), strict=True):
        assert torch.equal(a, b)

    full = {
        "gpt.embedding.word_embeddings.weight": torch.randn(16, 64),
        "gpt.decoder.layers.0.self_attention.linear_qkv.weight": qkv,
        "gpt.decoder.layers.0.self_attention.linear_proj.weight": torch.randn(64, 64),
        "gpt.decoder.layers.0.mlp.linear_fc1.weight": torch.randn(64, 64),
        "gpt.decoder.layers.0.mlp.linear_fc2.weight": torch.randn(64, 32),
        "gpt.decoder.final_layernorm.weight": torch.randn(64),
    }
    shards = [hf.shard_state_dict(full, r, 2) for r in range(2)]
    # Rank 1 holds KV group 1 whole, and the second half of both gate and up rows.
    assert torch.equal(shards[1]["gpt.decoder.layers.0.self_attention.linear_qkv.weight"], qkv[64:])
    fc1 = full["gpt.decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(
        shards[1]["gpt.decoder.layers.0.mlp.linear_fc1.weight"], torch.cat([fc1[16:32], fc1[48:64]])
    )
    assert torch.equal(
        shards[0]["gpt.decoder.final_layernorm.weight"], full["gpt.decoder.final_layernorm.weight"]
    )
    merged = hf.merge_state_dict_shards(shards)
    assert merged.keys() == full.keys()
    for name in full:
        assert torch.equal(merged[name], full[name]), name


def _llama_config(**changes):
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 320, "hidden_size": 64,
        "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    }  # fmt: skip
    config.update(changes)
    return config


def test_arch_from_config_reads_llama_fields():
    from trainer import hf

    arch = hf.arch_from_hf_config(_llama_config())
    assert (arch.num_layers, arch.hidden_size, arch.ffn_hidden_size, arch.num_attention_heads) == (
        2,
        64,
        160,
        4,
    )
    assert (arch.num_query_groups, arch.vocab_size, arch.encoder_seq_length) == (2, 320, 64)
    assert (arch.rotary_base, arch.norm_epsilon, arch.share_embeddings_and_output_weights) == (
        500000.0,
        1e-5,
        False,
    )
    # transformers 5 style rope_parameters; no num_key_value_heads means MHA.
    cfg = _llama_config(
        rope_parameters={"rope_type": "default", "rope_theta": 1234.0}, num_key_value_heads=None
    )
    del cfg["rope_theta"]
    arch = hf.arch_from_hf_config(cfg)
    assert arch.rotary_base == 1234.0 and arch.num_query_groups == 4
    # Our export's config reads back to the same arch.
    assert hf.arch_from_hf_config(hf.hf_config_from_arch(arch)) == arch


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "architectures"),
        ({"architectures": ["Qwen2ForCausalLM"]}, "architectures"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 32}, "head_dim"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": None}, "hidden_size"),
    ],
)
def test_unsupported_configs_name_the_field(changes, field):
    from trainer import hf

    with pytest.raises(InvalidArgument) as err:
        hf.arch_from_hf_config(_llama_config(**changes))
    assert err.value.field == f"config.json:{field}"


def test_missing_unexpected_and_misshapen_tensors(parallel, tmp_path):
    from safetensors.torch import load_file, save_file

    from trainer import hf

    make_hf_model(tmp_path)
    state = load_file(tmp_path / "model.safetensors")

    def write(s):
        save_file(s, tmp_path / "model.safetensors", metadata={"format": "pt"})

    missing = {
        k: v for k, v in state.items() if k not in ("model.layers.1.mlp.up_proj.weight", "lm_head.weight")
    }
    write(missing)
    with pytest.raises(
        InvalidArgument, match=r"missing tensors: lm_head.weight, model.layers.1.mlp.up_proj.weight"
    ):
        hf.import_hf(tmp_path)
    write({**state, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})
    with pytest.raises(InvalidArgument, match=r"unexpected tensors.*q_proj.bias"):
        hf.import_hf(tmp_path)
    write({**state, "model.norm.weight": torch.ones(32)})
    with pytest.raises(InvalidArgument, match=r"model.norm.weight.*\(32,\)"):
        hf.import_hf(tmp_path)
    # A leftover RoPE buffer from older exports is ignored.
    write({**state, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    hf.import_hf(tmp_path)


def test_missing_files(tmp_path):
    from trainer import hf

    with pytest.raises(NotFound, match="config.json"):
        hf.import_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_llama_config()))
    with pytest.raises(NotFound, match="model.safetensors"):
        hf.import_hf(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(NotFound, match="model-00001-of-00002.safetensors"):
        hf.import_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        hf.import_hf(tmp_path)


@pytest.mark.skipif(not CUDA, reason="no CUDA device: the GPU import check needs one")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_import_on_cuda(parallel, tmp_path, precision):
    import dataclasses

    from trainer import hf
    from trainer.model import build_model

    hf_model = make_hf_model(tmp_path)
    arch, state = hf.import_hf(tmp_path)
    model = build_model(dataclasses.replace(arch, precision=precision)).eval()
    hf.load_full_state_dict(model, state)
    assert model.device.type == "cuda"
    x = tokens()
    tol = TOL if precision == "fp32" else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(ours(model, x), theirs(hf_model, x), **tol)
