"""The client of the generation service, as the orchestrator uses it.

Generation goes through `tritonclient.grpc` with the stock TensorRT-LLM backend's tensor names
only (`input_ids`, `input_lengths`, `request_output_len`, `end_id`, `temperature`,
`runtime_top_k`, `runtime_top_p`, `seed`, `min_tokens`, `return_log_probs`,
`exclude_input_in_output`, `streaming` -> `output_ids`, `sequence_length`, `output_log_probs`).

By default (`batch_requests=True`) a call's prompts go as ONE Triton request per server batch:
`input_ids [B, T]` right-padded, `input_lengths [B, 1]`, every other input `[B, 1]` per row, split
into several requests (all in flight at once) when B exceeds the model's `max_batch_size`; outputs
come back `[B, beam, ...]`. This is how a stock TensorRT-LLM `tensorrt_llm` model takes a batch
too, and it saves the dynamic batcher's queue delay and B-1 request round trips. With
`batch_requests=False` (and always when streaming) each prompt is its own request, all in flight
at once so Triton's dynamic batcher merges them. Both give the same tokens: the engine seeds
every row from its own seed. The one extra input, `policy_version`, is sent only when a version is asked for, so the same
client drives a stock Triton + TensorRT-LLM server unchanged (with `stream_model_name` set to its
decoupled model).

Weight pushes and `Info` go to `aligner.v1.Generation` on `control_url` (our server only).

Conventions of the results (`trainer.engine.GenerationResult`): `tokens` are the new tokens only,
including the end token when one was produced; `ended` says it was; `logprobs` has one entry per
token. A request is `ended` when its last token is the end id or it stopped before
`max_new_tokens` (a stock server does not count the end token).
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Callable, Mapping, Sequence

import grpc
import numpy as np
import torch
import tritonclient.grpc as triton_grpc
from aligner.v1 import generation_pb2, generation_pb2_grpc
from tritonclient.utils import InferenceServerException

from common.errors import AlignerError, InvalidArgument, Unavailable
from common.grpc_client import make_sync_channel, wait_for_health
from services.generation.weights import StaleVersion, chunk_state_dict
from trainer.engine import GenerationResult

STREAM_SUFFIX = "_stream"
REQUESTED_OUTPUTS = ("output_ids", "sequence_length", "output_log_probs")


class GenerationError(AlignerError):
    """The generation server refused or failed a request; the message is the server's."""


class TritonTransport:
    """Unary requests to a Triton server's gRPC endpoint (`tritonclient.grpc`)."""

    def __init__(self, url: str, model_name: str):
        self.url, self.model_name = url, model_name
        self.client = triton_grpc.InferenceServerClient(url)

    def max_batch_size(self) -> int:
        try:
            config = self.client.get_model_config(self.model_name).config
        except InferenceServerException as exc:
            raise _server_error(exc, self.url) from None
        return int(config.max_batch_size)

    def is_model_ready(self) -> bool:
        try:
            return bool(self.client.is_model_ready(self.model_name))
        except InferenceServerException as exc:
            raise Unavailable(f"generation at {self.url}: {exc.message()}") from None

    def infer(self, requests: list[dict[str, np.ndarray]], timeout_s: float) -> list[dict[str, np.ndarray]]:
        """Send every request at once (Triton batches them); each reply's requested outputs."""
        outputs = [triton_grpc.InferRequestedOutput(name) for name in REQUESTED_OUTPUTS]
        done = threading.Semaphore(0)
        replies: list = [None] * len(requests)

        def callback(index: int, result, error) -> None:
            replies[index] = (result, error)
            done.release()

        for i, arrays in enumerate(requests):
            self.client.async_infer(
                self.model_name, _infer_inputs(arrays), lambda result, error, i=i: callback(i, result, error),
                outputs=outputs, request_id=str(i), client_timeout=timeout_s,
            )  # fmt: skip
        for _ in requests:
            if not done.acquire(timeout=timeout_s + 5):
                raise Unavailable(f"generation at {self.url}: no reply within {timeout_s:g}s")
        results = []
        for result, error in replies:
            if error is not None:
                raise _server_error(error, self.url)
            results.append({name: result.as_numpy(name) for name in REQUESTED_OUTPUTS})
        return results

    def close(self) -> None:
        self.client.close()


