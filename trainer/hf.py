"""Hugging Face Llama / Mistral checkpoints <-> our Megatron-core model.

A Hugging Face checkpoint directory holds `config.json` and safetensors weights (one
`model.safetensors`, or shards listed in `model.safetensors.index.json`). Import reads them into a
full (tensor-parallel size 1) state dict under `AlignerGPT` names; export writes one back, with the
tokenizer, as a directory `transformers` opens with `from_pretrained`.

Name and layout mapping (`{i}` = layer, nh heads, ng KV groups, d = head dim, F = FFN size):

    model.embed_tokens.weight                  gpt.embedding.word_embeddings.weight
    model.layers.{i}.input_layernorm.weight    gpt.decoder.layers.{i}.input_layernorm.weight
    model.layers.{i}.self_attn.{q,k,v}_proj    gpt.decoder.layers.{i}.self_attention.linear_qkv.weight
        fused and interleaved per KV group: [q heads of group 0, k0, v0, q heads of group 1, ...]
    model.layers.{i}.self_attn.o_proj.weight   gpt.decoder.layers.{i}.self_attention.linear_proj.weight
    model.layers.{i}.post_attention_layernorm  gpt.decoder.layers.{i}.pre_mlp_layernorm.weight
    model.layers.{i}.mlp.{gate,up}_proj        gpt.decoder.layers.{i}.mlp.linear_fc1.weight = cat(gate, up)
    model.layers.{i}.mlp.down_proj.weight      gpt.decoder.layers.{i}.mlp.linear_fc2.weight
    model.norm.weight                          gpt.decoder.final_layernorm.weight
    lm_head.weight                             gpt.output_layer.weight (absent when tied)

Both use the same "rotate half" RoPE convention, so q/k rows need no permutation.

Under tensor parallelism each rank holds a slice: `shard_state_dict` cuts a full state dict for
one rank and `merge_state_dict_shards` puts the slices back together (the layout rules are in
`_TP_SPLIT`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.config import ModelArchConfig
from common.errors import InvalidArgument, NotFound

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# Tensors in HF checkpoints that carry no weights (older Llama exports saved the RoPE table).
_IGNORED_HF = re.compile(r".*\.rotary_emb\.inv_freq$")


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelArchConfig
# ---------------------------------------------------------------------------------------------


def is_hf_checkpoint(path: str | Path) -> bool:
    """A Hugging Face model directory: has config.json (our checkpoints have meta.json instead)."""
    return (Path(path) / CONFIG_FILE).is_file()


def read_hf_config(src_dir: str | Path) -> dict[str, Any]:
    path = Path(src_dir) / CONFIG_FILE
    if not path.is_file():
        raise NotFound(f"{path}: no such file (not a Hugging Face model directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidArgument(str(path), f"is not valid JSON ({exc})") from None


def _rope_theta(cfg: Mapping[str, Any]) -> float:
    """RoPE base from either config style: `rope_theta` (+ `rope_scaling`, transformers 4) or
    `rope_parameters` (transformers 5). Only plain RoPE is supported: scaled variants (llama3,
    yarn, linear, dynamic) would change the rotary table."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    for field, spec in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind != "default":
            raise InvalidArgument(
                f"config.json:{field}", f"RoPE scaling {kind!r} is not supported (only plain RoPE)"
            )
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return float(theta)


