"""The one model definition: a Llama-style Megatron-core `GPTModel`, optionally with a value head.

`build_model(arch)` turns a `common.config.ModelArchConfig` into an `AlignerGPT`: RMSNorm,
SwiGLU MLP, RoPE (theta = `rotary_base`), grouped-query attention (`num_query_groups` KV heads),
no biases, tied or untied input/output embeddings, tensor parallel per config. With
`value_head=True` a `Linear(hidden, 1)` reads the final-normed hidden state of every token, so the
same trunk is a reward model (score at the last token) or a critic (a value per token), and logits
and values come from one forward pass (a forward hook on `gpt.decoder` captures the hidden states
on their way to the output layer).

Call `trainer.parallel.init_parallel(...)` before `build_model`.

Parameter names (`AlignerGPT.state_dict()`; `{i}` = layer index; under tensor parallelism each
rank holds its shard: column-parallel weights split on dim 0, row-parallel on dim 1, the
embedding and output layer split on the vocab dim):

    gpt.embedding.word_embeddings.weight                      [V, H]
    gpt.decoder.layers.{i}.input_layernorm.weight             [H]        (RMSNorm)
    gpt.decoder.layers.{i}.self_attention.linear_qkv.weight   [(nh + 2*ng) * d, H]
        rows grouped per KV group: for each of the ng groups, its nh/ng query heads, then its key
        head, then its value head (d = H / nh rows per head)
    gpt.decoder.layers.{i}.self_attention.linear_proj.weight  [H, nh * d]
    gpt.decoder.layers.{i}.pre_mlp_layernorm.weight           [H]        (RMSNorm)
    gpt.decoder.layers.{i}.mlp.linear_fc1.weight              [2 * F, H] (gate rows, then up rows)
    gpt.decoder.layers.{i}.mlp.linear_fc2.weight              [H, F]     (down)
    gpt.decoder.final_layernorm.weight                        [H]
    gpt.output_layer.weight                                   [V, H]     (absent when tied)
    value_head.weight, value_head.bias                        [1, H], [1] (value-head models)

(`state_dict()` may also hold `..._extra_state` entries megatron keeps for checkpoint metadata;
they are not tensors of weights.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.config import ModelArchConfig
from common.errors import InvalidArgument
from trainer.losses import token_logprobs

__all__ = [
    "AlignerGPT",
    "ModelOutput",
    "build_model",
    "transformer_config",
    "recompute_settings",
    "pad_batch",
    "sequence_logprobs",
    "sequence_values",
    "sequence_rewards",
]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _check_arch(arch: ModelArchConfig) -> None:
    positive = (
        "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
        "num_query_groups", "vocab_size", "encoder_seq_length",
    )  # fmt: skip
    for name in positive:
        if int(getattr(arch, name)) < 1:
            raise InvalidArgument(f"model.{name}", f"must be >= 1, got {getattr(arch, name)}")
    if arch.hidden_size % arch.num_attention_heads:
        raise InvalidArgument("model.hidden_size", "must be divisible by model.num_attention_heads")
    if arch.num_attention_heads % arch.num_query_groups:
        raise InvalidArgument("model.num_query_groups", "must divide model.num_attention_heads")
    if arch.num_query_groups % arch.tensor_model_parallel_size:
        raise InvalidArgument("model.tensor_model_parallel_size", "must divide model.num_query_groups")
    if arch.precision not in PRECISIONS:
        raise InvalidArgument(
            "model.precision", f"must be one of {sorted(PRECISIONS)}, got {arch.precision!r}"
        )
    if arch.pipeline_model_parallel_size != 1:
        raise InvalidArgument(
            "model.pipeline_model_parallel_size",
            "only 1 is supported by the model passes (use tensor parallelism)",
        )


def transformer_config(arch: ModelArchConfig):
    """The Megatron `TransformerConfig` of a Llama-style model."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = PRECISIONS[arch.precision]
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=arch.hidden_dropout,
        attention_dropout=arch.attention_dropout,
        tensor_model_parallel_size=arch.tensor_model_parallel_size,
        pipeline_model_parallel_size=arch.pipeline_model_parallel_size,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        # CPU: initialise the full weight on the CPU and slice it per TP rank, so a TP=2 model
        # holds exactly the TP=1 weights for the same seed.
        use_cpu_initialization=not torch.cuda.is_available(),
        # The fused CUDA kernels (and sequence parallelism) are off: they need TE/apex/CUDA.
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        sequence_parallel=False,
        **recompute_settings(arch),
    )


RECOMPUTE_GRANULARITIES = ("selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")


