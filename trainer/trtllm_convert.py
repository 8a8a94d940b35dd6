"""Our Megatron Llama weights <-> TensorRT-LLM's Llama checkpoint layout, in plain torch.

TensorRT-LLM builds an engine from a "checkpoint": a directory with `config.json` (a
`PretrainedConfig` for `LlamaForCausalLM`) and `rank0.safetensors` holding

    transformer.vocab_embedding.weight              [V, H]
    transformer.layers.{i}.input_layernorm.weight   [H]
    transformer.layers.{i}.attention.qkv.weight     [(nh + 2*ng) * d, H]  all q rows, all k, all v
    transformer.layers.{i}.attention.dense.weight   [H, nh * d]
    transformer.layers.{i}.post_layernorm.weight    [H]
    transformer.layers.{i}.mlp.fc.weight            [F, H]   the activated branch (HF gate_proj)
    transformer.layers.{i}.mlp.gate.weight          [F, H]   the multiplied branch (HF up_proj)
    transformer.layers.{i}.mlp.proj.weight          [H, F]   (HF down_proj)
    transformer.ln_f.weight                         [H]
    lm_head.weight                                  [V, H]

(the names of TensorRT-LLM's `LLaMAForCausalLM`; its own HF converter maps `up_proj` to
`mlp.gate` and `gate_proj` to `mlp.fc`, since `GatedMLP` computes `proj(act(fc(x)) * gate(x))`).

Two layouts differ from ours (see `trainer.model`):
- QKV: Megatron interleaves per KV group (each group's nh/ng query heads, then its key head, then
  its value head); TensorRT-LLM concatenates all queries, then all keys, then all values.
- SwiGLU: Megatron's `linear_fc1` stacks [gate; up] (silu applied to the first half); TensorRT-LLM
  keeps them as two matrices, `fc` (activated) and `gate`.
Rotary embeddings are the non-interleaved "rotate half" kind in both (`rope_gpt_neox`).

Only full (tensor-parallel size 1) weights are converted: the engine runs on one GPU. No
TensorRT-LLM import is needed here; `services.generation.trtllm_engine` uses this to build and to
refit an engine.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from common.config import ModelArchConfig
from common.errors import InvalidArgument

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Our parameter name (under the model prefix, `{i}` = layer) -> TensorRT-LLM name, for the tensors
# that only change their name. QKV and fc1 are reshuffled by the functions below.
_RENAMES = {
    "embedding.word_embeddings.weight": "transformer.vocab_embedding.weight",
    "decoder.layers.{i}.input_layernorm.weight": "transformer.layers.{i}.input_layernorm.weight",
    "decoder.layers.{i}.self_attention.linear_proj.weight": "transformer.layers.{i}.attention.dense.weight",
    "decoder.layers.{i}.pre_mlp_layernorm.weight": "transformer.layers.{i}.post_layernorm.weight",
    "decoder.layers.{i}.mlp.linear_fc2.weight": "transformer.layers.{i}.mlp.proj.weight",
    "decoder.final_layernorm.weight": "transformer.ln_f.weight",
}
_QKV = "decoder.layers.{i}.self_attention.linear_qkv.weight"
_FC1 = "decoder.layers.{i}.mlp.linear_fc1.weight"
_OUTPUT = "output_layer.weight"
_EMBEDDING = "embedding.word_embeddings.weight"


def head_dim(arch: ModelArchConfig) -> int:
    return arch.hidden_size // arch.num_attention_heads


# ---------------------------------------------------------------------------------------------
# The two layout changes (pure functions)
# ---------------------------------------------------------------------------------------------


def split_megatron_qkv(
    weight: torch.Tensor, num_heads: int, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's grouped QKV [(nh + 2*ng) * d, H] -> (q [nh*d, H], k [ng*d, H], v [ng*d, H])."""
    rows, hidden = weight.shape
    per_group = num_heads // num_groups
    d = rows // (num_heads + 2 * num_groups)
    if d * (num_heads + 2 * num_groups) != rows or per_group * num_groups != num_heads:
        raise InvalidArgument(
            "linear_qkv.weight", f"{rows} rows do not fit {num_heads} query heads in {num_groups} groups"
        )
    grouped = weight.reshape(num_groups, per_group + 2, d, hidden)
    q = grouped[:, :per_group].reshape(num_heads * d, hidden)
    k = grouped[:, per_group].reshape(num_groups * d, hidden)
    v = grouped[:, per_group + 1].reshape(num_groups * d, hidden)
    return q, k, v


def fuse_megatron_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int
) -> torch.Tensor:
    """The inverse of `split_megatron_qkv`."""
    hidden = q.shape[1]
    d = q.shape[0] // num_heads
    per_group = num_heads // num_groups
    grouped = torch.cat(
        [
            q.reshape(num_groups, per_group, d, hidden),
            k.reshape(num_groups, 1, d, hidden),
            v.reshape(num_groups, 1, d, hidden),
        ],
        dim=1,
    )
    return grouped.reshape(-1, hidden)


