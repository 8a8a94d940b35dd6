"""The Triton model: the TensorRT-LLM backend's `tensorrt_llm` tensor contract over our engine.

Inputs and outputs are those of the stock backend (`reference/triton_trtllm_contract.md`), so
one client drives this server and a stock Triton + TensorRT-LLM deployment alike. Two Triton
models are served, as a stock deployment would configure them:

- `<name>`: not decoupled; one response per request (`infer`). Dynamic batching merges
  concurrent requests into one engine call.
- `<name>_stream`: decoupled (`start_stream` / `async_stream_infer`). With `streaming=true` a
  request gets one response per generated token (its new token, its logprob, the running length)
  as soon as the engine produced it; with `streaming=false` one response holding the whole result
  (plus empty ones while other, streaming requests of its batch progress). Either way the
  concatenation of a request's responses is its result; the stream ends with Triton's final flag.

Our one addition is the optional input `policy_version` (INT64 [1]): the policy version the
request needs. The engine lock is held from the version check to the end of generation, and a
weight push takes the same lock, so a request never sees weights older than it asked for, nor a
mix of two versions. A request naming a version newer than the engine's is refused.

Errors. PyTriton reports an exception for the whole dynamic batch it happened in (it has no
per-request error), so a malformed request also fails the requests batched with it; the message
names the input (e.g. `input_ids: token id 600 outside the vocabulary [0, 512)`). Our client
validates the same rules before sending, so its requests never fail this way.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

from common import metrics
from common.errors import InvalidArgument
from services.generation.weights import StaleVersion
from trainer.engine import GenerationResult, SamplingParams

SERVICE = "generation"
STREAM_SUFFIX = "_stream"

# name -> (dtype, shape without the batch dimension, optional)
INPUT_SPECS: dict[str, tuple[type, tuple[int, ...], bool]] = {
    "input_ids": (np.int32, (-1,), False),
    "input_lengths": (np.int32, (1,), False),
    "request_output_len": (np.int32, (1,), False),
    "end_id": (np.int32, (1,), True),
    "pad_id": (np.int32, (1,), True),
    "temperature": (np.float32, (1,), True),
    "runtime_top_k": (np.int32, (1,), True),
    "runtime_top_p": (np.float32, (1,), True),
    "seed": (np.uint64, (1,), True),
    "min_tokens": (np.int32, (1,), True),
    "return_log_probs": (np.bool_, (1,), True),
    "exclude_input_in_output": (np.bool_, (1,), True),
    "streaming": (np.bool_, (1,), True),
    "policy_version": (np.int64, (1,), True),  # ours: the policy version the request needs
}
OUTPUT_SPECS: dict[str, tuple[type, tuple[int, ...]]] = {
    "output_ids": (np.int32, (1, -1)),  # [beam=1, tokens]
    "sequence_length": (np.int32, (1,)),
    "output_log_probs": (np.float32, (1, -1)),
    "cum_log_probs": (np.float32, (1,)),
}
# Requests have prompts of different lengths: Triton's dynamic batcher only merges them when the
# input says it may (as the stock backend's config does for input_ids).
RAGGED_INPUTS = ("input_ids",)


def triton_inputs() -> list[Tensor]:
    return [Tensor(name=n, dtype=d, shape=s, optional=o) for n, (d, s, o) in INPUT_SPECS.items()]


def triton_outputs() -> list[Tensor]:
    return [Tensor(name=n, dtype=d, shape=s) for n, (d, s) in OUTPUT_SPECS.items()]


def model_config(max_batch_size: int, max_queue_delay_us: int, decoupled: bool) -> ModelConfig:
    return ModelConfig(
        max_batch_size=max_batch_size,
        batcher=DynamicBatcher(max_queue_delay_microseconds=max_queue_delay_us),
        decoupled=decoupled,
    )


# ---------------------------------------------------------------------------------------------
# Requests -> engine rows
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One sequence to generate: a request holds one row per batch entry (almost always one)."""

    request: int  # index of its Triton request in the dynamic batch
    prompt: list[int]
    params: SamplingParams
    pad_id: int
    exclude_input: bool
    streaming: bool


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_seq_len: int
    default_end_id: int | None
    default_pad_id: int


