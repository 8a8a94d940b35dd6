"""KV-cached batched sampling on the Megatron-core model: the `torch` engine of the generation
service.

One `generate` call runs a batch of prompts of different lengths to completion:

1. Prefill. Prompts are left-padded to the longest one, P tokens, and run in one forward pass
   that fills megatron's `StaticInferenceContext` KV cache (slots 0..P-1). An explicit attention
   mask hides each row's padding slots (and the future), so padding never reaches a real token.
2. Decode. One token per step for every row: the token sampled at the previous step is written
   at the next cache slot (`sequence_len_offset`), again with the padding slots masked.

Why left padding is exact. The static context has one sequence offset for the whole batch, and
RoPE takes each token's angle from its cache slot, so row i's real tokens sit at positions
shifted by its padding, (P - L_i). Rotary attention scores depend only on the distance between
query and key, so a uniform shift of a row changes nothing but floating-point rounding, and the
masked slots get exactly zero attention weight. (A model with learned absolute position
embeddings gets its true positions from `position_ids`, which carry each row's real positions.)
The result for a prompt therefore equals running it alone, up to rounding; the tests check that
greedy outputs are identical.

Rows that finish (end id or their own max_new_tokens) are dropped from the batch and from the KV
cache, and the loop stops when every row has finished.

Decode paths (`decode=`): "megatron" (default) runs every step through the GPTModel with the
static context, for any model megatron builds (tensor parallel included). "fused"
(`trainer.fused_decode`) runs the decode steps as a few plain tensor operations on the same
parameters, continuing from the GPTModel prefill's KV cache: the same results (tests compare
the two), about 3x faster on small models where megatron's per-call overhead dominates; Llama-style
models at tensor-parallel size 1 only.

Logprobs: `GenerationResult.logprobs[t]` is log softmax(logits)[token_t] of the raw model
logits, i.e. under the model's own distribution: no temperature, top-k, top-p or min-length
masking. That is what the PPO trainer recomputes with the same weights.

Randomness: each request has its own `torch.Generator` seeded with `SamplingParams.seed` (a
fresh random seed when None), so the same seed gives the same tokens whatever else is batched
with it.

Tensor parallelism: every rank calls `generate` with the same inputs and explicit seeds (the
logits are gathered, so the ranks sample the same tokens), and `sync` is set to the group's
"the leader's value on every rank" (`services.tensor_parallel.ModelGroup.share`). At every step
the ranks then take the leader's tokens and the leader's decision to cancel (its `on_step`
raised), so every rank drops the same rows and stops at the same step, whatever the rounding:
one rank leaving the loop early would leave the others waiting in a collective forever.

Weights: `load_state_dict` copies into the existing parameters (same tensors, no rebuild),
under the lock that `generate` holds for a whole call, so a generation never mixes two weight
versions. `generate` calls are serialised by the same lock.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from common.errors import InvalidArgument
from trainer import fused_decode, sampling


@dataclass
class SamplingParams:
    """How to sample one request. temperature 0 means greedy."""

    max_new_tokens: int
    min_new_tokens: int = 0  # the end id is masked until this many tokens exist
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    greedy: bool = False
    end_id: int | None = None
    seed: int | None = None  # None = a fresh random seed


class GenerationCancelled(RuntimeError):
    """A tensor-parallel follower's generation, stopped because the leader's was cancelled."""


@dataclass
class GenerationResult:
    tokens: list[int]  # new tokens only, including the end token if produced
    logprobs: list[float]  # log p(token) under the raw model distribution (no temperature/filters)
    ended: bool  # produced end_id
    policy_version: int = 0  # the engine's policy_version when this generation ran


def _validate(prompts, params, vocab_size: int, max_seq_len: int) -> None:
    if len(prompts) != len(params):
        raise InvalidArgument("params", f"{len(params)} sampling params for {len(prompts)} prompts")
    if not prompts:
        raise InvalidArgument("prompts", "no prompts")
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        if len(prompt) == 0:
            raise InvalidArgument(f"prompts[{i}]", "empty prompt")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise InvalidArgument(
                f"prompts[{i}]", f"token id {bad[0]} outside the vocabulary [0, {vocab_size})"
            )
        if p.max_new_tokens < 1:
            raise InvalidArgument(f"params[{i}].max_new_tokens", f"must be >= 1, got {p.max_new_tokens}")
        if not 0 <= p.min_new_tokens <= p.max_new_tokens:
            raise InvalidArgument(
                f"params[{i}].min_new_tokens",
                f"must be in [0, max_new_tokens={p.max_new_tokens}], got {p.min_new_tokens}",
            )
        if len(prompt) + p.max_new_tokens > max_seq_len:
            raise InvalidArgument(
                f"params[{i}].max_new_tokens",
                f"prompt ({len(prompt)}) + max_new_tokens ({p.max_new_tokens}) exceeds max_seq_len {max_seq_len}",
            )
        if not p.temperature >= 0.0:  # also rejects NaN
            raise InvalidArgument(f"params[{i}].temperature", f"must be >= 0, got {p.temperature}")
        if p.top_k < 0:
            raise InvalidArgument(f"params[{i}].top_k", f"must be >= 0, got {p.top_k}")
        if not 0.0 < p.top_p <= 1.0:
            raise InvalidArgument(f"params[{i}].top_p", f"must be in (0, 1], got {p.top_p}")
        if p.end_id is not None and not 0 <= p.end_id < vocab_size:
            raise InvalidArgument(
                f"params[{i}].end_id", f"{p.end_id} outside the vocabulary [0, {vocab_size})"
            )


@dataclass
class _Rows:
    """Per-row sampling state of the requests still in the batch (row j is request index[j])."""

    index: torch.Tensor  # [B] request index
    temperature: torch.Tensor  # [B] float
    top_k: torch.Tensor  # [B] int, 0 = off
    top_p: torch.Tensor  # [B] float, 1 = off
    greedy: torch.Tensor  # [B] bool
    end_id: torch.Tensor  # [B] int, -1 = none
    min_new: torch.Tensor  # [B] int
    uniforms: torch.Tensor  # [B, steps] float32: request's draws from its own generator

    @classmethod
    def build(cls, params: list[SamplingParams], steps: int, make_generator, device) -> _Rows:
        greedy = [p.greedy or p.temperature == 0.0 for p in params]
        uniforms = torch.zeros(len(params), steps, device=device)
        for i, (p, g) in enumerate(zip(params, greedy, strict=True)):
            if not g:
                uniforms[i, : p.max_new_tokens] = sampling.draw_uniforms(
                    make_generator(p.seed), p.max_new_tokens, device
                )

        def tensor(values, dtype=None):
            return torch.tensor(values, device=device, dtype=dtype)

        return cls(
            index=torch.arange(len(params), device=device),
            temperature=tensor([1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)]),
            top_k=tensor([0 if g else p.top_k for p, g in zip(params, greedy, strict=True)]),
            top_p=tensor([1.0 if g else p.top_p for p, g in zip(params, greedy, strict=True)]),
            greedy=tensor(greedy, torch.bool),
            end_id=tensor([-1 if p.end_id is None else p.end_id for p in params]),
            min_new=tensor([p.min_new_tokens for p in params]),
            uniforms=uniforms,
        )

    def select(self, keep: torch.Tensor) -> _Rows:
        return _Rows(**{f.name: getattr(self, f.name)[keep] for f in dataclasses.fields(self)})


class TorchEngine:
    """Batched KV-cached sampling on a Megatron-core GPT model (CPU or CUDA).

    `model` is a `GPTModel` or a module holding one as `.gpt` (trainer.model.AlignerGPT); the
    device and dtype are the model's. `policy_version` tags results; set it with
    `load_state_dict(..., policy_version=v)` (atomic with the weights) or assign it directly.
    """

    def __init__(
        self, model: torch.nn.Module, max_seq_len: int, pad_id: int = 0, device=None, decode: str = "megatron"
    ):
        self.model = model
        self.gpt = getattr(model, "gpt", model)
        param = next(self.gpt.parameters())
        if device is not None and torch.device(device) != param.device:
            raise InvalidArgument("device", f"{device} differs from the model's device {param.device}")
        self.device = param.device
        self.vocab_size = int(self.gpt.vocab_size)
        if max_seq_len < 2:
            raise InvalidArgument("max_seq_len", f"must be >= 2, got {max_seq_len}")
        if not 0 <= pad_id < self.vocab_size:
            raise InvalidArgument("pad_id", f"{pad_id} outside the vocabulary [0, {self.vocab_size})")
        if decode not in ("megatron", "fused"):
            raise InvalidArgument("decode", f"must be 'megatron' or 'fused', got {decode!r}")
        if decode == "fused" and (reason := fused_decode.unsupported(self.gpt)) is not None:
            raise InvalidArgument("decode", f"'fused' is unavailable: the model {reason}")
        self.decode = decode
        self.max_seq_len = max_seq_len
        self.pad_id = pad_id
        self.policy_version = 0
        # Tensor parallelism: the leader's value on every rank (see the module doc); None alone.
        self.sync: Callable[[Any], Any] | None = None
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------------------
    # Weights
    # ----------------------------------------------------------------------------------------

    def load_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, policy_version: int | None = None
    ) -> None:
        """Copy `state_dict` into the model's existing weight tensors (no rebuild, same storage;
        values are cast to each weight's dtype and device), and set `policy_version` if given.

        Names and shapes are checked before anything is copied, so a bad state dict leaves the
        old weights intact. `strict`: every weight must be present. Megatron's `_extra_state`
        entries (checkpoint metadata, not weights) are ignored. Waits for a running `generate`
        to finish, and the next `generate` sees all of the new weights."""
        own = {k: v for k, v in self.model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
        incoming = {k: v for k, v in state_dict.items() if not k.endswith("_extra_state")}
        unexpected = sorted(k for k in incoming if k not in own)
        missing = sorted(k for k in own if k not in incoming) if strict else []
        if missing or unexpected:
            raise InvalidArgument(
                "state_dict", f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
            )
        for name, value in incoming.items():
            if not isinstance(value, torch.Tensor):
                raise InvalidArgument(f"state_dict[{name!r}]", f"is a {type(value).__name__}, not a tensor")
            if value.shape != own[name].shape:
                raise InvalidArgument(
                    f"state_dict[{name!r}]",
                    f"shape {tuple(value.shape)} != model shape {tuple(own[name].shape)}",
                )
        with self._lock, torch.no_grad():
            for name, value in incoming.items():
                own[name].copy_(value)
            if policy_version is not None:
                self.policy_version = policy_version

    # ----------------------------------------------------------------------------------------
    # Generation
    # ----------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        on_step: Callable[[int, list[int | None]], None] | None = None,
    ) -> list[GenerationResult]:
        """Sample a continuation of every prompt.

        `on_step(step, tokens)` is called after every decoding step; `tokens[i]` is the token
        that request i got at this step, or None when it had already finished. An exception it
        raises aborts the whole call (use it to cancel)."""
        _validate(prompts, params, self.vocab_size, self.max_seq_len)
        with self._lock, torch.inference_mode():
            was_training = self.gpt.training
            self.gpt.eval()  # megatron uses the KV cache only in eval mode
            try:
                return self._generate(prompts, params, on_step)
            finally:
                self.gpt.train(was_training)

    def _generate(self, prompts, params, on_step) -> list[GenerationResult]:
        dev, n = self.device, len(prompts)
        steps = max(p.max_new_tokens for p in params)
        rows = _Rows.build(params, steps, self._generator, dev)
        # Flags fixed for the whole call: skip work no request needs.
        filtering = any(
            not p.greedy and (p.temperature not in (0.0, 1.0) or p.top_k or p.top_p < 1.0) for p in params
        )
        min_steps = max((p.min_new_tokens for p in params if p.end_id is not None), default=0)

        # Left-pad to the longest prompt; `pad` = padding slots per row.
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        longest = int(lengths.max())
        pad = longest - lengths
        slots = torch.arange(longest, device=dev)
        tokens = torch.full((n, longest), self.pad_id, dtype=torch.long, device=dev)
        for i, prompt in enumerate(prompts):
            tokens[i, longest - len(prompt) :] = torch.tensor(prompt, device=dev)
        positions = (slots.unsqueeze(0) - pad.unsqueeze(1)).clamp(min=0)
        padded = bool((pad > 0).any())
        mask = None  # None: megatron's own causal mask (no padding anywhere)
        if padded:  # True = masked: a padding key, or a key after the query
            mask = (slots.view(1, 1, 1, -1) < pad.view(-1, 1, 1, 1)) | (
                slots.view(1, 1, -1, 1) < slots.view(1, 1, 1, -1)
            )

        # Slots for the longest prompt plus the longest continuation. This may exceed max_seq_len
        # (a short prompt with many new tokens next to a long one with few), but no row spans more
        # than its own prompt + max_new_tokens <= max_seq_len, and RoPE only sees distances.
        context = StaticInferenceContext(n, longest + steps - 1)
        logits = self._forward(tokens, positions, mask, context)
        context.sequence_len_offset += longest
        context.enable_decode_mode()
        fused = None
        if self.decode == "fused":
            fused = fused_decode.FusedDecoder(self.gpt, longest + steps - 1)
            fused.start(context, longest, pad if padded else None)

        out_tokens: list[list[int]] = [[] for _ in range(n)]
        out_logprobs: list[list[float]] = [[] for _ in range(n)]
        ended = [False] * n
        for step in range(steps):
            model_logprobs = logits.log_softmax(dim=-1)
            dist = model_logprobs
            if step < min_steps:  # the end token is not allowed before the row's minimum length
                logits = sampling.mask_token(logits, rows.end_id, (rows.end_id >= 0) & (step < rows.min_new))
            if filtering or step < min_steps:
                dist = sampling.process_logits(logits, rows.temperature, rows.top_k, rows.top_p)
            new = sampling.sample(dist, rows.uniforms[:, step], rows.greedy)
            cancel: BaseException | None = None
            if on_step is not None:
                per_request: list[int | None] = [None] * n
                for i, token in zip(rows.index.tolist(), new.tolist(), strict=True):
                    per_request[i] = token
                try:
                    on_step(step, per_request)
                except BaseException as exc:  # noqa: BLE001 - raised below, once the ranks agree
                    cancel = exc
            if self.sync is not None:  # every rank takes the leader's tokens and decision
                shared, cancelled = self.sync((new.tolist(), cancel is not None))
                new = torch.tensor(shared, dtype=new.dtype, device=dev)
                if cancelled and cancel is None:
                    cancel = GenerationCancelled("the leader rank cancelled this generation")
            if cancel is not None:
                raise cancel
            new_logprobs = sampling.token_logprobs(model_logprobs, new)

            finished = []
            for i, token, logprob in zip(
                rows.index.tolist(), new.tolist(), new_logprobs.tolist(), strict=True
            ):
                out_tokens[i].append(token)
                out_logprobs[i].append(logprob)
                ended[i] = token == params[i].end_id
                finished.append(ended[i] or len(out_tokens[i]) == params[i].max_new_tokens)
            if all(finished):
                break
            if any(finished):
                # Drop finished rows from the batch and from the KV cache.
                keep = torch.tensor([not f for f in finished], device=dev).nonzero().squeeze(1)
                if fused is not None:
                    fused.select(keep)
                for layer, (k, v) in context.key_value_memory_dict.items():
                    context.key_value_memory_dict[layer] = (k[:, keep], v[:, keep])
                rows, new, pad = rows.select(keep), new[keep], pad[keep]

            slot = context.sequence_len_offset
            if fused is not None:
                logits = fused.step(new, slot)
            else:
                step_mask = None
                if padded:
                    step_mask = torch.arange(slot + 1, device=dev).view(1, 1, 1, -1) < pad.view(-1, 1, 1, 1)
                logits = self._forward(new.unsqueeze(1), (slot - pad).unsqueeze(1), step_mask, context)
            context.sequence_len_offset += 1

        return [
            GenerationResult(tokens=t, logprobs=lp, ended=e, policy_version=self.policy_version)
            for t, lp, e in zip(out_tokens, out_logprobs, ended, strict=True)
        ]

    def _forward(self, tokens, positions, mask, context) -> torch.Tensor:
        """Logits of the last position of every row, [B, V] float32."""
        logits = self.gpt(tokens, positions, mask, inference_context=context, runtime_gather_output=True)
        return logits[:, -1, :].float()

    def _generator(self, seed: int | None) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(random.SystemRandom().getrandbits(63) if seed is None else seed)
        return gen
