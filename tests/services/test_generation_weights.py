"""Weight pushes: chunking a state dict and assembling/validating it on the server side."""

from __future__ import annotations

import pytest
import torch
from aligner.v1 import generation_pb2

from common import codec
from common.errors import InvalidArgument
from services.generation.weights import (
    ParamSpec,
    StaleVersion,
    WeightAssembler,
    chunk_state_dict,
    param_specs,
)


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "gpt.embedding.word_embeddings.weight": torch.randn(50, 8, generator=g),
        "gpt.decoder.final_layernorm.weight": torch.randn(8, generator=g),
        "gpt.decoder.layers.0.self_attention.linear_qkv._extra_state": None,  # metadata, skipped
        "step": torch.tensor(7, dtype=torch.int64),  # an integer buffer
    }


def _specs(sd) -> dict[str, ParamSpec]:
    return {k: ParamSpec(tuple(v.shape), v.dtype) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _assemble(chunks, specs, current_version: int = 0) -> tuple[WeightAssembler, dict[str, torch.Tensor]]:
    assembler = WeightAssembler(specs, current_version)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler, assembler.finish()


@pytest.mark.parametrize("chunk_bytes", [1, 100, 4 << 20])
def test_chunked_push_round_trip(chunk_bytes):
    sd = _state_dict()
    chunks = list(chunk_state_dict(sd, policy_version=3, chunk_bytes=chunk_bytes))
    assert all(c.data.shape[0] * 4 <= max(chunk_bytes, 8) for c in chunks)
    assembler, out = _assemble(reversed(chunks), _specs(sd), current_version=2)  # any order
    assert assembler.policy_version == 3 and assembler.num_chunks == len(chunks)
    assert assembler.num_bytes == sum(len(c.data.data) for c in chunks)
    assert out.keys() == _specs(sd).keys()
    for name, tensor in out.items():
        assert torch.equal(tensor, sd[name]), name


def test_param_specs_skip_extra_state():
    from torch import nn

    model = nn.Linear(3, 2)
    assert param_specs(model) == {
        "weight": ParamSpec((2, 3), torch.float32),
        "bias": ParamSpec((2,), torch.float32),
    }


def test_bf16_chunks_fill_fp32_parameters():
    sd = {"w": torch.randn(4, 4)}
    chunks = list(chunk_state_dict({"w": sd["w"].bfloat16()}, 1))
    _, out = _assemble(chunks, _specs(sd))
    assert out["w"].dtype == torch.float32
    assert torch.equal(out["w"], sd["w"].bfloat16().float())


def _chunk(name="w", shape=(2, 3), offset=0, values=None, version=1, dtype=torch.float32):
    values = torch.arange(6, dtype=dtype) if values is None else values
    return generation_pb2.UpdateWeightsRequest(
        policy_version=version,
        name=name,
        shape=list(shape),
        offset=offset,
        data=codec.tensor_to_proto(values),
    )


SPECS = {"w": ParamSpec((2, 3), torch.float32), "n": ParamSpec((2,), torch.int64)}


@pytest.mark.parametrize(
    "chunks, field, words",
    [
        ([_chunk(name="gpt.bogus.weight")], "name", ["'gpt.bogus.weight'", "not a parameter"]),
        ([_chunk(shape=(3, 2))], "shape", ["'w'", "[3, 2]", "[2, 3]"]),
        ([_chunk(offset=1)], "offset", ["'w'", "[1, 7)", "[0, 6)"]),
        ([_chunk(offset=-1)], "offset", ["'w'"]),
        ([_chunk(values=torch.arange(3)), _chunk(offset=3, values=torch.arange(3))], "data.dtype", ["float"]),
        (
            [_chunk(name="n", shape=(2,), values=torch.zeros(2))],
            "data.dtype",
            ["'n'", "torch.float32", "torch.int64"],
        ),
        ([_chunk(values=torch.zeros(2, 3))], "data.shape", ["1 dimension"]),
        ([_chunk(), _chunk(version=2)], "policy_version", ["says 2", "started with 1"]),
    ],
    ids=[
        "name",
        "shape",
        "offset-past-end",
        "negative-offset",
        "int-into-float",
        "float-into-int",
        "not-1d",
        "mixed-versions",
    ],
)
def test_bad_chunks_name_the_field_and_parameter(chunks, field, words):
    assembler = WeightAssembler(SPECS, current_version=0)
    with pytest.raises(InvalidArgument) as info:
        for chunk in chunks:
            assembler.add(chunk)
    assert info.value.field == field
    for word in words:
        assert word in str(info.value)


def _n_chunk(offset=0, values=(1, 2)):
    return _chunk(name="n", shape=(2,), offset=offset, values=torch.tensor(values, dtype=torch.int64))


@pytest.mark.parametrize(
    "chunks, words",
    [
        ([], ["no chunks"]),
        ([_chunk()], ["never sent", "n"]),
        ([_chunk(values=torch.arange(4.0)), _n_chunk()], ["'w'", "end at element 4 of 6"]),
        (
            [_chunk(values=torch.arange(3.0)), _chunk(offset=2, values=torch.arange(4.0)), _n_chunk()],
            ["'w'", "overlap"],
        ),
        (
            [_chunk(values=torch.arange(2.0)), _chunk(offset=3, values=torch.arange(3.0)), _n_chunk()],
            ["'w'", "gap at element 2"],
        ),
    ],
    ids=["empty", "missing-parameter", "short", "overlap", "gap"],
)
def test_incomplete_pushes_are_refused_at_the_end(chunks, words):
    assembler = WeightAssembler(SPECS, current_version=0)
    for chunk in chunks:
        assembler.add(chunk)
    with pytest.raises(InvalidArgument) as info:
        assembler.finish()
    for word in words:
        assert word in str(info.value)


def test_versions_must_grow():
    with pytest.raises(StaleVersion, match="policy_version: 4 is not newer than the engine's version 4"):
        WeightAssembler(SPECS, current_version=4).add(_chunk(version=4))
    WeightAssembler(SPECS, current_version=4).add(_chunk(version=5))


def test_chunk_bytes_must_be_positive():
    with pytest.raises(InvalidArgument, match="chunk_bytes"):
        list(chunk_state_dict({"w": torch.zeros(2)}, 1, chunk_bytes=0))