def _scalar(request, name: str, batch: int, default):
    """Per-row values of an optional [B, 1] input (or the default when absent)."""
    if name not in request.data:
        return [default] * batch
    array = np.asarray(request[name])
    if array.shape[0] != batch or array.size != batch:
        raise InvalidArgument(name, f"has shape {list(array.shape)}, expected [{batch}, 1]")
    return array.reshape(batch).tolist()


def parse_request(request, index: int, limits: Limits) -> tuple[list[Row], int | None]:
    """Validate one Triton request and turn it into engine rows; also returns the policy version
    it needs (None when it names none). Errors name the Triton input."""
    ids = np.asarray(request["input_ids"])
    if ids.ndim != 2 or ids.shape[0] < 1:
        raise InvalidArgument("input_ids", f"has shape {list(ids.shape)}, expected [batch, tokens]")
    batch = ids.shape[0]
    lengths = _scalar(request, "input_lengths", batch, None)
    max_new = _scalar(request, "request_output_len", batch, None)
    end_ids = _scalar(
        request, "end_id", batch, -1 if limits.default_end_id is None else limits.default_end_id
    )
    pad_ids = _scalar(request, "pad_id", batch, limits.default_pad_id)
    temperature = _scalar(request, "temperature", batch, 1.0)
    top_k = _scalar(request, "runtime_top_k", batch, 0)
    top_p = _scalar(request, "runtime_top_p", batch, 1.0)
    seeds = _scalar(request, "seed", batch, None)
    min_tokens = _scalar(request, "min_tokens", batch, 0)
    exclude = _scalar(request, "exclude_input_in_output", batch, False)
    streaming = _scalar(request, "streaming", batch, False)
    versions = _scalar(request, "policy_version", batch, None)

    rows = []
    for b in range(batch):
        n = int(lengths[b])
        if not 1 <= n <= ids.shape[1]:
            raise InvalidArgument(
                "input_lengths", f"{n} must be in [1, {ids.shape[1]}] (the width of input_ids)"
            )
        prompt = ids[b, :n].tolist()
        bad = [t for t in prompt if not 0 <= t < limits.vocab_size]
        if bad:
            raise InvalidArgument(
                "input_ids", f"token id {bad[0]} outside the vocabulary [0, {limits.vocab_size})"
            )
        new = int(max_new[b])
        if new < 1:
            raise InvalidArgument("request_output_len", f"must be >= 1, got {new}")
        if n + new > limits.max_seq_len:
            raise InvalidArgument(
                "request_output_len",
                f"input length {n} + request_output_len {new} exceeds the model's maximum {limits.max_seq_len}",
            )
        end_id = int(end_ids[b])
        if not -1 <= end_id < limits.vocab_size:
            raise InvalidArgument("end_id", f"{end_id} must be -1 (none) or in [0, {limits.vocab_size})")
        pad_id = int(pad_ids[b])
        t, k, p, m = float(temperature[b]), int(top_k[b]), float(top_p[b]), int(min_tokens[b])
        if not t >= 0.0:
            raise InvalidArgument("temperature", f"must be >= 0, got {t}")
        if k < 0:
            raise InvalidArgument("runtime_top_k", f"must be >= 0, got {k}")
        if not 0.0 < p <= 1.0:
            raise InvalidArgument("runtime_top_p", f"must be in (0, 1], got {p}")
        if not 0 <= m <= new:
            raise InvalidArgument("min_tokens", f"must be in [0, request_output_len={new}], got {m}")
        params = SamplingParams(
            max_new_tokens=new, min_new_tokens=m, temperature=t, top_k=k, top_p=p, greedy=t == 0.0 or k == 1,
            end_id=None if end_id < 0 else end_id, seed=None if seeds[b] is None else int(seeds[b]),
        )  # fmt: skip
        rows.append(Row(index, prompt, params, pad_id, bool(exclude[b]), bool(streaming[b])))
    needed = [int(v) for v in versions if v is not None]
    return rows, max(needed) if needed else None


