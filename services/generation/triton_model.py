"""The Triton model: the TensorRT-LLM backend's `tensorrt_llm` tensor contract over our engine.

Inputs and outputs are those of the stock backend (docs/generation.md lists them), so
one client drives this server and a stock Triton + TensorRT-LLM deployment alike. Two Triton
models are served, as a stock deployment would configure them:

- `<name>`: not decoupled; one response per request (`infer`). Dynamic batching merges
  concurrent requests into one engine call.
- `<name>_stream`: decoupled (`start_stream` / `async_stream_infer`). With `streaming=true` a
  request gets one response per generated token (its new token and the running length) as soon
  as the engine produced it, then a last one with the logprobs (the engine reports them at the
  end of a call); with `streaming=false` one response holding the whole result. The concatenation
  of a request's responses is its result; the stream ends with Triton's final flag. (A dynamic
  batch that mixes the two kinds is answered with one response per request: PyTriton answers all
  requests of a batch together.)

Our one addition is the optional input `policy_version` (INT64 [1]): the policy version the
request needs. The engine lock is held from the version check to the end of generation, and a
weight push takes the same lock, so a request never sees weights older than it asked for, nor a
mix of two versions. A request naming a version newer than the engine's is refused.

Errors. PyTriton reports an exception for the whole dynamic batch it happened in (it has no
per-request error), so a malformed request also fails the requests batched with it; the message
names the input (e.g. `input_ids: token id 600 outside the vocabulary [0, 512)`). Our client
validates the same rules before sending, so its requests never fail this way.

See docs/generation.md for the whole contract (every input and output, defaults, sampling, seeds).
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


def _padded(rows: list[Row], values: list[list], dtype, pad) -> np.ndarray:
    """[rows, beam=1, longest] with each row's values, padded."""
    out = np.zeros((len(rows), 1, max(len(v) for v in values)), dtype=dtype)
    for i, (row, v) in enumerate(zip(rows, values, strict=True)):
        out[i, 0, :] = row.pad_id if pad is None else pad
        out[i, 0, : len(v)] = v
    return out


def response(
    rows: list[Row],
    tokens: list[list[int]],
    logprobs: list[list[float]],
    lengths: list[int],
    cum: list[float] | None,
) -> dict:
    """One request's outputs (its rows padded to the longest, beam width 1). An output with
    nothing to say is left out of the response: Triton carries no empty tensors from PyTriton,
    and a client reads a missing output as "nothing new"."""
    out = {"sequence_length": np.array([[n] for n in lengths], dtype=np.int32)}
    if any(tokens):
        out["output_ids"] = _padded(rows, tokens, np.int32, None)
    if any(logprobs):
        out["output_log_probs"] = _padded(rows, logprobs, np.float32, 0.0)
    if cum is not None:
        out["cum_log_probs"] = np.array([[c] for c in cum], dtype=np.float32)
    return out


def final_response(
    rows: list[Row], results: list[GenerationResult], streamed: list[int] | None = None
) -> dict:
    """The whole result of each row: prompt + completion (or the completion alone with
    exclude_input_in_output), the logprobs of the generated tokens. Rows that were streamed get
    only what was not streamed yet (normally no tokens, and all the logprobs)."""
    streamed = streamed or [0] * len(rows)
    tokens, lengths = [], []
    for row, r, sent in zip(rows, results, streamed, strict=True):
        if row.streaming:
            tokens.append(r.tokens[sent:])
            lengths.append(len(r.tokens))
        else:
            tokens.append(r.tokens if row.exclude_input else row.prompt + r.tokens)
            lengths.append(len(tokens[-1]))
    cum = [float(sum(r.logprobs)) for r in results]
    return response(rows, tokens, [r.logprobs for r in results], lengths, cum)


def step_response(rows: list[Row], new: list[int | None], counts: list[int]) -> dict:
    """A streaming step: each streaming row's new token and running length. (The engine reports
    logprobs at the end of the call, so they come with the last response.)"""
    tokens = [[t] if (row.streaming and t is not None) else [] for row, t in zip(rows, new, strict=True)]
    lengths = [n if row.streaming else 0 for row, n in zip(rows, counts, strict=True)]
    return response(rows, tokens, [[] for _ in rows], lengths, None)


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
            final_response(*_pick(group, rows, results)) for group in self._by_request(rows, len(requests))
        ]

    async def infer_stream(self, requests) -> AsyncIterator[list[dict]]:
        """The decoupled model. The engine runs in a thread; its per-step tokens come back
        through a queue, so this handler's event loop is free to send responses meanwhile."""
        rows, needed = self._parse(requests)
        groups = self._by_request(rows, len(requests))
        loop = asyncio.get_running_loop()
        if not all(row.streaming for row in rows):
            # PyTriton answers every request of a batch at each step, so a batch that mixes
            # streaming and non-streaming requests is answered in one response each: exactly what
            # a non-streaming request expects, and a (one-chunk) stream for the others.
            results = await loop.run_in_executor(None, self._generate, rows, needed)
            yield [final_response(*_pick(g, rows, results)) for g in groups]
            return
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
        counts = [0] * len(rows)
        try:
            while True:
                kind, payload = await loop.run_in_executor(None, steps.get)
                if kind == "error":
                    raise payload
                if kind == "done":
                    yield [final_response(*_pick(g, rows, payload, counts)) for g in groups]
                    return
                for i, token in enumerate(payload):
                    counts[i] += token is not None
                if any(token is not None for token in payload):
                    yield [step_response(*_pick(g, rows, payload, counts)) for g in groups]
        finally:
            cancelled.set()


def _pick(indices: list[int], *lists: list) -> tuple[list, ...]:
    """The entries at `indices` of each list (one request's rows out of the whole batch)."""
    return tuple([values[i] for i in indices] for values in lists)
