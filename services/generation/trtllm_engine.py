"""The `tensorrt_llm` engine of the generation service: TensorRT-LLM, built once, refitted per
policy version. Same interface as `trainer.engine.TorchEngine` (`generate`, `load_state_dict`,
`policy_version`, `model` for the parameter names and shapes a weight push must carry).

GPU only. `check_available()` says why it cannot run (no CUDA device, TensorRT-LLM not
installed) with `common.errors.Unavailable`; the service calls it before anything else, so
`engine=tensorrt_llm` on a machine without it fails at startup with that message, never a silent
fallback to another engine.

Build: our weights -> a TensorRT-LLM Llama checkpoint (`trainer.trtllm_convert`, plain code with
unit tests) -> `LLaMAForCausalLM.from_checkpoint` -> `tensorrt_llm.build` with
`use_refit=True` -> the Python runtime `ModelRunner` (its session exposes the `ICudaEngine`).
Refit: the new state dict is converted the same way, loaded into a TensorRT-LLM model object,
preprocessed exactly as the build did (`optimize_model_with_config`), and every refittable weight
is set with a `tensorrt.Refitter` on the live engine, under the lock `generate` holds, so a
generation never mixes two versions. (This follows TensorRT-LLM's own `refit` command, which does
the same on a deserialised engine and writes it back to disk.)

Semantics that differ from the torch engine, all inherent to TensorRT-LLM's sampler:
- logprobs are TensorRT-LLM's (of the sampling distribution after temperature), where the torch
  engine reports the raw model distribution; PPO recomputes logprobs on the training model anyway.
- sampling draws from cuRAND: a seed reproduces a sample on this engine, not across engines.
This module is exercised only on a GPU machine with `tensorrt_llm` installed; the conversion it
relies on is tested everywhere (tests/trainer/test_trtllm_convert.py). See docs/generation.md for
the service's tensor contract and the weight pushes this engine serves.
"""

from __future__ import annotations

import importlib.util
import random
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from common.config import ModelArchConfig
from common.errors import InvalidArgument, Unavailable
from trainer import trtllm_convert

if TYPE_CHECKING:  # trainer.engine imports megatron (seconds); the capability check must not wait
    from trainer.engine import GenerationResult, SamplingParams

INSTALL_HINT = "pip install aligner[trtllm] on a GPU image"


def unavailable_reasons() -> list[str]:
    """Why TensorRT-LLM cannot run in this process (empty when it can)."""
    reasons = []
    if not torch.cuda.is_available():
        reasons.append("no CUDA device (torch.cuda.is_available() is False)")
    if importlib.util.find_spec("tensorrt_llm") is None:
        reasons.append(f"package tensorrt_llm is not installed ({INSTALL_HINT})")
    return reasons


def check_available() -> None:
    reasons = unavailable_reasons()
    if reasons:
        raise Unavailable("TensorRT-LLM engine unavailable: " + "; ".join(reasons))