# ---------------------------------------------------------------------------------------------
# Engine results -> responses
# ---------------------------------------------------------------------------------------------


def _response(
    rows: list[Row], tokens: list[list[int]], logprobs: list[list[float]], cum: list[float]
) -> dict:
    """One request's outputs from its rows' token lists (padded across rows, beam width 1)."""
    width = max(len(t) for t in tokens)
    output_ids = np.zeros((len(rows), 1, width), dtype=np.int32)
    output_log_probs = np.zeros((len(rows), 1, max(len(lp) for lp in logprobs)), dtype=np.float32)
    for i, row in enumerate(rows):
        output_ids[i, 0, :] = row.pad_id
        output_ids[i, 0, : len(tokens[i])] = tokens[i]
        output_log_probs[i, 0, : len(logprobs[i])] = logprobs[i]
    return {
        "output_ids": output_ids,
        "sequence_length": np.array([[len(t)] for t in tokens], dtype=np.int32),
        "output_log_probs": output_log_probs,
        "cum_log_probs": np.array([[c] for c in cum], dtype=np.float32),
    }


def final_response(rows: list[Row], results: list[GenerationResult]) -> dict:
    """The whole result: prompt + completion (or the completion alone with
    exclude_input_in_output); logprobs of the generated tokens."""
    tokens = [
        (r.tokens if row.exclude_input else row.prompt + r.tokens)
        for row, r in zip(rows, results, strict=True)
    ]
    logprobs = [r.logprobs for r in results]
    return _response(rows, tokens, logprobs, [float(sum(r.logprobs)) for r in results])


def empty_response(rows: list[Row], lengths: list[int], cum: list[float]) -> dict:
    return _response(rows, [[] for _ in rows], [[] for _ in rows], cum) | {
        "sequence_length": np.array([[n] for n in lengths], dtype=np.int32)
    }


# ---------------------------------------------------------------------------------------------
# The inference callables
# ---------------------------------------------------------------------------------------------