class GenerationClient:
    """`triton_url` is Triton's gRPC endpoint ("host:port"); `control_url` is the service's
    `aligner.v1.Generation` endpoint (weight pushes, Info), optional for generation alone.

    `transport` (default: `TritonTransport(triton_url)`) carries the generate requests and
    `control_stub` (default: a stub on a channel to `control_url`) the control calls: the
    orchestrator's in-process services pass the server's own components there.
    `channel_kwargs` go to `common.grpc_client.make_sync_channel` (e.g. `retry=None`)."""

    def __init__(
        self,
        triton_url: str,
        control_url: str | None = None,
        *,
        model_name: str = "tensorrt_llm",
        stream_model_name: str | None = None,
        timeout_s: float = 300.0,
        auth_token: str | None = None,
        max_batch_size: int | None = None,
        transport=None,
        control_stub=None,
        **channel_kwargs,
    ):
        self.triton_url = triton_url
        self.control_url = control_url
        self.model_name = model_name
        self.stream_model_name = stream_model_name or model_name + STREAM_SUFFIX
        self.timeout_s = timeout_s
        self.transport = transport if transport is not None else TritonTransport(triton_url, model_name)
        self._channel = None
        self._stub = control_stub
        if control_stub is None and control_url is not None:
            self._channel = make_sync_channel(
                control_url, token=auth_token, default_timeout=timeout_s, **channel_kwargs
            )
            self._stub = generation_pb2_grpc.GenerationStub(self._channel)
        self._auth_token = auth_token
        if max_batch_size is not None and max_batch_size < 1:
            raise InvalidArgument("max_batch_size", f"must be >= 1, got {max_batch_size}")
        self._max_batch_size = max_batch_size  # capped by the server's on first use
        self._server_max_batch_size: int | None = None

    def max_batch_size(self) -> int:
        """Rows per Triton request: the model's `max_batch_size` (read from its config once),
        capped by the one given to the constructor."""
        if self._server_max_batch_size is None:
            # 0 = the model takes no batch dimension; our requests always carry one row then.
            self._server_max_batch_size = max(1, self.transport.max_batch_size())
        if self._max_batch_size is None:
            return self._server_max_batch_size
        return min(self._max_batch_size, self._server_max_batch_size)

    # --- generation ----------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        min_new_tokens: int = 0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        greedy: bool = False,
        end_id: int | None = None,
        seed: int | None = None,
        seeds: Sequence[int | None] | None = None,
        policy_version: int | None = None,
        stream: bool = False,
        on_tokens: Callable[[int, list[int]], None] | None = None,
        batch_requests: bool = True,
        timeout_s: float | None = None,
    ) -> list[GenerationResult]:
        """Generate a continuation of every prompt (token ids). `seeds` gives one seed per prompt
        (else `seed` for all, else the server picks). With `stream=True` the decoupled model is
        used and `on_tokens(prompt_index, new_tokens)` is called as tokens arrive.
        `policy_version`: refuse to run on weights older than this version. `batch_requests`:
        send the prompts as batched requests (see the module doc) rather than one per prompt.
        `timeout_s`: this call's deadline (default: the client's)."""
        prompts = [list(map(int, p)) for p in prompts]
        _check_params(prompts, max_new_tokens, min_new_tokens, temperature, top_k, top_p, seeds)
        if seeds is None:
            seeds = [seed] * len(prompts)
        rows = self.max_batch_size() if batch_requests and not stream else 1
        groups = [range(i, min(i + rows, len(prompts))) for i in range(0, len(prompts), rows)]
        requests = [
            _inputs(
                [prompts[i] for i in g],
                max_new_tokens,
                min_new_tokens,
                temperature,
                top_k,
                top_p,
                greedy,
                end_id,
                [seeds[i] for i in g],
                policy_version,
                stream,
            )
            for g in groups
        ]
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if stream:
            return self._generate_stream(requests, max_new_tokens, end_id, on_tokens, timeout_s)
        replies = self.transport.infer(requests, timeout_s)
        rows = [row for reply, g in zip(replies, groups, strict=True) for row in _rows(reply, len(g), self.triton_url)]
        return [_result(t, lp, max_new_tokens, end_id) for t, lp in rows]

    def _generate_stream(
        self, requests, max_new_tokens: int, end_id: int | None, on_tokens, timeout_s: float
    ) -> list[GenerationResult]:
        tokens: list[list[int]] = [[] for _ in requests]
        logprobs: list[list[float]] = [[] for _ in requests]
        finished = threading.Semaphore(0)
        errors: list = []

        def callback(result, error) -> None:
            if error is not None:
                errors.append(error)
                finished.release()
                return
            response = result.get_response()
            index = int(response.id)
            ids = result.as_numpy("output_ids")
            if ids is not None and ids.size:
                new = ids.reshape(-1).tolist()
                tokens[index].extend(new)
                if on_tokens is not None:
                    on_tokens(index, new)
            lps = result.as_numpy("output_log_probs")
            if lps is not None and lps.size:
                logprobs[index].extend(lps.reshape(-1).tolist())
            final = response.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                finished.release()

        # One stream per call: a client holds at most one, and calls may come from several threads.
        client = triton_grpc.InferenceServerClient(self.triton_url)
        try:
            client.start_stream(callback=callback, stream_timeout=timeout_s)
            for i, arrays in enumerate(requests):
                client.async_stream_infer(
                    self.stream_model_name, _infer_inputs(arrays), request_id=str(i), enable_empty_final_response=True,
                    outputs=[triton_grpc.InferRequestedOutput(name) for name in REQUESTED_OUTPUTS],
                )  # fmt: skip
            for _ in requests:
                if not finished.acquire(timeout=timeout_s + 5):
                    raise Unavailable(
                        f"generation at {self.triton_url}: stream incomplete after {timeout_s:g}s"
                    )
                if errors:
                    raise _server_error(errors[0], self.triton_url)
        finally:
            client.stop_stream(cancel_requests=bool(errors))
            client.close()
        return [_result(t, lp, max_new_tokens, end_id) for t, lp in zip(tokens, logprobs, strict=True)]

    # --- control plane -------------------------------------------------------------------------

    def _control(self):
        if self._stub is None:
            raise InvalidArgument("control_url", "is needed for weight pushes and Info")
        return self._stub

    def info(self) -> generation_pb2.InfoResponse:
        try:
            return self._control().Info(generation_pb2.InfoRequest())
        except grpc.RpcError as exc:
            raise _rpc_error(exc, self.control_url) from None

    def push_weights(
        self, state_dict: Mapping[str, torch.Tensor], version: int, chunk_bytes: int = 4 << 20
    ) -> generation_pb2.UpdateWeightsResponse:
        """Send every weight tensor of `state_dict` as policy `version` (must be newer than the
        server's); returns once the server has applied it."""
        try:
            return self._control().UpdateWeights(chunk_state_dict(state_dict, version, chunk_bytes))
        except grpc.RpcError as exc:
            raise _rpc_error(exc, self.control_url) from None

    def wait_ready(self, timeout_s: float = 60.0) -> generation_pb2.InfoResponse | None:
        """Wait until the service is SERVING and Triton's models are ready; returns `info()`
        (None without a control URL)."""
        import time

        deadline = time.monotonic() + timeout_s
        if self.control_url is not None:
            wait_for_health(self.control_url, timeout=timeout_s, token=self._auth_token)
        last = "no answer"
        while True:
            try:
                if self.transport.is_model_ready():
                    break
                last = "model not ready"
            except Unavailable as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"generation at {self.triton_url}: model {self.model_name!r} not ready ({last})"
                )
            time.sleep(0.2)
        return self.info() if self.control_url is not None else None

    def close(self) -> None:
        self.transport.close()
        if self._channel is not None:
            self._channel.close()

    def __enter__(self) -> GenerationClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Helpers (pure)
