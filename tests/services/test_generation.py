"""The generation service as a real subprocess (`aligner serve generation`): Triton (PyTriton) with
the TensorRT-LLM tensor contract, driven by `tritonclient.grpc` through `GenerationClient`, and
`aligner.v1.Generation` beside it. Results are compared with the same engine in-process."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from common.config import GenerationServiceConfig
from common.errors import InvalidArgument
from common.grpc_client import make_sync_channel
from services.generation.client import GenerationClient
from services.generation.weights import StaleVersion

pytestmark = pytest.mark.integration

MODEL = "tensorrt_llm"
ROOT = Path(__file__).resolve().parents[2]
TEXTS = [
    "\n\nHuman: What is the capital of France?\n\nAssistant: Paris is the capital of France.",
    "\n\nHuman: Say something kind.\n\nAssistant: You are doing great, keep going!",
    "\n\nHuman: Count to three.\n\nAssistant: One, two, three.",
]


def _config(checkpoints, **changes) -> GenerationServiceConfig:
    config = GenerationServiceConfig(
        checkpoint_path=str(checkpoints.policy), max_batch_size=16, max_queue_delay_us=20_000
    )
    config.server.grace_seconds = 5.0
    return dataclasses.replace(config, **changes)


def _start(start_server, checkpoints):
    """A SERVING `aligner serve generation` subprocess (stopped, exit 0 checked, with the module)
    and a client for it."""
    server = start_server("generation", _config(checkpoints))
    client = GenerationClient(
        f"127.0.0.1:{server.info['triton_grpc_port']}", control_url=server.target, timeout_s=120
    )
    client.wait_ready(60)
    return server, client


@pytest.fixture(scope="module")
def service(start_server, checkpoints):
    server, client = _start(start_server, checkpoints)
    yield server, client
    client.close()


@pytest.fixture(scope="module")
def local(checkpoints):
    """The same checkpoint in this process, with megatron's decode path: the server runs the
    default `decode=fused`, so every comparison below also checks fused against megatron."""
    from trainer.checkpoint import load_model_for_inference
    from trainer.engine import TorchEngine

    model, arch, tokenizer = load_model_for_inference(checkpoints.policy, value_head=False)
    engine = TorchEngine(
        model, max_seq_len=arch.encoder_seq_length, pad_id=tokenizer.pad_id, decode="megatron"
    )
    return engine, tokenizer


@pytest.fixture(scope="module")
def prompts(local):
    _, tokenizer = local
    return [tokenizer.encode(text, add_bos=True)[: 6 + 5 * i] for i, text in enumerate(TEXTS)] + [[7]]


def _local_generate(engine, prompts, **params):
    from trainer.engine import SamplingParams

    seeds = params.pop("seeds", [None] * len(prompts))
    return engine.generate(prompts, [SamplingParams(seed=s, **params) for s in seeds])


def _metric(server, name: str, **labels) -> float:
    for family in text_string_to_metric_families(server.metrics()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def _grpcurl(*args: str) -> str:
    binary = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    done = subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


# ---------------------------------------------------------------------------------------------
# Health, reflection, Info, the Triton model configuration
# ---------------------------------------------------------------------------------------------


def test_health_reflection_and_info(service, checkpoints, local):
    server, client = service
    health = health_pb2_grpc.HealthStub(make_sync_channel(server.target))
    for name in ("", "aligner.v1.Generation"):
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=name)).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    listed = _grpcurl("-plaintext", server.target, "list").split()
    assert "aligner.v1.Generation" in listed and "grpc.health.v1.Health" in listed
    assert "UpdateWeights" in _grpcurl("-plaintext", server.target, "describe", "aligner.v1.Generation")
    info = client.info()
    _, tokenizer = local
    assert (info.model_name, info.engine) == (MODEL, "torch")
    assert (info.vocab_size, info.max_seq_len) == (
        checkpoints.arch.vocab_size,
        checkpoints.arch.encoder_seq_length,
    )
    assert (info.end_id, info.pad_id) == (tokenizer.eos_id, tokenizer.pad_id)
    assert (
        json.loads(_grpcurl("-plaintext", "-d", "{}", server.target, "aligner.v1.Generation/Info"))["engine"]
        == "torch"
    )
    # Ports are on the loopback interface only.
    for port in ("port", "metrics_port", "triton_grpc_port", "triton_http_port", "triton_metrics_port"):
        listening = [
            c
            for c in psutil.net_connections("tcp")
            if c.laddr and c.laddr.port == server.info[port] and c.status == "LISTEN"
        ]
        assert listening and all(c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for c in listening), port


def test_triton_models_speak_the_tensorrt_llm_contract(service):
    server, _ = service
    triton = triton_grpc.InferenceServerClient(f"127.0.0.1:{server.info['triton_grpc_port']}")
    stock_inputs = {
        "input_ids": "INT32", "input_lengths": "INT32", "request_output_len": "INT32", "end_id": "INT32",
        "pad_id": "INT32", "temperature": "FP32", "runtime_top_k": "INT32", "runtime_top_p": "FP32",
        "seed": "UINT64", "min_tokens": "INT32", "return_log_probs": "BOOL", "exclude_input_in_output": "BOOL",
        "streaming": "BOOL",
    }  # fmt: skip
    stock_outputs = {
        "output_ids": "INT32",
        "sequence_length": "INT32",
        "output_log_probs": "FP32",
        "cum_log_probs": "FP32",
    }
    for name, decoupled in ((MODEL, False), (MODEL + "_stream", True)):
        meta = triton.get_model_metadata(name)
        inputs = {t.name: t.datatype for t in meta.inputs}
        assert {k: inputs[k] for k in stock_inputs} == stock_inputs
        assert inputs["policy_version"] == "INT64"
        assert {t.name: t.datatype for t in meta.outputs} == stock_outputs
        config = triton.get_model_config(name).config
        assert config.model_transaction_policy.decoupled is decoupled
        assert config.max_batch_size == 16
        assert config.dynamic_batching.max_queue_delay_microseconds == 20_000
        ragged = {i.name: i.allow_ragged_batch for i in config.input}
        assert ragged["input_ids"] and not ragged["input_lengths"]
        optional = {i.name for i in config.input if i.optional}
        assert optional == set(inputs) - {"input_ids", "input_lengths", "request_output_len"}
    triton.close()


# ---------------------------------------------------------------------------------------------
# Generation equals the engine in-process
# ---------------------------------------------------------------------------------------------


def test_greedy_generation_equals_the_engine_in_process(service, local, prompts):
    _, client = service
    engine, _ = local
    expected = _local_generate(engine, prompts, max_new_tokens=10, greedy=True)
    # An end id that the greedy continuation of prompt 0 reaches at its 4th token.
    end_id = expected[0].tokens[3]
    expected = _local_generate(engine, prompts, max_new_tokens=10, greedy=True, end_id=end_id)
    got = client.generate(prompts, max_new_tokens=10, greedy=True, end_id=end_id)
    assert [r.tokens for r in got] == [r.tokens for r in expected]
    assert [r.ended for r in got] == [r.ended for r in expected]
    assert got[0].ended and got[0].tokens[-1] == end_id and len(got[0].tokens) == 4
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g.logprobs, e.logprobs, atol=1e-5, rtol=1e-5)


def test_seeded_sampling_equals_the_engine_in_process(service, local, prompts):
    _, client = service
    engine, tokenizer = local
    params = dict(
        max_new_tokens=8, temperature=0.9, top_k=40, top_p=0.95, min_new_tokens=2, end_id=tokenizer.eos_id
    )
    seeds = [101, 202, 303, 404]
    got = client.generate(prompts, seeds=seeds, **params)
    expected = _local_generate(engine, prompts, seeds=seeds, **params)
    assert [r.tokens for r in got] == [r.tokens for r in expected]
    other = client.generate(prompts, seeds=[s + 1 for s in seeds], **params)
    assert [r.tokens for r in other] != [r.tokens for r in got]


def test_streaming_returns_the_same_tokens_token_by_token(service, prompts):
    _, client = service
    whole = client.generate(prompts, max_new_tokens=9, greedy=True)
    pieces: dict[int, list[list[int]]] = {}
    streamed = client.generate(
        prompts,
        max_new_tokens=9,
        greedy=True,
        stream=True,
        on_tokens=lambda i, new: pieces.setdefault(i, []).append(new),
    )
    assert [r.tokens for r in streamed] == [r.tokens for r in whole]
    for i, r in enumerate(whole):
        assert pieces[i] == [[t] for t in r.tokens]  # one response per generated token
        np.testing.assert_allclose(streamed[i].logprobs, r.logprobs, atol=1e-6)


def _batches(server) -> tuple[float, float, float]:
    """(engine batches, Triton requests, rows) served so far."""
    return (
        _metric(server, "aligner_requests_per_batch_count", service="generation"),
        _metric(server, "aligner_requests_per_batch_sum", service="generation"),
        _metric(server, "aligner_batch_size_sum", service="generation"),
    )


def test_concurrent_requests_are_batched(service, prompts):
    server, client = service
    before = _batches(server)
    client.generate(prompts * 3, max_new_tokens=4, greedy=True, batch_requests=False)  # 12 requests at once
    batches, requests, rows = (a - b for a, b in zip(_batches(server), before, strict=True))
    assert requests == 12 and rows == 12 and batches < 12, (requests, batches)
    assert _metric(server, "aligner_generated_tokens_total", engine="torch") > 0


def test_batched_requests_equal_one_request_per_prompt(service, prompts, local):
    """The default sends a call's prompts as one [B, T] request (split at the server's
    max_batch_size): same tokens and logprobs as one request per prompt, for prompts of mixed
    lengths with per-row seeds, and greedy equals the engine in-process."""
    server, client = service
    engine, tokenizer = local
    many = [p[: 3 + i] for i, p in enumerate(prompts * 5)]  # 20 prompts, lengths 1..22
    params = dict(max_new_tokens=6, temperature=0.8, top_k=30, top_p=0.9, end_id=tokenizer.eos_id)
    seeds = [1000 + 7 * i for i in range(len(many))]
    before = _batches(server)
    batched = client.generate(many, seeds=seeds, **params)
    batches, requests, rows = (a - b for a, b in zip(_batches(server), before, strict=True))
    assert (requests, rows) == (2, 20), (requests, rows)  # max_batch_size is 16: 16 + 4 rows
    single = client.generate(many, seeds=seeds, batch_requests=False, **params)
    assert [r.tokens for r in batched] == [r.tokens for r in single]
    assert [r.ended for r in batched] == [r.ended for r in single]
    for b, s in zip(batched, single, strict=True):
        np.testing.assert_allclose(b.logprobs, s.logprobs, atol=1e-5, rtol=1e-5)
    assert [r.tokens for r in batched] == [
        r.tokens for r in _local_generate(engine, many, seeds=seeds, **params)
    ]
    # A smaller cap on the client splits further; greedy equals the engine in-process.
    small = GenerationClient(client.triton_url, max_batch_size=3, timeout_s=120)
    try:
        before = _batches(server)
        greedy = small.generate(many[:8], max_new_tokens=6, greedy=True)
        requests = _batches(server)[1] - before[1]
        assert requests == 3 and small.max_batch_size() == 3  # 3 + 3 + 2 rows
    finally:
        small.close()
    expected = _local_generate(engine, many[:8], max_new_tokens=6, greedy=True)
    assert [r.tokens for r in greedy] == [r.tokens for r in expected]
    for g, e in zip(greedy, expected, strict=True):
        np.testing.assert_allclose(g.logprobs, e.logprobs, atol=1e-5, rtol=1e-5)
    assert client.max_batch_size() == 16


# ---------------------------------------------------------------------------------------------
# Weight pushes and policy versions
# ---------------------------------------------------------------------------------------------


def test_pushed_weights_change_the_next_generation(service, local, prompts):
    server, client = service
    engine, _ = local
    original = {k: v.clone() for k, v in engine.model.state_dict().items() if isinstance(v, torch.Tensor)}
    before = client.generate(prompts, max_new_tokens=8, greedy=True)
    version = client.info().policy_version + 1
    g = torch.Generator().manual_seed(5)
    new = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in original.items()}
    updates = _metric(server, "aligner_weight_updates_total", engine="torch")

    reply = client.push_weights(new, version, chunk_bytes=64 << 10)  # several chunks per big tensor
    assert (reply.policy_version, reply.num_tensors) == (version, len(new))
    assert reply.num_bytes == sum(t.numel() * 4 for t in new.values())
    assert client.info().policy_version == version
    assert _metric(server, "aligner_weight_updates_total", engine="torch") == updates + 1
    after = client.generate(prompts, max_new_tokens=8, greedy=True, policy_version=version)
    engine.load_state_dict(new, strict=False)
    try:
        expected = _local_generate(engine, prompts, max_new_tokens=8, greedy=True)
    finally:
        engine.load_state_dict(original, strict=False)
    assert [r.tokens for r in after] == [r.tokens for r in expected]
    assert [r.tokens for r in after] != [r.tokens for r in before]

    # The original weights as the next version: generation is back to where it was.
    client.push_weights(original, version + 1)
    assert [r.tokens for r in client.generate(prompts, max_new_tokens=8, greedy=True)] == [
        r.tokens for r in before
    ]


def test_stale_versions_are_refused(service, prompts):
    _, client = service
    current = client.info().policy_version
    with pytest.raises(
        StaleVersion,
        match=rf"policy_version: the request needs policy version {current + 1}, but the engine serves version {current}",
    ):
        client.generate(prompts[:1], max_new_tokens=2, greedy=True, policy_version=current + 1)
    with pytest.raises(
        StaleVersion, match=rf"policy_version: {current} is not newer than the engine's version {current}"
    ):
        client.push_weights({"gpt.decoder.final_layernorm.weight": torch.ones(64)}, current)
    assert (
        len(client.generate(prompts[:1], max_new_tokens=2, greedy=True, policy_version=current)[0].tokens)
        == 2
    )


def test_update_weights_with_a_bad_name_or_shape_is_invalid_argument(service, local, prompts):
    _, client = service
    engine, _ = local
    weights = {k: v for k, v in engine.model.state_dict().items() if isinstance(v, torch.Tensor)}
    version = client.info().policy_version
    before = client.generate(prompts, max_new_tokens=4, greedy=True)
    with pytest.raises(InvalidArgument) as bad_name:
        client.push_weights(weights | {"gpt.bogus.weight": torch.zeros(3)}, version + 1)
    assert bad_name.value.field == "name" and "'gpt.bogus.weight' is not a parameter of the model" in str(
        bad_name.value
    )
    qkv = "gpt.decoder.layers.0.self_attention.linear_qkv.weight"
    with pytest.raises(InvalidArgument) as bad_shape:
        client.push_weights(weights | {qkv: torch.zeros(5, 64)}, version + 1)
    assert (
        bad_shape.value.field == "shape" and qkv in str(bad_shape.value) and "[5, 64]" in str(bad_shape.value)
    )
    missing = dict(weights)
    del missing["gpt.decoder.final_layernorm.weight"]
    with pytest.raises(InvalidArgument, match="never sent: gpt.decoder.final_layernorm.weight"):
        client.push_weights(missing, version + 1)
    # Nothing was applied.
    assert client.info().policy_version == version
    assert [r.tokens for r in client.generate(prompts, max_new_tokens=4, greedy=True)] == [
        r.tokens for r in before
    ]


# ---------------------------------------------------------------------------------------------
# Malformed requests
# ---------------------------------------------------------------------------------------------


def _raw_inputs(ids, lengths, output_len):
    tensors = []
    for name, value, dtype in (("input_ids", [ids], "INT32"), ("input_lengths", [[lengths]], "INT32"),
                               ("request_output_len", [[output_len]], "INT32")):  # fmt: skip
        array = np.array(value, dtype=np.int32)
        tensor = triton_grpc.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


@pytest.mark.parametrize(
    "ids, lengths, output_len, words",
    [
        ([5, 999], 2, 4, ["input_ids", "token id 999 outside the vocabulary [0, 320)"]),
        ([5, 6], 3, 4, ["input_lengths", "3 must be in [1, 2]"]),
        ([5, 6], 2, 0, ["request_output_len", "must be >= 1"]),
        ([5, 6], 2, 47, ["request_output_len", "exceeds the model's maximum 48"]),
    ],
    ids=["token-beyond-vocab", "lengths-do-not-add-up", "no-new-tokens", "too-long"],
)
def test_malformed_triton_requests_name_the_input(service, ids, lengths, output_len, words):
    server, _ = service
    triton = triton_grpc.InferenceServerClient(f"127.0.0.1:{server.info['triton_grpc_port']}")
    with pytest.raises(InferenceServerException) as info:
        triton.infer(MODEL, _raw_inputs(ids, lengths, output_len))
    for word in words:
        assert word in info.value.message()
    triton.close()


def _stock_inputs(**values) -> list:
    """A request as a stock TensorRT-LLM client builds it: every tensor [batch, ...]."""
    dtypes = {np.int32: "INT32", np.float32: "FP32", np.bool_: "BOOL", np.uint64: "UINT64"}
    tensors = []
    for name, (value, dtype) in values.items():
        array = np.array(value, dtype=dtype)
        tensor = triton_grpc.InferInput(name, list(array.shape), dtypes[dtype])
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def test_stock_client_request_with_the_prompt_in_the_output_and_two_rows(service):
    server, client = service
    triton = triton_grpc.InferenceServerClient(f"127.0.0.1:{server.info['triton_grpc_port']}")
    pad = client.info().pad_id
    expected = client.generate([[5, 6, 7], [8, 9]], max_new_tokens=4, greedy=True)
    reply = triton.infer(MODEL, _stock_inputs(
        input_ids=([[5, 6, 7], [8, 9, 0]], np.int32), input_lengths=([[3], [2]], np.int32),
        request_output_len=([[4], [4]], np.int32), end_id=([[-1], [-1]], np.int32), pad_id=([[pad], [pad]], np.int32),
        temperature=([[1.0], [1.0]], np.float32), runtime_top_k=([[1], [1]], np.int32),
        runtime_top_p=([[0.5], [0.5]], np.float32), return_log_probs=([[True], [True]], np.bool_),
        exclude_input_in_output=([[False], [False]], np.bool_),
    ))  # fmt: skip
    ids, lengths = reply.as_numpy("output_ids"), reply.as_numpy("sequence_length")
    assert ids.shape == (2, 1, 7) and lengths.tolist() == [[7], [6]]
    assert ids[0, 0].tolist() == [5, 6, 7, *expected[0].tokens]
    assert ids[1, 0].tolist() == [8, 9, *expected[1].tokens, pad]  # padded to the longest row
    logprobs = reply.as_numpy("output_log_probs")
    assert logprobs.shape == (2, 1, 4)
    np.testing.assert_allclose(logprobs[0, 0], expected[0].logprobs, atol=1e-6)
    np.testing.assert_allclose(
        reply.as_numpy("cum_log_probs")[:, 0], [sum(r.logprobs) for r in expected], atol=1e-4
    )
    # The decoupled model with streaming=false: one response with the whole result, then the end.
    import queue

    replies: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: replies.put((result, error)))
    triton.async_stream_infer(MODEL + "_stream", _stock_inputs(
        input_ids=([[5, 6, 7]], np.int32), input_lengths=([[3]], np.int32), request_output_len=([[4]], np.int32),
        runtime_top_k=([[1]], np.int32), exclude_input_in_output=([[True]], np.bool_), streaming=([[False]], np.bool_),
    ), enable_empty_final_response=True)  # fmt: skip
    first, error = replies.get(timeout=60)
    assert error is None and first.as_numpy("output_ids")[0, 0].tolist() == expected[0].tokens
    last, error = replies.get(timeout=60)
    assert error is None and last.get_response().parameters["triton_final_response"].bool_param
    assert last.as_numpy("output_ids") is None
    triton.stop_stream()
    # The non-decoupled model cannot stream, as on a stock server.
    with pytest.raises(InferenceServerException, match="streaming: needs the decoupled model"):
        triton.infer(MODEL, _stock_inputs(
            input_ids=([[5]], np.int32), input_lengths=([[1]], np.int32), request_output_len=([[2]], np.int32),
            streaming=([[True]], np.bool_),
        ))  # fmt: skip
    triton.close()


def test_client_checks_parameters_before_sending(service):
    _, client = service
    for kwargs, field in (
        (dict(prompts=[[]], max_new_tokens=2), "prompts[0]"),
        (dict(prompts=[[1]], max_new_tokens=0), "max_new_tokens"),
        (dict(prompts=[[1]], max_new_tokens=2, top_p=0.0), "top_p"),
        (dict(prompts=[[1]], max_new_tokens=2, min_new_tokens=3), "min_new_tokens"),
        (dict(prompts=[[1], [2]], max_new_tokens=2, seeds=[1]), "seeds"),
    ):
        with pytest.raises(InvalidArgument) as info:
            client.generate(**kwargs)
        assert info.value.field == field


# ---------------------------------------------------------------------------------------------
# Latency, startup errors, shutdown
# ---------------------------------------------------------------------------------------------


def test_generate_latency_on_the_tiny_model(service, prompts):
    """Per-call latency of one Generate (one prompt, 16 new tokens, greedy) through Triton, and of a
    batch of 8 concurrent prompts."""
    _, client = service
    one, eight = [], []
    for _ in range(15):
        start = time.perf_counter()
        client.generate(prompts[:1], max_new_tokens=16, greedy=True)
        one.append(time.perf_counter() - start)
    for _ in range(5):
        start = time.perf_counter()
        client.generate((prompts * 2)[:8], max_new_tokens=16, greedy=True)
        eight.append(time.perf_counter() - start)
    p50, p50_batch = statistics.median(one), statistics.median(eight)
    print(f"\nGenerate latency (tiny model, 16 new tokens): 1 prompt p50 {p50 * 1000:.1f} ms "
          f"(min {min(one) * 1000:.1f}, max {max(one) * 1000:.1f}); 8 concurrent prompts p50 {p50_batch * 1000:.1f} ms")  # fmt: skip
    assert p50 < 2.0 and p50_batch < 5.0


@pytest.mark.skipif(
    torch.cuda.is_available() and shutil.which("trtllm-build") is not None,
    reason="TensorRT-LLM is available here",
)
def test_tensorrt_llm_engine_fails_at_startup_with_the_reason(checkpoints):
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "serve", "generation", f"checkpoint_path={checkpoints.policy}", "engine=tensorrt_llm"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("aligner serve: error: TensorRT-LLM engine unavailable: ")
    if not torch.cuda.is_available():
        assert "no CUDA device (torch.cuda.is_available() is False)" in last
    assert "serving" not in done.stdout  # nothing was started


def test_decode_is_checked_at_startup_and_fused_never_falls_back_silently(checkpoints, monkeypatch):
    from common.config import ConfigError
    from services.generation import server
    from trainer import fused_decode

    assert GenerationServiceConfig.decode == "fused"
    with pytest.raises(ConfigError, match="config key 'decode': must be one of fused, megatron, got 'eager'"):
        server.check_engine_available(_config(checkpoints, decode="eager"))
    # A model the fused step does not cover (as at tensor-parallel size > 1): startup fails
    # naming the key, rather than serving with another decode path.
    monkeypatch.setattr(fused_decode, "unsupported", lambda gpt: "tensor parallel size > 1")
    with pytest.raises(
        ConfigError, match="config key 'decode': 'fused' is unavailable: the model tensor parallel"
    ):
        server.build_engine(_config(checkpoints))
    engine, _ = server.build_engine(_config(checkpoints, decode="megatron"))
    assert engine.decode == "megatron"


def test_sigterm_stops_triton_and_the_process(start_server, checkpoints):
    server, client = _start(start_server, checkpoints)
    client.close()
    children = psutil.Process(server.proc.pid).children(recursive=True)
    tritonserver = [p for p in children if p.name() == "tritonserver"]
    assert len(tritonserver) == 1
    workspace = next(Path(arg) for arg in tritonserver[0].cmdline() if "/workspace_" in arg).parents[2]
    assert workspace.name.startswith("workspace_") and workspace.is_dir()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0, server.log()[-3000:]
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, [p.pid for p in alive]
    assert not workspace.exists()
    assert "triton stopped" in server.log()
    assert os.path.exists(server.ports_file)


def test_not_serving_while_loading_and_a_dead_tritonserver_stops_the_service(checkpoints, tmp_path):
    """Health is NOT_SERVING until the engine and Triton are up. If Triton dies, the process does not stay up answering health checks: it drains and exits
    non-zero, saying why. (Started here, not with `start_server`, which expects exit code 0.)"""
    from omegaconf import OmegaConf

    config_path, ports_file, log_path = (
        tmp_path / "generation.yaml",
        tmp_path / "ports.json",
        tmp_path / "log",
    )
    OmegaConf.save(OmegaConf.structured(_config(checkpoints)), config_path)
    argv = [
        sys.executable,
        "-m",
        "services.cli",
        "serve",
        "generation",
        "--config",
        str(config_path),
        "--ports-file",
        str(ports_file),
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        # The gRPC server is up (and says so) at once; health stays NOT_SERVING while the model
        # loads and Triton starts (seconds).
        while '"event": "serving"' not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.05)
        early = next(
            json.loads(line) for line in log_path.read_text().splitlines() if '"event": "serving"' in line
        )
        health = health_pb2_grpc.HealthStub(make_sync_channel(f"127.0.0.1:{early['port']}"))
        status = health.Check(health_pb2.HealthCheckRequest(service="aligner.v1.Generation")).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        while not ports_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        tritonserver = [
            p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "tritonserver"
        ]
        tritonserver[0].kill()
        assert proc.wait(timeout=60) == 2
        assert "aligner serve: error: tritonserver exited unexpectedly" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