def arch_from_hf_config(cfg: Mapping[str, Any]) -> ModelArchConfig:
    """The `ModelArchConfig` of a Llama/Mistral `config.json` dict. Anything our model would
    compute differently (biases, scaled RoPE, another activation, a custom head dim) is an error
    naming the config key, never silently ignored."""
    architectures = cfg.get("architectures") or []
    supported = [a for a in architectures if a in SUPPORTED_ARCHITECTURES]
    if not supported and not (
        not architectures and cfg.get("model_type") in SUPPORTED_ARCHITECTURES.values()
    ):
        raise InvalidArgument(
            "config.json:architectures",
            f"{architectures or cfg.get('model_type')!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
        )

    def required(key: str) -> int:
        if cfg.get(key) is None:
            raise InvalidArgument(f"config.json:{key}", "is missing")
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidArgument(f"config.json:{key}", f"must be a positive integer, got {value!r}")
        return value

    hidden = required("hidden_size")
    heads = required("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        raise InvalidArgument(
            "config.json:hidden_act", f"{cfg['hidden_act']!r} is not supported (SwiGLU needs silu)"
        )
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise InvalidArgument(f"config.json:{key}", "biases are not supported")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and hidden % heads == 0 and head_dim != hidden // heads:
        raise InvalidArgument(
            "config.json:head_dim",
            f"{head_dim} != hidden_size / num_attention_heads = {hidden // heads} is not supported",
        )
    if cfg.get("quantization_config"):
        raise InvalidArgument("config.json:quantization_config", "quantized checkpoints are not supported")
    seq_len = int(cfg.get("max_position_embeddings") or 2048)
    # Mistral's sliding-window attention equals full attention up to the window length, so the
    # model is exact when sequences are limited to it.
    window = cfg.get("sliding_window")
    if window is not None and cfg.get("use_sliding_window", True):
        seq_len = min(seq_len, int(window))
    arch = ModelArchConfig(
        num_layers=required("num_hidden_layers"),
        hidden_size=hidden,
        ffn_hidden_size=required("intermediate_size"),
        num_attention_heads=heads,
        num_query_groups=int(kv_heads),
        vocab_size=required("vocab_size"),
        encoder_seq_length=seq_len,
        rotary_base=_rope_theta(cfg),
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", False)),
    )
    if hidden % heads:
        raise InvalidArgument(
            "config.json:hidden_size", f"{hidden} is not divisible by num_attention_heads {heads}"
        )
    if heads % arch.num_query_groups:
        raise InvalidArgument(
            "config.json:num_key_value_heads", f"{kv_heads} does not divide num_attention_heads {heads}"
        )
    return arch


def hf_config_from_arch(
    arch: ModelArchConfig,
    *,
    dtype: torch.dtype = torch.float32,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """A `LlamaConfig` dict for `arch`, readable by transformers 4.x (`rope_theta`, `torch_dtype`)
    and 5.x (`rope_parameters`, `dtype`)."""
    dtype_name = _DTYPE_NAMES[dtype]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups,
        "head_dim": arch.hidden_size // arch.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": arch.encoder_seq_length,
        "rms_norm_eps": arch.norm_epsilon,
        "rope_theta": arch.rotary_base,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": arch.rotary_base},
        "tie_word_embeddings": arch.share_embeddings_and_output_weights,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }


# ---------------------------------------------------------------------------------------------
# safetensors files
# ---------------------------------------------------------------------------------------------


def load_hf_state_dict(src_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF checkpoint: sharded (`model.safetensors.index.json`) or one file."""
    from safetensors.torch import load_file

    src = Path(src_dir)
    if (src / SAFETENSORS_INDEX).is_file():
        index = json.loads((src / SAFETENSORS_INDEX).read_text())
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InvalidArgument(str(src / SAFETENSORS_INDEX), "has no weight_map")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not (src / shard).is_file():
                raise NotFound(f"{src / shard}: shard listed in {SAFETENSORS_INDEX} does not exist")
            state.update(load_file(src / shard))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise InvalidArgument(
                str(src / SAFETENSORS_INDEX), f"lists tensors its shards lack: {_names(missing)}"
            )
        return state
    if (src / SAFETENSORS_FILE).is_file():
        return load_file(src / SAFETENSORS_FILE)
    if any(src.glob("pytorch_model*.bin")):
        raise InvalidArgument(str(src), "has only PyTorch .bin weights; convert them to safetensors first")
    raise NotFound(f"{src}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}")


def save_hf_state_dict(
    state: Mapping[str, torch.Tensor], dst_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> list[str]:
    """Write `state` as `model.safetensors`, or as `model-0000k-of-0000n.safetensors` shards plus
    `model.safetensors.index.json` when it exceeds `max_shard_bytes`. Returns the file names."""
    from safetensors.torch import save_file

    dst = Path(dst_dir)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        # safetensors refuses views of shared storage: give every tensor its own.
        shards[-1][name] = tensor.detach().cpu().contiguous().clone()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], dst / SAFETENSORS_FILE, metadata={"format": "pt"})
        return [SAFETENSORS_FILE]
    files, weight_map = [], {}
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, dst / fname, metadata={"format": "pt"})
        files.append(fname)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files + [SAFETENSORS_INDEX]


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


# ---------------------------------------------------------------------------------------------
# Name and layout mapping (full, TP=1 tensors)
# ---------------------------------------------------------------------------------------------


def _head_dims(arch: ModelArchConfig) -> tuple[int, int, int]:
    """(d, query heads per group, groups)."""
    d = arch.hidden_size // arch.num_attention_heads
    return d, arch.num_attention_heads // arch.num_query_groups, arch.num_query_groups


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ModelArchConfig) -> torch.Tensor:
    """[nh*d, H], [ng*d, H], [ng*d, H] -> Megatron's [ng * (nh/ng + 2) * d, H], per group
    [its query heads, its key head, its value head]."""
    d, per_group, groups = _head_dims(arch)
    hidden = q.shape[1]
    qkv = torch.cat(
        [
            q.reshape(groups, per_group * d, hidden),
            k.reshape(groups, d, hidden),
            v.reshape(groups, d, hidden),
        ],
        dim=1,
    )
    return qkv.reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, arch: ModelArchConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv`."""
    d, per_group, groups = _head_dims(arch)
    hidden = qkv.shape[1]
    q, k, v = qkv.reshape(groups, (per_group + 2) * d, hidden).split([per_group * d, d, d], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def _expected_hf_shapes(arch: ModelArchConfig) -> dict[str, tuple[int, ...]]:
    d, _, groups = _head_dims(arch)
    h, f, v = arch.hidden_size, arch.ffn_hidden_size, arch.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not arch.share_embeddings_and_output_weights:
        shapes["lm_head.weight"] = (v, h)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (arch.num_attention_heads * d, h),
            p + "self_attn.k_proj.weight": (groups * d, h),
            p + "self_attn.v_proj.weight": (groups * d, h),
            p + "self_attn.o_proj.weight": (h, arch.num_attention_heads * d),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        })  # fmt: skip
    return shapes