# ---------------------------------------------------------------------------------------------


def _check_params(prompts, max_new_tokens, min_new_tokens, temperature, top_k, top_p, seeds) -> None:
    """The server's rules, checked before sending (a server error fails a whole dynamic batch)."""
    if not prompts:
        raise InvalidArgument("prompts", "is empty")
    for i, p in enumerate(prompts):
        if not p:
            raise InvalidArgument(f"prompts[{i}]", "is empty")
        if min(p) < 0:
            raise InvalidArgument(f"prompts[{i}]", f"token id {min(p)} is negative")
    if max_new_tokens < 1:
        raise InvalidArgument("max_new_tokens", f"must be >= 1, got {max_new_tokens}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise InvalidArgument(
            "min_new_tokens", f"must be in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}"
        )
    if not temperature >= 0.0:
        raise InvalidArgument("temperature", f"must be >= 0, got {temperature}")
    if top_k < 0:
        raise InvalidArgument("top_k", f"must be >= 0, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise InvalidArgument("top_p", f"must be in (0, 1], got {top_p}")
    if seeds is not None and len(seeds) != len(prompts):
        raise InvalidArgument("seeds", f"{len(seeds)} seeds for {len(prompts)} prompts")


_TRITON_DTYPES = {
    np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64", np.dtype(np.uint64): "UINT64",
    np.dtype(np.float32): "FP32", np.dtype(np.bool_): "BOOL",
}  # fmt: skip


def _column(value, rows: int, dtype) -> np.ndarray:
    """A per-row input [rows, 1]: `value` is one value for every row or a list of one per row."""
    values = value if isinstance(value, list) else [value] * rows
    return np.asarray(values, dtype=dtype).reshape(rows, 1)


def _infer_inputs(arrays: dict[str, np.ndarray]) -> list[triton_grpc.InferInput]:
    inputs = []
    for name, array in arrays.items():
        tensor = triton_grpc.InferInput(name, list(array.shape), _TRITON_DTYPES[array.dtype])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _inputs(
    prompts, max_new, min_new, temperature, top_k, top_p, greedy, end_id, seeds, version, stream
) -> dict[str, np.ndarray]:
    """One request's tensors for a batch of prompts, stock TensorRT-LLM names only (plus
    `policy_version`): input_ids [B, T] right-padded (the server reads `input_lengths` tokens of
    each row, so the padding value is never read), every other input [B, 1]."""
    rows = len(prompts)
    if greedy:  # top-1 sampling is greedy on any TensorRT-LLM server (temperature 0 is not portable)
        temperature, top_k, top_p = 1.0, 1, 1.0
    ids = np.zeros((rows, max(len(p) for p in prompts)), dtype=np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    inputs = {
        "input_ids": ids,
        "input_lengths": _column([len(p) for p in prompts], rows, np.int32),
        "request_output_len": _column(max_new, rows, np.int32),
        "temperature": _column(temperature, rows, np.float32),
        "runtime_top_k": _column(top_k, rows, np.int32),
        "runtime_top_p": _column(top_p, rows, np.float32),
        "min_tokens": _column(min_new, rows, np.int32),
        "return_log_probs": _column(True, rows, np.bool_),
        "exclude_input_in_output": _column(True, rows, np.bool_),
        "streaming": _column(stream, rows, np.bool_),
    }
    if end_id is not None:
        inputs["end_id"] = _column(end_id, rows, np.int32)
    if not greedy and any(s is not None for s in seeds):
        # One `seed` input covers the whole request: rows without a seed get a fresh random one,
        # which is what the server would pick for them.
        seeds = [random.getrandbits(63) if s is None else int(s) for s in seeds]
        inputs["seed"] = _column(seeds, rows, np.uint64)
    if version is not None:
        inputs["policy_version"] = _column(version, rows, np.int64)
    return inputs


def _rows(reply: dict[str, np.ndarray | None], size: int, url: str) -> list[tuple[list[int], list[float]]]:
    """(tokens, logprobs) of each of the `size` rows of a reply: outputs are [B, beam, ...] (beam
    1 read); a missing output means no tokens (PyTriton leaves empty outputs out)."""
    lengths = reply.get("sequence_length")
    if lengths is None or lengths.shape[0] != size:
        shape = None if lengths is None else list(lengths.shape)
        raise GenerationError(f"generation at {url}: sequence_length has shape {shape} for {size} rows")
    lengths = lengths.reshape(size, -1)[:, 0]
    ids, logprobs = reply.get("output_ids"), reply.get("output_log_probs")
    rows = []
    for b in range(size):
        n = int(lengths[b])
        tokens = [] if ids is None else ids[b].reshape(-1, ids.shape[-1])[0, :n].tolist()
        lps = [] if logprobs is None else logprobs[b].reshape(-1, logprobs.shape[-1])[0, :n].tolist()
        rows.append((tokens, lps))
    return rows


def _result(
    tokens: list[int], logprobs: list[float], max_new_tokens: int, end_id: int | None
) -> GenerationResult:
    tokens = [int(t) for t in tokens]
    logprobs = [float(x) for x in logprobs[: len(tokens)]]
    ended = bool(tokens) and end_id is not None and tokens[-1] == end_id
    ended = ended or len(tokens) < max_new_tokens
    return GenerationResult(tokens=tokens, logprobs=logprobs, ended=ended)


# The last "SomeError: message" line of a server-side traceback (PyTriton sends the whole one).
_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+): (.+)$")


def server_message(text: str) -> tuple[str, str]:
    """(exception class name, message) from a Triton error text ("" when there is no class)."""
    for line in reversed(text.strip().splitlines()):
        match = _EXCEPTION_LINE.match(line.strip())
        if match and (match.group(1).endswith(("Error", "Exception")) or match.group(1) in _KNOWN):
            return match.group(1), match.group(2)
    return "", text.strip().splitlines()[0] if text.strip() else text


_KNOWN = ("InvalidArgument", "StaleVersion", "Unavailable", "NotFound")


def _server_error(error: InferenceServerException, url: str) -> AlignerError:
    kind, message = server_message(error.message() if hasattr(error, "message") else str(error))
    if kind == "InvalidArgument" and ": " in message:
        field, problem = message.split(": ", 1)
        return InvalidArgument(field, problem)
    if kind == "StaleVersion":
        return StaleVersion(message)
    if error.status() in ("StatusCode.UNAVAILABLE", "UNAVAILABLE"):
        return Unavailable(f"generation at {url}: {message}")
    return GenerationError(f"generation at {url}: {message}")


def _rpc_error(exc: grpc.RpcError, url: str | None) -> AlignerError:
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, _, problem = details.partition(": ")
        return InvalidArgument(field, problem or details)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return StaleVersion(details) if details.startswith("policy_version") else GenerationError(details)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(f"generation control at {url}: {code.name}: {details}")
    return GenerationError(f"generation control at {url}: {code.name}: {details}")
