"""A lean decode step for the Llama-style `GPTModel`: the engine's optional fast path.

Megatron's module stack costs a fixed few milliseconds of Python per forward call (about 45
module calls, 20 autograd-function applications, and the re-rotation of every cached key at every
step), which dominates one-token decode steps of small models on CPU. `FusedDecoder` computes the
same decode step in a handful of tensor operations, reading the GPTModel's own parameters (so
weight loads apply to it at once), continuing from the KV cache that the GPTModel prefill wrote
into megatron's `StaticInferenceContext`. Tests check it against the GPTModel decode step.

It covers exactly the model `trainer.model.build_model` makes (RMSNorm, SwiGLU, RoPE, GQA, no
biases, tied or untied output) at tensor-parallel size 1; `unsupported()` names what else a model
uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unsupported(gpt: torch.nn.Module) -> str | None:
    """Why `gpt` cannot use the fused decode step, or None when it can."""
    from megatron.core import parallel_state
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    cfg = gpt.config
    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        return "tensor parallel size > 1"
    if parallel_state.get_pipeline_model_parallel_world_size() != 1:
        return "pipeline parallel size > 1"
    checks = {
        "position_embedding_type == 'rope'": gpt.position_embedding_type == "rope",
        "normalization == 'RMSNorm'": cfg.normalization == "RMSNorm",
        "gated_linear_unit (SwiGLU)": cfg.gated_linear_unit and cfg.activation_func is F.silu,
        "no linear biases": not cfg.add_bias_linear and not cfg.add_qkv_bias,
        "no qk layernorm": not cfg.qk_layernorm,
        "rotary_percent == 1": getattr(gpt.rotary_pos_emb, "inv_freq", None) is not None
        and 2 * gpt.rotary_pos_emb.inv_freq.numel() == cfg.kv_channels,
        "non-interleaved rotary": not cfg.rotary_interleaved,
        "no query-key layer scaling": not cfg.apply_query_key_layer_scaling,
        "no sliding window": cfg.window_size is None,
        "pre-norm residuals": not cfg.apply_residual_connection_post_layernorm
        and not cfg.fp32_residual_connection,
        "plain norm weights": not cfg.layernorm_zero_centered_gamma,
        "vanilla softmax": cfg.softmax_type == "vanilla",
        "no multi-token prediction": not getattr(gpt, "mtp_process", False),
        "no multi-latent attention": not cfg.multi_latent_attention,
        "no attention output gate": not getattr(cfg, "attention_output_gate", False),
        "dense MLP (no experts)": cfg.num_moe_experts is None,
        "local attention spec": all(
            isinstance(layer.self_attention.core_attention, DotProductAttention)
            for layer in gpt.decoder.layers
        ),
    }
    failed = [name for name, ok in checks.items() if not ok]
    return f"needs {', '.join(failed)}" if failed else None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as megatron applies it (non-interleaved halves): x * cos + rotate_half(x) * sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class FusedDecoder:
    """One-token decode steps of `gpt`, continuing from a `StaticInferenceContext` that the
    GPTModel prefilled.

    `start` takes the prefilled keys and values over into the decoder's own cache, laid out
    [B, G, S, d] for attention (rotated keys, so no key is rotated twice), with the padding slots
    masked; `step` feeds one token per row; `select` drops finished rows."""

    def __init__(self, gpt: torch.nn.Module, max_len: int):
        reason = unsupported(gpt)
        if reason is not None:
            raise ValueError(f"fused decode: this model {reason}")
        cfg = gpt.config
        self.gpt, self.max_len = gpt, max_len
        self.heads, self.groups, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_query_groups,
            cfg.kv_channels,
        )
        self.eps = cfg.layernorm_epsilon
        self.scale = gpt.decoder.layers[0].self_attention.core_attention.softmax_scale
        self.dtype = gpt.embedding.word_embeddings.weight.dtype
        # Megatron's own rotary angles, cos/sin computed in fp32 and cast as megatron does.
        angles = gpt.rotary_pos_emb(max_len).reshape(max_len, -1).float()
        self.cos, self.sin = angles.cos().to(self.dtype), angles.sin().to(self.dtype)
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mask: torch.Tensor | None = None

    def start(self, context, prefilled: int, pad: torch.Tensor | None) -> None:
        """Take over the first `prefilled` slots of `context` (megatron keeps keys un-rotated,
        [S, B, G, d]); `pad` [B] = leading padding slots per row, or None."""
        cos, sin = self.cos[:prefilled, None, None], self.sin[:prefilled, None, None]
        for number, (keys, values) in context.key_value_memory_dict.items():
            batch = keys.size(1)
            k = keys.new_empty(batch, self.groups, self.max_len, self.head_dim)
            v = torch.empty_like(k)
            k[:, :, :prefilled] = _rotate(keys[:prefilled], cos, sin).permute(1, 2, 0, 3)
            v[:, :, :prefilled] = values[:prefilled].permute(1, 2, 0, 3)
            self.cache[number] = (k, v)
        context.key_value_memory_dict.clear()  # the decoder owns the cache from here on
        self.mask = None
        if pad is not None:  # additive: -inf on each row's padding slots
            slots = torch.arange(self.max_len, device=pad.device)
            blocked = (slots < pad.unsqueeze(1)).view(-1, 1, 1, self.max_len)
            self.mask = torch.zeros(blocked.shape, dtype=self.dtype, device=pad.device).masked_fill(
                blocked, float("-inf")
            )

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the rows `keep` (indices) in the cache and the mask."""
        self.cache = {n: (k[keep], v[keep]) for n, (k, v) in self.cache.items()}
        if self.mask is not None:
            self.mask = self.mask[keep]

    def step(self, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        """Logits [B, V] (float32) after feeding `tokens` [B] at cache slot `slot`."""
        gpt, batch = self.gpt, tokens.size(0)
        groups, per_group, d = self.groups, self.heads // self.groups, self.head_dim
        cos, sin = self.cos[slot], self.sin[slot]
        mask = None if self.mask is None else self.mask[..., : slot + 1]

        hidden = F.embedding(tokens, gpt.embedding.word_embeddings.weight)  # [B, H]
        for number, layer in enumerate(gpt.decoder.layers, start=1):
            attn, mlp = layer.self_attention, layer.mlp
            x = F.rms_norm(hidden, hidden.shape[-1:], layer.input_layernorm.weight, self.eps)
            # linear_qkv rows are grouped per KV group: its query heads, then its key, its value.
            qkv = F.linear(x, attn.linear_qkv.weight).view(batch, groups, per_group + 2, d)
            keys, values = self.cache[number]  # [B, G, S, d]
            keys[:, :, slot] = _rotate(qkv[:, :, per_group], cos, sin)
            values[:, :, slot] = qkv[:, :, per_group + 1]
            # The query heads of a group attend together, as a length-`per_group` query sequence.
            out = F.scaled_dot_product_attention(
                _rotate(qkv[:, :, :per_group], cos, sin),
                keys[:, :, : slot + 1],
                values[:, :, : slot + 1],
                attn_mask=mask,
                scale=self.scale,
            )
            hidden = hidden + F.linear(out.reshape(batch, -1), attn.linear_proj.weight)
            x = F.rms_norm(hidden, hidden.shape[-1:], layer.pre_mlp_layernorm.weight, self.eps)
            gate, up = F.linear(x, mlp.linear_fc1.weight).chunk(2, dim=-1)
            hidden = hidden + F.linear(F.silu(gate) * up, mlp.linear_fc2.weight)
        hidden = F.rms_norm(hidden, hidden.shape[-1:], gpt.decoder.final_layernorm.weight, self.eps)
        output = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
        return F.linear(hidden, output if output is not None else gpt.output_layer.weight).float()