def hf_to_megatron(hf_state: Mapping[str, torch.Tensor], arch: ModelArchConfig) -> dict[str, torch.Tensor]:
    """HF Llama tensors -> the full `AlignerGPT` state dict (without a value head). Missing,
    unexpected or wrongly shaped tensors are an error that lists them."""
    expected = _expected_hf_shapes(arch)
    tied_head = arch.share_embeddings_and_output_weights and "lm_head.weight" in hf_state
    present = {k for k in hf_state if not _IGNORED_HF.match(k)} - ({"lm_head.weight"} if tied_head else set())
    missing = sorted(set(expected) - present)
    if missing:
        raise InvalidArgument("checkpoint", f"missing tensors: {_names(missing)}")
    unexpected = sorted(present - set(expected))
    if unexpected:
        raise InvalidArgument(
            "checkpoint", f"unexpected tensors (not a plain Llama/Mistral model?): {_names(unexpected)}"
        )
    for name, shape in expected.items():
        if tuple(hf_state[name].shape) != shape:
            raise InvalidArgument(
                f"checkpoint:{name}", f"has shape {tuple(hf_state[name].shape)}, config.json implies {shape}"
            )

    out = {
        "gpt.embedding.word_embeddings.weight": hf_state["model.embed_tokens.weight"],
        "gpt.decoder.final_layernorm.weight": hf_state["model.norm.weight"],
    }
    if not arch.share_embeddings_and_output_weights:
        out["gpt.output_layer.weight"] = hf_state["lm_head.weight"]
    for i in range(arch.num_layers):
        src, dst = f"model.layers.{i}.", f"gpt.decoder.layers.{i}."
        attn, mlp = src + "self_attn.", src + "mlp."
        out[dst + "input_layernorm.weight"] = hf_state[src + "input_layernorm.weight"]
        out[dst + "self_attention.linear_qkv.weight"] = fuse_qkv(
            hf_state[attn + "q_proj.weight"],
            hf_state[attn + "k_proj.weight"],
            hf_state[attn + "v_proj.weight"],
            arch,
        )
        out[dst + "self_attention.linear_proj.weight"] = hf_state[attn + "o_proj.weight"]
        out[dst + "pre_mlp_layernorm.weight"] = hf_state[src + "post_attention_layernorm.weight"]
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [hf_state[mlp + "gate_proj.weight"], hf_state[mlp + "up_proj.weight"]]
        )
        out[dst + "mlp.linear_fc2.weight"] = hf_state[mlp + "down_proj.weight"]
    return out