def recompute_settings(arch: ModelArchConfig) -> dict:
    """Megatron's activation-recompute settings from NeMo's keys: `selective` recomputes each
    layer's core attention in the backward pass; `full` recomputes whole layers, in groups of
    `activations_checkpoint_num_layers` (`uniform`) or the first that many layers (`block`).
    `activations_checkpoint: true` is short for full / uniform / 1."""
    granularity = arch.activations_checkpoint_granularity
    if granularity is None:
        granularity = "full" if arch.activations_checkpoint else None
    if granularity is None:
        return {}
    if granularity not in RECOMPUTE_GRANULARITIES:
        raise InvalidArgument(
            "model.activations_checkpoint_granularity",
            f"must be null, selective or full, got {granularity!r}",
        )
    if granularity == "selective":
        return {"recompute_granularity": "selective"}
    method = arch.activations_checkpoint_method or "uniform"
    if method not in RECOMPUTE_METHODS:
        raise InvalidArgument(
            "model.activations_checkpoint_method", f"must be uniform or block, got {method!r}"
        )
    num_layers = arch.activations_checkpoint_num_layers or 1
    if not 1 <= num_layers <= arch.num_layers:
        raise InvalidArgument(
            "model.activations_checkpoint_num_layers",
            f"must be in [1, model.num_layers={arch.num_layers}], got {num_layers}",
        )
    return {"recompute_granularity": "full", "recompute_method": method, "recompute_num_layers": num_layers}


@dataclass
class ModelOutput:
    """`logits`: [B, S, V] next-token logits over the full vocabulary (gathered across TP ranks).
    `values`: [B, S] value-head output per position (float32), None without a value head."""

    logits: torch.Tensor
    values: torch.Tensor | None = None


class AlignerGPT(nn.Module):
    """A Megatron `GPTModel` (`.gpt`) plus an optional value head (`.value_head`).

    `forward(tokens [B, S] long) -> ModelOutput`. Attention is causal, so right padding never
    changes the outputs at real positions."""

    def __init__(self, arch: ModelArchConfig, gpt: nn.Module, value_head: bool):
        super().__init__()
        self.arch = arch
        self.gpt = gpt
        self.value_head = None
        self._hidden: torch.Tensor | None = None
        if value_head:
            dtype = PRECISIONS[arch.precision]
            self.value_head = nn.Linear(
                arch.hidden_size, 1, dtype=dtype, device=gpt.embedding.word_embeddings.weight.device
            )
            # Small weights and a zero bias: initial values/rewards are O(1) around zero.
            nn.init.normal_(self.value_head.weight, std=1.0 / (arch.hidden_size + 1) ** 0.5)
            nn.init.zeros_(self.value_head.bias)
            gpt.decoder.register_forward_hook(self._keep_hidden)

    def _keep_hidden(self, module, args, output):
        # The decoder returns the final-normed hidden states [S, B, H] (sequence first).
        self._hidden = output[0] if isinstance(output, tuple) else output

    @property
    def device(self) -> torch.device:
        return self.gpt.embedding.word_embeddings.weight.device

    def forward(self, tokens: torch.Tensor) -> ModelOutput:
        logits = self.gpt(
            input_ids=tokens, position_ids=None, attention_mask=None, runtime_gather_output=True
        )
        values = None
        if self.value_head is not None:
            hidden, self._hidden = self._hidden, None
            values = self.value_head(hidden).squeeze(-1).transpose(0, 1).float()
        return ModelOutput(logits=logits, values=values)