class TrtLlmEngine:
    """TensorRT-LLM generation for one Llama-style model on one GPU."""

    def __init__(
        self,
        model: torch.nn.Module,
        arch: ModelArchConfig,
        max_batch_size: int = 64,
        pad_id: int = 0,
        dtype: str = "float16",
        work_dir: str | Path | None = None,
    ):
        check_available()
        if dtype not in trtllm_convert.DTYPES:
            raise InvalidArgument("dtype", f"must be one of {sorted(trtllm_convert.DTYPES)}, got {dtype!r}")
        self.arch = arch
        self.vocab_size = arch.vocab_size
        self.max_seq_len = arch.encoder_seq_length
        self.pad_id = pad_id
        self.dtype = dtype
        self.policy_version = 0
        self._lock = threading.Lock()
        self._own_dir = work_dir is None
        self.work_dir = Path(tempfile.mkdtemp(prefix="aligner-trtllm-") if work_dir is None else work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)

        checkpoint = trtllm_convert.write_checkpoint(
            model.state_dict(), arch, self.work_dir / "checkpoint", dtype
        )
        self._build(checkpoint, max_batch_size)
        # Keep only the names, shapes and dtypes of our parameters (what a weight push must carry);
        # the weights themselves now live in the engine.
        self.model = model.to("meta")

    # --- build and refit (the only code that touches TensorRT-LLM) ------------------------------

    def _build(self, checkpoint: Path, max_batch_size: int) -> None:
        import tensorrt_llm
        from tensorrt_llm.models import LLaMAForCausalLM
        from tensorrt_llm.runtime import ModelRunner

        trt_model = LLaMAForCausalLM.from_checkpoint(str(checkpoint))
        self._build_config = tensorrt_llm.BuildConfig(
            max_batch_size=max_batch_size,
            max_input_len=self.max_seq_len - 1,
            max_seq_len=self.max_seq_len,
            max_beam_width=1,
        )
        self._build_config.use_refit = True  # keep the weights refittable
        engine = tensorrt_llm.build(trt_model, self._build_config)
        engine_dir = self.work_dir / "engine"
        engine.save(str(engine_dir))
        self._pretrained_config = engine.config.pretrained_config
        self.runner = ModelRunner.from_dir(str(engine_dir))

    def _refit(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        import tensorrt as trt
        from tensorrt_llm._common import _is_building
        from tensorrt_llm._utils import np_dtype_to_trt
        from tensorrt_llm.builder import optimize_model_with_config
        from tensorrt_llm.logger import logger
        from tensorrt_llm.models import LLaMAForCausalLM

        checkpoint = trtllm_convert.write_checkpoint(
            state_dict, self.arch, self.work_dir / "refit", self.dtype
        )

        @_is_building
        def refit() -> None:
            trt_model = LLaMAForCausalLM.from_checkpoint(str(checkpoint), config=self._pretrained_config)
            optimize_model_with_config(trt_model, self._build_config)  # the build's weight preprocessing
            refitter = trt.Refitter(self.runner.session.runtime.engine, logger.trt_logger)
            refittable = set(refitter.get_all_weights())
            done = set()
            for name, param in trt_model.named_parameters():
                if name in refittable:
                    value = param._value  # a numpy array; kept alive until refit_cuda_engine returns
                    weights = trt.Weights(np_dtype_to_trt(value.dtype), value.ctypes.data, value.size)
                    if not refitter.set_named_weights(name, weights):
                        raise RuntimeError(f"TensorRT refused the new value of {name!r}")
                    done.add(name)
            if done != refittable:
                raise RuntimeError(f"refit is missing weights {sorted(refittable - done)[:5]}")
            if not refitter.refit_cuda_engine():
                raise RuntimeError("TensorRT could not refit the engine")

        refit()
        shutil.rmtree(checkpoint, ignore_errors=True)

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Refit the engine with new weights (our names, as `TorchEngine.load_state_dict`)."""
        own = {
            k: v
            for k, v in self.model.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
        }
        if strict:
            missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
            if missing or unexpected:
                raise InvalidArgument(
                    "state_dict", f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
                )
        # Conversion checks every language-model tensor's name and shape before the engine changes.
        trtllm_convert.megatron_to_trtllm(state_dict, self.arch)
        with self._lock:
            self._refit(state_dict)

    # --- generation ----------------------------------------------------------------------------

    def generate(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        on_step: Callable[[int, list[int | None]], None] | None = None,
    ) -> list[GenerationResult]:
        """As `TorchEngine.generate`. Rows are grouped by end id (TensorRT-LLM takes one per
        batch); each group runs to its longest `max_new_tokens`, and rows are cut to their own."""
        if len(prompts) != len(params) or not prompts:
            raise InvalidArgument("params", f"{len(params)} sampling params for {len(prompts)} prompts")
        results: list[GenerationResult | None] = [None] * len(prompts)
        with self._lock:
            groups: dict[int | None, list[int]] = {}
            for i, p in enumerate(params):
                groups.setdefault(p.end_id, []).append(i)
            for end_id, rows in groups.items():
                for i, result in zip(
                    rows,
                    self._generate_group(
                        [prompts[i] for i in rows],
                        [params[i] for i in rows],
                        end_id,
                        on_step,
                        rows,
                        len(prompts),
                    ),
                    strict=True,
                ):
                    results[i] = result
        return results  # type: ignore[return-value]

    def _generate_group(self, prompts, params, end_id, on_step, rows, n_total) -> list[GenerationResult]:
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            if not prompt or len(prompt) + p.max_new_tokens > self.max_seq_len:
                raise InvalidArgument(
                    f"prompts[{rows[i]}]",
                    f"length {len(prompt)} + {p.max_new_tokens} new tokens must be in [1, {self.max_seq_len}]",
                )
        greedy = [p.greedy or p.temperature == 0.0 for p in params]
        kwargs = dict(
            max_new_tokens=max(p.max_new_tokens for p in params),
            end_id=-1 if end_id is None else end_id,  # -1: no token ends a sequence
            pad_id=self.pad_id,
            temperature=torch.tensor(
                [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)]
            ),
            top_k=torch.tensor(
                [1 if g else p.top_k for p, g in zip(params, greedy, strict=True)], dtype=torch.int32
            ),
            top_p=torch.tensor([0.0 if g else p.top_p for p, g in zip(params, greedy, strict=True)]),
            min_length=torch.tensor([p.min_new_tokens for p in params], dtype=torch.int32),
            random_seed=torch.tensor([_seed(p.seed) for p in params], dtype=torch.int64),
            output_log_probs=True,
            output_sequence_lengths=True,
            return_dict=True,
        )
        inputs = [torch.tensor(p, dtype=torch.int32) for p in prompts]
        lengths = [len(p) for p in prompts]
        if on_step is None:
            outputs = self.runner.generate(inputs, **kwargs)
        else:
            outputs = None
            sent = [0] * len(prompts)
            for step, outputs in enumerate(self.runner.generate(inputs, streaming=True, **kwargs)):
                seq = outputs["sequence_lengths"][:, 0].tolist()
                ids = outputs["output_ids"][:, 0]
                tokens: list[int | None] = [None] * n_total
                for j in range(len(prompts)):
                    n = min(seq[j] - lengths[j], params[j].max_new_tokens)
                    if n > sent[j]:
                        tokens[rows[j]] = int(ids[j, lengths[j] + n - 1])
                        sent[j] = n
                on_step(step, tokens)
        return [self._result(outputs, j, lengths[j], params[j], end_id) for j in range(len(prompts))]

    def _result(
        self, outputs, j: int, prompt_len: int, p: SamplingParams, end_id: int | None
    ) -> GenerationResult:
        from trainer.engine import GenerationResult

        tokens, logprobs, ended = row_result(
            outputs["output_ids"][j, 0].tolist(), outputs["log_probs"][j, 0].tolist(),
            int(outputs["sequence_lengths"][j, 0]), prompt_len, p.max_new_tokens, end_id,
        )  # fmt: skip
        return GenerationResult(
            tokens=tokens, logprobs=logprobs, ended=ended, policy_version=self.policy_version
        )

    def close(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)


def row_result(
    ids: list[int],
    logprobs: list[float],
    seq_len: int,
    prompt_len: int,
    max_new_tokens: int,
    end_id: int | None,
) -> tuple[list[int], list[float], bool]:
    """One row of TensorRT-LLM's output (ids and logprobs over all positions, prompt first; its
    sequence length) in our convention: the new tokens only, at most `max_new_tokens` (a batch
    runs to its longest request), the end token included when one was produced, whether or not
    the runtime counted it in the sequence length. -> (tokens, logprobs, ended)"""
    n = min(seq_len - prompt_len, max_new_tokens)
    tokens, lps = ids[prompt_len : prompt_len + n], logprobs[prompt_len : prompt_len + n]
    ended = end_id is not None and bool(tokens) and tokens[-1] == end_id
    after = prompt_len + n
    if end_id is not None and not ended and n < max_new_tokens and after < len(ids) and ids[after] == end_id:
        tokens, lps, ended = tokens + [end_id], lps + [logprobs[after]], True
    return tokens, lps, ended


def _seed(seed: int | None) -> int:
    return random.SystemRandom().getrandbits(63) if seed is None else seed