class GenerationModel:
    """The infer functions of both Triton models around one engine. `lock` is shared with the
    weight updater; `engine_name` labels the metrics."""

    def __init__(self, engine, lock: threading.Lock, limits: Limits, engine_name: str):
        self.engine = engine
        self.lock = lock
        self.limits = limits
        self.engine_name = engine_name

    def _parse(self, requests) -> tuple[list[Row], int | None]:
        rows, needed = [], []
        for i, request in enumerate(requests):
            request_rows, version = parse_request(request, i, self.limits)
            rows.extend(request_rows)
            if version is not None:
                needed.append(version)
        metrics.REQUESTS_PER_BATCH.labels(SERVICE).observe(len(requests))
        metrics.BATCH_SIZE.labels(SERVICE).observe(len(rows))
        return rows, max(needed) if needed else None

    def _generate(
        self, rows: list[Row], needed: int | None, on_step: Callable | None = None
    ) -> list[GenerationResult]:
        start = time.perf_counter()
        with self.lock:  # held from the version check to the last token (see the module doc)
            if needed is not None and needed > self.engine.policy_version:
                raise StaleVersion(
                    f"policy_version: the request needs policy version {needed}, but the engine "
                    f"serves version {self.engine.policy_version}"
                )
            results = self.engine.generate(
                [r.prompt for r in rows], [r.params for r in rows], on_step=on_step
            )
        elapsed = time.perf_counter() - start
        generated = sum(len(r.tokens) for r in results)
        metrics.TOKENS_GENERATED.labels(self.engine_name).inc(generated)
        metrics.GENERATION_TOKENS_PER_SECOND.labels(self.engine_name).set(generated / max(elapsed, 1e-9))
        metrics.SEQUENCES_PROCESSED.labels(SERVICE).inc(len(rows))
        return results

    @staticmethod
    def _by_request(rows: list[Row], n_requests: int) -> list[list[int]]:
        groups: list[list[int]] = [[] for _ in range(n_requests)]
        for i, row in enumerate(rows):
            groups[row.request].append(i)
        return groups

    def infer(self, requests) -> list[dict]:
        """The non-decoupled model: one response per request."""
        rows, needed = self._parse(requests)
        if any(row.streaming for row in rows):
            raise InvalidArgument(
                "streaming", "needs the decoupled model (the one named with the _stream suffix)"
            )
        results = self._generate(rows, needed)
        return [
            final_response([rows[i] for i in group], [results[i] for i in group])
            for group in self._by_request(rows, len(requests))
        ]

    async def infer_stream(self, requests) -> AsyncIterator[list[dict]]:
        """The decoupled model. The engine runs in a thread; its per-step tokens come back
        through a queue, so this handler's event loop is free to send responses meanwhile."""
        rows, needed = self._parse(requests)
        groups = self._by_request(rows, len(requests))
        steps: queue.Queue = queue.Queue()
        cancelled = threading.Event()

        def on_step(step: int, tokens: list[int | None]) -> None:
            if cancelled.is_set():
                raise RuntimeError("generation cancelled: the stream was closed")
            steps.put(("step", tokens))

        def run() -> None:
            try:
                steps.put(("done", self._generate(rows, needed, on_step)))
            except BaseException as exc:  # noqa: BLE001 - handed over to the handler below
                steps.put(("error", exc))

        threading.Thread(target=run, name="generate-stream", daemon=True).start()
        loop = asyncio.get_running_loop()
        counts = [0] * len(rows)
        try:
            while True:
                kind, payload = await loop.run_in_executor(None, steps.get)
                if kind == "error":
                    raise payload
                if kind == "done":
                    yield [self._stream_final(*_pick(g, rows, payload, counts)) for g in groups]
                    return
                for i, token in enumerate(payload):
                    counts[i] += token is not None
                if any(row.streaming and token is not None for row, token in zip(rows, payload, strict=True)):
                    yield [self._stream_step(*_pick(g, rows, payload, counts)) for g in groups]
        finally:
            cancelled.set()

    @staticmethod
    def _stream_step(rows: list[Row], tokens: list[int | None], counts: list[int]) -> dict:
        """A step response: streaming rows get their new token and running length; the others
        nothing yet. The logprobs of streamed tokens come with the last response (the engine
        reports them at the end of the call)."""
        new = [[t] if (row.streaming and t is not None) else [] for row, t in zip(rows, tokens, strict=True)]
        lengths = [c if row.streaming else 0 for row, c in zip(rows, counts, strict=True)]
        return _response(rows, new, [[] for _ in rows], [0.0] * len(rows)) | {
            "sequence_length": np.array([[n] for n in lengths], dtype=np.int32)
        }

    @staticmethod
    def _stream_final(rows: list[Row], results: list[GenerationResult], sent: list[int]) -> dict:
        """The last response: for streaming rows the tokens not streamed yet (normally none) and
        all the logprobs; for the others the whole result, as the non-decoupled model gives it."""
        tokens = [
            r.tokens[n:] if row.streaming else (r.tokens if row.exclude_input else row.prompt + r.tokens)
            for row, r, n in zip(rows, results, sent, strict=True)
        ]
        out = _response(
            rows, tokens, [r.logprobs for r in results], [float(sum(r.logprobs)) for r in results]
        )
        lengths = [
            len(r.tokens) if row.streaming else len(t)
            for row, r, t in zip(rows, results, tokens, strict=True)
        ]
        out["sequence_length"] = np.array([[n] for n in lengths], dtype=np.int32)
        return out


def _pick(indices: list[int], *lists: list) -> tuple[list, ...]:
    """The entries at `indices` of each list (one request's rows out of the whole batch)."""
    return tuple([values[i] for i in indices] for values in lists)