def build_model(arch: ModelArchConfig, value_head: bool = False, seed: int | None = None) -> AlignerGPT:
    """Build the model on `trainer.parallel.device()`. With `seed`, the initial weights depend only
    on it (the RNGs are reseeded first), the same for any tensor-parallel size on CPU."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from trainer import parallel

    _check_arch(arch)
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("call trainer.parallel.init_parallel() before build_model()")
    if parallel_state.get_tensor_model_parallel_world_size() != arch.tensor_model_parallel_size:
        raise InvalidArgument(
            "model.tensor_model_parallel_size",
            f"{arch.tensor_model_parallel_size} differs from the initialised tensor parallel size "
            f"{parallel_state.get_tensor_model_parallel_world_size()}",
        )
    if seed is not None:
        parallel.reseed(seed)
    config = transformer_config(arch)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.encoder_seq_length,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.share_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=arch.rotary_base,
    )
    # Megatron's torch norms are created in fp32 whatever params_dtype says; in bf16 cast every
    # parameter, as megatron's Float16Module does, so the norms run on bf16 weights too.
    model = AlignerGPT(arch, gpt, value_head).to(device=parallel.device(), dtype=PRECISIONS[arch.precision])
    if model.value_head is not None and parallel_state.get_tensor_model_parallel_world_size() > 1:
        # The head is replicated on every TP rank: start all copies from TP rank 0's weights.
        for p in model.value_head.parameters():
            torch.distributed.broadcast(
                p.data,
                src=parallel_state.get_tensor_model_parallel_src_rank(),
                group=parallel_state.get_tensor_model_parallel_group(),
            )
    return model


# ---------------------------------------------------------------------------------------------
# Ragged passes: lists of 1-D token tensors of different lengths, padded per micro-batch
# ---------------------------------------------------------------------------------------------


def pad_batch(sequences: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D token tensors: -> (tokens [B, max_len] long, lengths [B] long)."""
    if not sequences:
        raise InvalidArgument("sequences", "is empty")
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    tokens = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for i, seq in enumerate(sequences):
        tokens[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return tokens, lengths


def _check_sequences(model: AlignerGPT, sequences, micro_batch_size: int, min_len: int) -> None:
    if micro_batch_size < 1:
        raise InvalidArgument("micro_batch_size", f"must be >= 1, got {micro_batch_size}")
    for i, seq in enumerate(sequences):
        if seq.dim() != 1:
            raise InvalidArgument(f"sequences[{i}]", f"must be 1-D, got shape {tuple(seq.shape)}")
        if len(seq) < min_len:
            raise InvalidArgument(f"sequences[{i}]", f"needs at least {min_len} tokens, got {len(seq)}")
        if len(seq) > model.arch.encoder_seq_length:
            raise InvalidArgument(
                f"sequences[{i}]",
                f"length {len(seq)} exceeds encoder_seq_length {model.arch.encoder_seq_length}",
            )
        if len(seq) and (int(seq.min()) < 0 or int(seq.max()) >= model.arch.vocab_size):
            raise InvalidArgument(f"sequences[{i}]", f"token ids must be in [0, {model.arch.vocab_size})")


def _micro_batches(model: AlignerGPT, sequences, micro_batch_size: int):
    """Yield (first index, lengths, ModelOutput) per micro-batch, in eval mode without grad."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(sequences), micro_batch_size):
                chunk = sequences[start : start + micro_batch_size]
                tokens, lengths = pad_batch(chunk, pad_id=0)
                yield start, lengths, tokens, model(tokens.to(model.device))
    finally:
        model.train(was_training)


def sequence_logprobs(
    model: AlignerGPT, sequences: list[torch.Tensor], micro_batch_size: int
) -> list[torch.Tensor]:
    """Per-token log p(seq[t+1] | seq[:t+1]) for each sequence: a list of float32 CPU tensors of
    length L-1."""
    _check_sequences(model, sequences, micro_batch_size, min_len=1)
    out: list[torch.Tensor] = []
    for _, lengths, tokens, result in _micro_batches(model, sequences, micro_batch_size):
        logp = token_logprobs(result.logits, tokens.to(result.logits.device)).float().cpu()
        out.extend(logp[i, : int(n) - 1] for i, n in enumerate(lengths))
    return out


def _need_value_head(model: AlignerGPT) -> None:
    if model.value_head is None:
        raise InvalidArgument("model", "has no value head (build it with value_head=True)")


def sequence_values(
    model: AlignerGPT, sequences: list[torch.Tensor], micro_batch_size: int
) -> list[torch.Tensor]:
    """Critic values in next-token space: for each sequence, the value at positions 0..L-2
    (the state before predicting token t+1), a float32 CPU tensor of length L-1."""
    _need_value_head(model)
    _check_sequences(model, sequences, micro_batch_size, min_len=1)
    out: list[torch.Tensor] = []
    for _, lengths, _, result in _micro_batches(model, sequences, micro_batch_size):
        values = result.values.cpu()
        out.extend(values[i, : int(n) - 1] for i, n in enumerate(lengths))
    return out


def sequence_rewards(model: AlignerGPT, sequences: list[torch.Tensor], micro_batch_size: int) -> torch.Tensor:
    """Reward-model scores: the value head at each sequence's last token -> float32 CPU [B]."""
    _need_value_head(model)
    _check_sequences(model, sequences, micro_batch_size, min_len=1)
    out: list[torch.Tensor] = []
    for _, lengths, _, result in _micro_batches(model, sequences, micro_batch_size):
        values = result.values.cpu()
        out.append(values[torch.arange(len(lengths)), lengths - 1])
    return torch.cat(out)
