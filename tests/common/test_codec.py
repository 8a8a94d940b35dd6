"""Tensor codec: round trips for every dtype, property tests, and every malformed input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from aligner.v1 import tensor_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from common import codec
from common.errors import InvalidArgument

Dtype = tensor_pb2.Dtype

ALL_TORCH_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 1e3).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality (NaNs included); numpy has no bf16, so compare its raw 16 bits."""

    def bits(t: torch.Tensor) -> bytes:
        t = t.contiguous()
        return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()

    return a.dtype == b.dtype and a.shape == b.shape and bits(a) == bits(b)


def _err(fn, *args, **kwargs) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        fn(*args, **kwargs)
    return info.value


# --- round trips -----------------------------------------------------------------------------------


def test_every_wire_dtype_has_a_codec():
    wire = {value for name, value in Dtype.items() if name != "DTYPE_UNSPECIFIED"}
    assert set(codec.SUPPORTED_DTYPES) == wire


@pytest.mark.parametrize("dtype", ALL_TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3), (2, 0, 4), (1, 2, 3, 2)])
def test_torch_round_trip(dtype, shape):
    t = _sample(dtype, shape)
    msg = codec.tensor_to_proto(t)
    assert msg.dtype == codec.dtype_of_torch(dtype)
    assert list(msg.shape) == list(shape)
    assert len(msg.data) == t.numel() * t.element_size()
    back = codec.tensor_from_proto(tensor_pb2.Tensor.FromString(msg.SerializeToString()), "x")
    assert _same_bits(back.contiguous(), t.contiguous())
    back.add_(1) if dtype != torch.bool else back.logical_not_()  # decoded tensors are writable


@pytest.mark.parametrize("dtype", ALL_TORCH_DTYPES, ids=str)
def test_numpy_decode_is_a_read_only_view_matching_torch(dtype):
    t = _sample(dtype, (3, 4))
    msg = codec.tensor_to_proto(t)
    array = codec.array_from_proto(msg, "x")
    expected = t.float().numpy() if dtype == torch.bfloat16 else t.numpy()  # bf16 widens exactly
    np.testing.assert_array_equal(array, expected)
    if dtype != torch.bfloat16:
        assert not array.flags.writeable  # a view of the message bytes, not a copy
        assert codec.array_to_proto(array) == msg


def test_wire_format_is_little_endian_c_order():
    msg = codec.tensor_to_proto(torch.tensor([[1, 2], [3, 256]], dtype=torch.int32))
    assert msg.data == b"\x01\0\0\0\x02\0\0\0\x03\0\0\0\x00\x01\0\0"
    bf16 = codec.tensor_to_proto(torch.tensor([1.0], dtype=torch.bfloat16))
    assert bf16.data == b"\x80\x3f"  # the top half of float32 1.0 (0x3f800000)


def test_non_contiguous_and_cast_inputs():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # a transposed view
    assert torch.equal(codec.tensor_from_proto(codec.tensor_to_proto(t), "x"), t)
    msg = codec.tensor_to_proto(t, dtype=Dtype.DTYPE_BFLOAT16)
    assert msg.dtype == Dtype.DTYPE_BFLOAT16
    assert torch.equal(codec.tensor_from_proto(msg, "x"), t.to(torch.bfloat16))


def test_unsupported_local_dtypes_are_type_errors():
    with pytest.raises(TypeError, match="complex"):
        codec.tensor_to_proto(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(TypeError):
        codec.array_to_proto(np.zeros(2, dtype=np.uint32))


def test_ragged_round_trip_with_empty_rows():
    msg = codec.ragged_to_proto([[5, 6, 7], [], [8]])
    assert list(msg.lengths) == [3, 0, 1] and msg.values.dtype == Dtype.DTYPE_INT64
    r = codec.tokens_from_proto(msg, "tokens", vocab_size=10, min_length=0)
    assert [row.tolist() for row in r.rows()] == [[5, 6, 7], [], [8]]
    assert r.offsets().tolist() == [0, 3, 3, 4]
    padded, mask = r.padded(pad_value=-1)
    assert padded.tolist() == [[5, 6, 7], [-1, -1, -1], [8, -1, -1]]
    assert mask.sum().item() == 4


def test_ragged_from_tensors_and_explicit_dtype():
    rows = [torch.tensor([0.5, 1.5]), torch.tensor([2.5])]
    msg = codec.ragged_to_proto(rows, dtype=Dtype.DTYPE_FLOAT16)
    assert msg.values.dtype == Dtype.DTYPE_FLOAT16
    r = codec.ragged_from_proto(msg, "values", kind="float")
    assert [row.tolist() for row in r.rows()] == [[0.5, 1.5], [2.5]]
    flat = codec.flat_to_ragged_proto(torch.arange(5, dtype=torch.int32), [2, 3])
    assert codec.tokens_from_proto(flat, "t").values.dtype == torch.int64  # ids come back int64


@st.composite
def _tensors(draw):
    dtype = draw(st.sampled_from(ALL_TORCH_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=4)))
    return _sample(dtype, shape, seed=draw(st.integers(0, 2**31)))