def split_gated_fc1(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron's [gate; up] fc1 [2F, H] -> (gate [F, H] (activated), up [F, H])."""
    if weight.shape[0] % 2:
        raise InvalidArgument(
            "linear_fc1.weight", f"{weight.shape[0]} rows: a gated MLP needs an even number"
        )
    gate, up = weight.chunk(2, dim=0)
    return gate, up


# ---------------------------------------------------------------------------------------------
# Whole state dicts
# ---------------------------------------------------------------------------------------------


def model_prefix(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The prefix before Megatron's own names: "gpt." for `trainer.model.AlignerGPT`, "" for a bare
    `GPTModel`."""
    for name in state_dict:
        if name.endswith(_EMBEDDING):
            return name[: -len(_EMBEDDING)]
    raise InvalidArgument("state_dict", f"has no '{_EMBEDDING}' (not a Megatron GPT state dict)")


def megatron_to_trtllm(
    state_dict: Mapping[str, torch.Tensor], arch: ModelArchConfig
) -> dict[str, torch.Tensor]:
    """Our (TP=1) model state dict -> TensorRT-LLM Llama checkpoint tensors (same dtype).

    Tensors outside the language model (a value head, megatron's `_extra_state`) are ignored; a
    missing or mis-shaped language-model tensor is an `InvalidArgument` naming it."""
    _check_single_rank(arch)
    prefix = model_prefix(state_dict)

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        full = prefix + name
        if full not in state_dict:
            raise InvalidArgument(f"state_dict[{full!r}]", "missing")
        tensor = state_dict[full]
        if tuple(tensor.shape) != shape:
            raise InvalidArgument(f"state_dict[{full!r}]", f"shape {tuple(tensor.shape)}, expected {shape}")
        return tensor

    shapes = megatron_shapes(arch)
    out: dict[str, torch.Tensor] = {}
    for i in range(arch.num_layers):
        for ours, theirs in _RENAMES.items():
            if "{i}" in ours:
                out[theirs.format(i=i)] = get(ours.format(i=i), shapes[ours.format(i=i)])
        q, k, v = split_megatron_qkv(
            get(_QKV.format(i=i), shapes[_QKV.format(i=i)]), arch.num_attention_heads, arch.num_query_groups
        )
        out[f"transformer.layers.{i}.attention.qkv.weight"] = torch.cat([q, k, v], dim=0)
        gate, up = split_gated_fc1(get(_FC1.format(i=i), shapes[_FC1.format(i=i)]))
        out[f"transformer.layers.{i}.mlp.fc.weight"] = gate
        out[f"transformer.layers.{i}.mlp.gate.weight"] = up
    for ours, theirs in _RENAMES.items():
        if "{i}" not in ours:
            out[theirs] = get(ours, shapes[ours])
    # Tied embeddings: TensorRT-LLM gets its own copy of the output matrix (simplest to build and
    # to refit; the config says untied).
    output = _EMBEDDING if arch.share_embeddings_and_output_weights else _OUTPUT
    out["lm_head.weight"] = get(output, shapes[output])
    return {name: t.contiguous() for name, t in out.items()}


def trtllm_to_megatron(
    weights: Mapping[str, torch.Tensor], arch: ModelArchConfig, prefix: str = "gpt."
) -> dict[str, torch.Tensor]:
    """The inverse of `megatron_to_trtllm` (without a value head): TensorRT-LLM checkpoint tensors
    -> our state dict names under `prefix`."""
    _check_single_rank(arch)
    d = head_dim(arch)
    nq, nkv = arch.num_attention_heads * d, arch.num_query_groups * d

    def get(name: str) -> torch.Tensor:
        if name not in weights:
            raise InvalidArgument(f"weights[{name!r}]", "missing")
        return weights[name]

    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _RENAMES.items():
        layers = range(arch.num_layers) if "{i}" in ours else [None]
        for i in layers:
            out[prefix + ours.format(i=i)] = get(theirs.format(i=i))
    for i in range(arch.num_layers):
        qkv = get(f"transformer.layers.{i}.attention.qkv.weight")
        q, k, v = qkv[:nq], qkv[nq : nq + nkv], qkv[nq + nkv :]
        out[prefix + _QKV.format(i=i)] = fuse_megatron_qkv(
            q, k, v, arch.num_attention_heads, arch.num_query_groups
        )
        fc1 = torch.cat(
            [get(f"transformer.layers.{i}.mlp.fc.weight"), get(f"transformer.layers.{i}.mlp.gate.weight")]
        )
        out[prefix + _FC1.format(i=i)] = fc1
    if not arch.share_embeddings_and_output_weights:
        out[prefix + _OUTPUT] = get("lm_head.weight")
    return {name: t.contiguous() for name, t in out.items()}


def megatron_shapes(arch: ModelArchConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of our (TP=1) language-model tensors, without prefix."""
    h, f, v, d = arch.hidden_size, arch.ffn_hidden_size, arch.vocab_size, head_dim(arch)
    nh, ng = arch.num_attention_heads, arch.num_query_groups
    shapes: dict[str, tuple[int, ...]] = {
        _EMBEDDING: (v, h),
        "decoder.final_layernorm.weight": (h,),
        _OUTPUT: (v, h),
    }
    for i in range(arch.num_layers):
        shapes[f"decoder.layers.{i}.input_layernorm.weight"] = (h,)
        shapes[_QKV.format(i=i)] = ((nh + 2 * ng) * d, h)
        shapes[f"decoder.layers.{i}.self_attention.linear_proj.weight"] = (h, nh * d)
        shapes[f"decoder.layers.{i}.pre_mlp_layernorm.weight"] = (h,)
        shapes[_FC1.format(i=i)] = (2 * f, h)
        shapes[f"decoder.layers.{i}.mlp.linear_fc2.weight"] = (h, f)
    return shapes


def trtllm_shapes(arch: ModelArchConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the TensorRT-LLM checkpoint tensors of `arch`."""
    h, f, v, d = arch.hidden_size, arch.ffn_hidden_size, arch.vocab_size, head_dim(arch)
    nh, ng = arch.num_attention_heads, arch.num_query_groups
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.vocab_embedding.weight": (v, h),
        "transformer.ln_f.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for i in range(arch.num_layers):
        layer = f"transformer.layers.{i}."
        shapes[layer + "input_layernorm.weight"] = (h,)
        shapes[layer + "attention.qkv.weight"] = ((nh + 2 * ng) * d, h)
        shapes[layer + "attention.dense.weight"] = (h, nh * d)
        shapes[layer + "post_layernorm.weight"] = (h,)
        shapes[layer + "mlp.fc.weight"] = (f, h)
        shapes[layer + "mlp.gate.weight"] = (f, h)
        shapes[layer + "mlp.proj.weight"] = (h, f)
    return shapes


# ---------------------------------------------------------------------------------------------
# The checkpoint directory
# ---------------------------------------------------------------------------------------------


def trtllm_config(arch: ModelArchConfig, dtype: str = "float16") -> dict:
    """TensorRT-LLM's `config.json` (a `LLaMAConfig` as `PretrainedConfig.from_dict` reads it)."""
    if dtype not in DTYPES:
        raise InvalidArgument("dtype", f"must be one of {sorted(DTYPES)}, got {dtype!r}")
    _check_single_rank(arch)
    return {
        "architecture": "LlamaForCausalLM",
        "dtype": dtype,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "head_size": head_dim(arch),
        "vocab_size": arch.vocab_size,
        "max_position_embeddings": arch.encoder_seq_length,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": float(arch.rotary_base),
        "rotary_scaling": None,
        "hidden_act": "silu",
        "norm_epsilon": float(arch.norm_epsilon),
        "mlp_bias": False,
        "attn_bias": False,
        "tie_word_embeddings": False,  # lm_head.weight is always written (see megatron_to_trtllm)
        "logits_dtype": "float32",
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }


def write_checkpoint(
    state_dict: Mapping[str, torch.Tensor], arch: ModelArchConfig, out_dir: str | Path, dtype: str = "float16"
) -> Path:
    """Write a TensorRT-LLM checkpoint directory (`config.json`, `rank0.safetensors`) for our
    weights, atomically: a temporary directory renamed into place."""
    from safetensors.torch import save_file

    config = trtllm_config(arch, dtype)
    weights = {
        name: t.detach().to("cpu", DTYPES[dtype]).contiguous()
        for name, t in megatron_to_trtllm(state_dict, arch).items()
    }
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(weights, str(tmp / "rank0.safetensors"))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a TensorRT-LLM checkpoint directory written by `write_checkpoint`."""
    from safetensors.torch import load_file

    path = Path(path)
    for name in ("config.json", "rank0.safetensors"):
        if not (path / name).is_file():
            raise InvalidArgument("checkpoint", f"{str(path / name)!r} does not exist")
    return json.loads((path / "config.json").read_text()), load_file(str(path / "rank0.safetensors"))


def _check_single_rank(arch: ModelArchConfig) -> None:
    if arch.tensor_model_parallel_size != 1 or arch.pipeline_model_parallel_size != 1:
        raise InvalidArgument(
            "model.tensor_model_parallel_size",
            "TensorRT-LLM conversion takes full weights (tensor and pipeline parallel size 1)",
        )