def megatron_to_hf(state: Mapping[str, torch.Tensor], arch: ModelArchConfig) -> dict[str, torch.Tensor]:
    """The full `AlignerGPT` state dict -> HF Llama tensors (the value head, if any, is dropped)."""
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    needed = ["gpt.embedding.word_embeddings.weight", "gpt.decoder.final_layernorm.weight"]
    if not arch.share_embeddings_and_output_weights:
        needed.append("gpt.output_layer.weight")
    for i in range(arch.num_layers):
        p = f"gpt.decoder.layers.{i}."
        needed += [p + n for n in _LAYER_TENSORS]
    missing = [n for n in needed if n not in state]
    if missing:
        raise InvalidArgument("state_dict", f"missing tensors: {_names(missing)}")

    out = {"model.embed_tokens.weight": state["gpt.embedding.word_embeddings.weight"]}
    for i in range(arch.num_layers):
        src, dst = f"gpt.decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = split_qkv(state[src + "self_attention.linear_qkv.weight"], arch)
        gate, up = state[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out.update({
            dst + "input_layernorm.weight": state[src + "input_layernorm.weight"],
            dst + "self_attn.q_proj.weight": q,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": state[src + "self_attention.linear_proj.weight"],
            dst + "post_attention_layernorm.weight": state[src + "pre_mlp_layernorm.weight"],
            dst + "mlp.gate_proj.weight": gate,
            dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": state[src + "mlp.linear_fc2.weight"],
        })  # fmt: skip
    out["model.norm.weight"] = state["gpt.decoder.final_layernorm.weight"]
    if not arch.share_embeddings_and_output_weights:
        out["lm_head.weight"] = state["gpt.output_layer.weight"]
    return out


_LAYER_TENSORS = (
    "input_layernorm.weight",
    "self_attention.linear_qkv.weight",
    "self_attention.linear_proj.weight",
    "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.weight",
    "mlp.linear_fc2.weight",
)


# ---------------------------------------------------------------------------------------------
# Tensor-parallel slicing
# ---------------------------------------------------------------------------------------------

# How Megatron splits each weight over TP ranks: contiguous chunks along `dim`. The QKV rows
# are grouped per KV group, so a chunk of rows is a whole set of groups (TP must divide ng).
# linear_fc1 holds [gate; up]: each rank holds its chunk of gate rows followed by its chunk of
# up rows. Everything else (norms, the value head) is replicated.
_TP_SPLIT: tuple[tuple[str, int], ...] = (
    ("gpt.embedding.word_embeddings.weight", 0),
    ("gpt.output_layer.weight", 0),
    ("self_attention.linear_qkv.weight", 0),
    ("self_attention.linear_proj.weight", 1),
    ("mlp.linear_fc1.weight", 0),
    ("mlp.linear_fc2.weight", 1),
)


def _split_dim(name: str) -> int | None:
    for suffix, dim in _TP_SPLIT:
        if name.endswith(suffix):
            return dim
    return None


def shard_state_dict(state: Mapping[str, torch.Tensor], rank: int, size: int) -> dict[str, torch.Tensor]:
    """The slice of a full (TP=1) state dict that tensor-parallel rank `rank` of `size` holds."""
    out = {}
    for name, tensor in state.items():
        dim = _split_dim(name)
        if dim is None or size == 1:
            out[name] = tensor
        elif name.endswith("mlp.linear_fc1.weight"):
            gate, up = tensor.chunk(2, dim=0)
            out[name] = torch.cat([gate.chunk(size, 0)[rank], up.chunk(size, 0)[rank]])
        else:
            if tensor.shape[dim] % size:
                raise InvalidArgument(
                    name, f"dimension {dim} ({tensor.shape[dim]}) is not divisible by TP size {size}"
                )
            out[name] = tensor.chunk(size, dim)[rank]
    return out


def full_shape(name: str, shape: tuple[int, ...], size: int) -> tuple[int, ...]:
    """The TP=1 shape of weight `name` whose shard on each of `size` tensor-parallel ranks has
    `shape` (the split dimension times `size`; replicated weights keep their shape)."""
    dim = _split_dim(name)
    if dim is None:
        return tuple(shape)
    return tuple(n * size if d == dim else n for d, n in enumerate(shape))


def merge_state_dict_shards(shards: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Inverse of `shard_state_dict`: the per-rank slices (in rank order) -> the full state dict."""
    out = {}
    for name, first in shards[0].items():
        dim = _split_dim(name)
        if dim is None or len(shards) == 1:
            out[name] = first
        elif name.endswith("mlp.linear_fc1.weight"):
            halves = [s[name].chunk(2, dim=0) for s in shards]
            out[name] = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        else:
            out[name] = torch.cat([s[name] for s in shards], dim)
    return out


# ---------------------------------------------------------------------------------------------
# Model <-> full state dict
# ---------------------------------------------------------------------------------------------


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
    }


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights at TP=1 layout: gathered over the tensor-parallel group when sharded
    (a collective: every TP rank must call it)."""
    from megatron.core import parallel_state

    local = {k: v.detach() for k, v in _weights(model).items()}
    size = (
        parallel_state.get_tensor_model_parallel_world_size()
        if parallel_state.model_parallel_is_initialized()
        else 1
    )
    if size == 1:
        return local
    group = parallel_state.get_tensor_model_parallel_group()
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(size)]
    for name, tensor in local.items():
        pieces = [torch.empty_like(tensor) for _ in range(size)]
        torch.distributed.all_gather(pieces, tensor.contiguous(), group=group)
        for rank, piece in enumerate(pieces):
            shards[rank][name] = piece
    return merge_state_dict_shards(shards)


def load_full_state_dict(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, allow_missing_value_head: bool = True
) -> None:
    """Copy a full (TP=1) state dict into `model`, slicing it for this rank's TP shard. Weights
    are cast to the model's dtype. A model with a value head may take a state dict without one
    (the head keeps its initialisation: e.g. a reward model started from an SFT model)."""
    from megatron.core import parallel_state

    size, rank = 1, 0
    if parallel_state.model_parallel_is_initialized():
        size = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
    target = _weights(model)
    state = {k: v for k, v in state.items() if k in target or not k.startswith("value_head.")}
    local = shard_state_dict(state, rank, size)
    missing = sorted(
        k for k in target if k not in local and not (allow_missing_value_head and k.startswith("value_head."))
    )
    unexpected = sorted(set(local) - set(target))
    if missing or unexpected:
        raise InvalidArgument(
            "state_dict",
            f"does not fit the model: missing {_names(missing) or 'none'}; unexpected {_names(unexpected) or 'none'}",
        )
    with torch.no_grad():
        for name, tensor in local.items():
            if tuple(tensor.shape) != tuple(target[name].shape):
                raise InvalidArgument(
                    f"state_dict:{name}", f"shape {tuple(tensor.shape)} != model {tuple(target[name].shape)}"
                )
            target[name].copy_(tensor)


# ---------------------------------------------------------------------------------------------
# Import / export
# ---------------------------------------------------------------------------------------------


def import_hf(src_dir: str | Path) -> tuple[ModelArchConfig, dict[str, torch.Tensor]]:
    """A HF Llama/Mistral directory -> (arch, full AlignerGPT state dict)."""
    arch = arch_from_hf_config(read_hf_config(src_dir))
    return arch, hf_to_megatron(load_hf_state_dict(src_dir), arch)


def export_hf(
    model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    arch: ModelArchConfig,
    tokenizer: Any,
    dst_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a `LlamaForCausalLM` directory (config.json, safetensors, generation_config.json, the
    tokenizer's files) atomically to `dst_dir`. With a model under tensor parallelism every TP
    rank must call this (the weights are gathered); global rank 0 writes. `tokenizer` is a
    `trainer.tokenizer.Tokenizer` (or anything with `.save(dir)`, `bos_id`, `eos_id`,
    `pad_id`), or None to write weights only. `dtype` defaults to the weights' own."""
    if isinstance(model_or_state_dict, torch.nn.Module):
        state = full_state_dict(model_or_state_dict)
    else:
        state = dict(model_or_state_dict)
    distributed = torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        try:
            _write_hf_dir(state, arch, tokenizer, Path(dst_dir), dtype, max_shard_bytes)
        finally:
            if distributed:  # the other ranks wait for the directory (and never hang on an error)
                torch.distributed.barrier()
    else:
        torch.distributed.barrier()
    return Path(dst_dir)


def _write_hf_dir(
    state: dict[str, torch.Tensor],
    arch: ModelArchConfig,
    tokenizer: Any,
    dst: Path,
    dtype: torch.dtype | None,
    max_shard_bytes: int,
) -> None:
    from trainer.checkpoint import write_directory_atomically

    hf_state = megatron_to_hf(state, arch)
    if dtype is None:
        dtype = hf_state["model.embed_tokens.weight"].dtype
    if dtype not in _DTYPE_NAMES:
        raise InvalidArgument("dtype", f"{dtype} is not one of {sorted(_DTYPE_NAMES.values())}")
    hf_state = {k: v.to(dtype) for k, v in hf_state.items()}
    ids = {
        name: getattr(tokenizer, f"{name}_id", None) if tokenizer is not None else None
        for name in ("bos", "eos", "pad")
    }
    config = hf_config_from_arch(
        arch, dtype=dtype, bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]
    )
    generation = {"_from_model_config": True, **{f"{k}_token_id": v for k, v in ids.items() if v is not None}}

    def fill(tmp: Path) -> None:
        save_hf_state_dict(hf_state, tmp, max_shard_bytes)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        # config.json last: a directory with it looks like a complete model.
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    write_directory_atomically(dst, fill)