@settings(max_examples=150, deadline=None)
@given(_tensors())
def test_property_any_tensor_round_trips(t):
    msg = tensor_pb2.Tensor.FromString(codec.tensor_to_proto(t).SerializeToString())
    assert _same_bits(codec.tensor_from_proto(msg, "x"), t.contiguous())


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=12),
    vocab=st.integers(1, 1000),
    dtype=st.sampled_from([torch.int64, torch.int32, torch.int16]),
    seed=st.integers(0, 2**31),
)
def test_property_ragged_tokens_round_trip(lengths, vocab, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, vocab, (n,), generator=g).to(dtype) for n in lengths]
    msg = tensor_pb2.RaggedTensor.FromString(codec.ragged_to_proto(rows).SerializeToString())
    decoded = codec.tokens_from_proto(msg, "tokens", vocab_size=vocab, min_length=0, max_length=max(lengths))
    assert decoded.lengths.tolist() == lengths
    assert all(torch.equal(a, b.long()) for a, b in zip(decoded.rows(), rows, strict=True))


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(0, 6), min_size=1, max_size=8), extra=st.integers(1, 5))
def test_property_lengths_not_matching_values_are_rejected(lengths, extra):
    msg = codec.ragged_to_proto([torch.zeros(n, dtype=torch.int64) for n in lengths])
    msg.lengths[-1] += extra  # now they sum past the flat size
    assert _err(codec.ragged_from_proto, msg, "tokens").field == "tokens.lengths"


# --- malformed input: each names its field ------------------------------------------------------------


def _tensor(dtype=Dtype.DTYPE_FLOAT32, shape=(2,), data=b"\0" * 8) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=dtype, shape=list(shape), data=data)


@pytest.mark.parametrize(
    "msg, kwargs, field, text",
    [
        (_tensor(dtype=Dtype.DTYPE_UNSPECIFIED), {}, "rewards.dtype", "unspecified"),
        (_tensor(dtype=77), {}, "rewards.dtype", "77 is not a known Dtype"),
        (_tensor(shape=(3,)), {}, "rewards.data", "has 8 bytes, but shape [3] of float32 needs 12"),
        (_tensor(shape=(2, -1)), {}, "rewards.shape", "negative"),
        (_tensor(shape=(2,), data=b"\0" * 7), {}, "rewards.data", "needs 8"),
        (_tensor(), {"kind": "int"}, "rewards.dtype", "must be an integer dtype, got float32"),
        (_tensor(), {"ndim": 2}, "rewards.shape", "must have 2 dimension(s)"),
        (_tensor(Dtype.DTYPE_BOOL, (2,), b"\x01\x02"), {}, "rewards.data", "bool bytes must be 0 or 1"),
    ],
)
def test_malformed_tensor(msg, kwargs, field, text):
    for decode in (codec.tensor_from_proto, codec.array_from_proto):
        err = _err(decode, msg, "rewards", **kwargs)
        assert err.field == field and text in err.problem
        assert str(err).startswith(field + ": ")


def _ragged(lengths, values=None, dtype=torch.int64) -> tensor_pb2.RaggedTensor:
    values = torch.arange(sum(max(n, 0) for n in lengths)) if values is None else values
    return tensor_pb2.RaggedTensor(values=codec.tensor_to_proto(values.to(dtype)), lengths=lengths)


@pytest.mark.parametrize(
    "msg, kwargs, field, text",
    [
        (tensor_pb2.RaggedTensor(), {}, "tokens", "is missing"),
        (_ragged([]), {}, "tokens.lengths", "is empty"),
        (_ragged([2, 3], values=torch.arange(4)), {}, "tokens.lengths", "sum to 5, but tokens.values has 4"),
        (_ragged([3, -1], values=torch.arange(2)), {}, "tokens.lengths", "row 1 has length -1, must be >= 0"),
        (_ragged([2, 0, 1]), {"min_length": 1}, "tokens.lengths", "row 1 has length 0, must be >= 1"),
        (_ragged([2, 5]), {"max_length": 4}, "tokens.lengths", "row 1 has length 5, must be <= 4"),
        (_ragged([2], dtype=torch.float32), {}, "tokens.values.dtype", "must be an integer dtype"),
        (_ragged([2], dtype=torch.bool), {}, "tokens.values.dtype", "must be an integer dtype, got bool"),
        (
            _ragged([1, 2], values=torch.tensor([3, 10, 2])),
            {"vocab_size": 10},
            "tokens.values",
            "token id 10 at position 1 (row 1) must be in [0, 10)",
        ),
        (_ragged([3], values=torch.tensor([0, -4, 1])), {"vocab_size": 10}, "tokens.values", "token id -4"),
        (
            tensor_pb2.RaggedTensor(values=_tensor(Dtype.DTYPE_INT64, (1, 2), b"\0" * 16), lengths=[2]),
            {},
            "tokens.values.shape",
            "must have 1 dimension(s), got [1, 2]",
        ),
        (
            tensor_pb2.RaggedTensor(values=_tensor(Dtype.DTYPE_INT64, (2,), b"\0" * 3), lengths=[2]),
            {},
            "tokens.values.data",
            "has 3 bytes",
        ),
        (
            tensor_pb2.RaggedTensor(values=_tensor(Dtype.DTYPE_UNSPECIFIED, (2,), b""), lengths=[2]),
            {},
            "tokens.values.dtype",
            "unspecified",
        ),
    ],
)
def test_malformed_token_batch(msg, kwargs, field, text):
    err = _err(codec.tokens_from_proto, msg, "tokens", **kwargs)
    assert err.field == field, str(err)
    assert text in err.problem, str(err)


def test_float_ragged_rejects_integer_values_and_allows_empty_when_asked():
    err = _err(codec.ragged_from_proto, _ragged([2]), "returns", kind="float")
    assert err.field == "returns.values.dtype"
    empty = codec.ragged_from_proto(tensor_pb2.RaggedTensor(), "returns", kind="float", allow_empty=True)
    assert len(empty) == 0 and empty.values.dtype == torch.float32
