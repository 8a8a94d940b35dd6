"""Tensors on the wire: `aligner.v1.Tensor` / `RaggedTensor` <-> torch (and numpy), validated.

A `Tensor` is `{dtype, shape, data}` with `data` the raw little-endian bytes of a C-order array; a
`RaggedTensor` is a 1-D `values` tensor (all rows concatenated) plus `lengths`. Everything that
arrives from a client is checked before use, and each problem raises
`common.errors.InvalidArgument` naming the full field path (`tokens.values.dtype`,
`tokens.lengths`, ...), which the gRPC layer turns into INVALID_ARGUMENT.

Copies: protobuf's upb runtime hands out a fresh copy of a `bytes` field on every access, so the
decoders read `data` once. Decoding to numpy adds nothing to that copy (a read-only view of it);
decoding to torch copies once more into writable memory, because a tensor over an immutable
`bytes` object would let an in-place op mutate it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from aligner.v1 import tensor_pb2

from common.errors import InvalidArgument

Dtype = tensor_pb2.Dtype


@dataclass(frozen=True)
class _DtypeInfo:
    name: str
    torch: torch.dtype
    numpy: np.dtype  # little-endian storage type; bf16 is stored as its raw uint16 bits
    kind: str  # "float" | "int" | "bool"


_DTYPES: dict[int, _DtypeInfo] = {
    Dtype.DTYPE_FLOAT32: _DtypeInfo("float32", torch.float32, np.dtype("<f4"), "float"),
    Dtype.DTYPE_FLOAT16: _DtypeInfo("float16", torch.float16, np.dtype("<f2"), "float"),
    Dtype.DTYPE_BFLOAT16: _DtypeInfo("bfloat16", torch.bfloat16, np.dtype("<u2"), "float"),
    Dtype.DTYPE_FLOAT64: _DtypeInfo("float64", torch.float64, np.dtype("<f8"), "float"),
    Dtype.DTYPE_INT64: _DtypeInfo("int64", torch.int64, np.dtype("<i8"), "int"),
    Dtype.DTYPE_INT32: _DtypeInfo("int32", torch.int32, np.dtype("<i4"), "int"),
    Dtype.DTYPE_INT16: _DtypeInfo("int16", torch.int16, np.dtype("<i2"), "int"),
    Dtype.DTYPE_INT8: _DtypeInfo("int8", torch.int8, np.dtype("i1"), "int"),
    Dtype.DTYPE_UINT8: _DtypeInfo("uint8", torch.uint8, np.dtype("u1"), "int"),
    Dtype.DTYPE_BOOL: _DtypeInfo("bool", torch.bool, np.dtype("?"), "bool"),
}
_FROM_TORCH = {info.torch: code for code, info in _DTYPES.items()}
_FROM_NUMPY = {
    info.numpy.newbyteorder("="): code for code, info in _DTYPES.items() if code != Dtype.DTYPE_BFLOAT16
}
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"
_KIND_NAMES = {"float": "a floating-point", "int": "an integer", "bool": "a bool"}

SUPPORTED_DTYPES: tuple[int, ...] = tuple(_DTYPES)


def dtype_name(dtype: int) -> str:
    info = _DTYPES.get(dtype)
    return info.name if info else f"unknown({dtype})"


def dtype_of_torch(dtype: torch.dtype) -> int:
    """The wire `Dtype` of a torch dtype; TypeError for one the wire cannot carry (e.g. complex)."""
    try:
        return _FROM_TORCH[dtype]
    except KeyError:
        raise TypeError(f"torch dtype {dtype} has no aligner.v1.Dtype") from None


def torch_dtype(dtype: int) -> torch.dtype:
    return _DTYPES[dtype].torch


def itemsize(dtype: int) -> int:
    return _DTYPES[dtype].numpy.itemsize


# ---------------------------------------------------------------------------------------------
# Encoding (trusted, local values -> wire)
# ---------------------------------------------------------------------------------------------


def tensor_to_proto(t: torch.Tensor, dtype: int | torch.dtype | None = None) -> tensor_pb2.Tensor:
    """Encode a torch tensor (any device, any layout), optionally cast to `dtype` first."""
    if dtype is not None:
        t = t.to(_as_torch_dtype(dtype))
    code = dtype_of_torch(t.dtype)
    t = t.detach().to("cpu").contiguous()
    if code == Dtype.DTYPE_BFLOAT16:
        # numpy has no bfloat16: ship its 16 raw bits.
        array = t.view(torch.int16).numpy().view(np.uint16)
    else:
        array = t.numpy()
    return tensor_pb2.Tensor(dtype=code, shape=list(t.shape), data=_le_bytes(array, _DTYPES[code].numpy))


def array_to_proto(array: np.ndarray) -> tensor_pb2.Tensor:
    """Encode a numpy array (bfloat16 has no numpy type: use `tensor_to_proto`)."""
    array = np.asarray(array)
    code = _FROM_NUMPY.get(array.dtype.newbyteorder("="))
    if code is None:
        raise TypeError(f"numpy dtype {array.dtype} has no aligner.v1.Dtype")
    return tensor_pb2.Tensor(dtype=code, shape=list(array.shape), data=_le_bytes(array, _DTYPES[code].numpy))


def ragged_to_proto(
    rows: Sequence[torch.Tensor | np.ndarray | Sequence[int] | Sequence[float]],
    dtype: int | torch.dtype | None = None,
) -> tensor_pb2.RaggedTensor:
    """Encode a batch of 1-D rows (tensors, arrays or lists). `dtype` defaults to the rows' dtype
    (int64 for lists of ints, float32 for lists of floats)."""
    target = _as_torch_dtype(dtype) if dtype is not None else None
    tensors = [_as_1d_tensor(row, i, target) for i, row in enumerate(rows)]
    lengths = [int(t.numel()) for t in tensors]
    # Empty rows carry no dtype information (an empty list is float32 to torch): leave them out.
    nonempty = [t for t in tensors if t.numel()]
    flat = torch.cat(nonempty) if nonempty else torch.empty(0, dtype=target or torch.int64)
    return flat_to_ragged_proto(flat, lengths, dtype=dtype)


def flat_to_ragged_proto(
    values: torch.Tensor, lengths: Sequence[int] | torch.Tensor, dtype: int | torch.dtype | None = None
) -> tensor_pb2.RaggedTensor:
    """Encode an already-concatenated batch: 1-D `values` and the length of each row."""
    lengths = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
    if values.dim() != 1:
        raise ValueError(f"ragged values must be 1-D, got shape {tuple(values.shape)}")
    if any(n < 0 for n in lengths) or sum(lengths) != values.numel():
        raise ValueError(f"row lengths {lengths} do not add up to {values.numel()} values")
    return tensor_pb2.RaggedTensor(values=tensor_to_proto(values, dtype), lengths=lengths)


# ---------------------------------------------------------------------------------------------
# Decoding (untrusted wire -> validated values)
# ---------------------------------------------------------------------------------------------


def array_from_proto(
    msg: tensor_pb2.Tensor, field: str, *, kind: str | None = None, ndim: int | None = None
) -> np.ndarray:
    """Validate and decode to a read-only numpy view of the bytes. bfloat16 has no numpy type, so it
    is widened to float32 (exact). `kind` ("float", "int", "bool") and `ndim` are optional checks."""
    data = msg.data  # one copy out of the message (see the module docstring)
    info = _check_tensor(msg, data, field, kind=kind, ndim=ndim)
    array = np.frombuffer(data, dtype=info.numpy)
    if info.torch is torch.bfloat16:
        # bf16 is the top half of a float32: widen by shifting the bits up.
        array = (array.astype(np.uint32) << 16).view(np.float32)
    elif not _LITTLE_ENDIAN_HOST:
        array = array.astype(info.numpy.newbyteorder("="))
    return array.reshape(tuple(msg.shape))


def tensor_from_proto(
    msg: tensor_pb2.Tensor, field: str, *, kind: str | None = None, ndim: int | None = None
) -> torch.Tensor:
    """Validate and decode to a (writable, CPU) torch tensor of the wire dtype."""
    data = msg.data
    info = _check_tensor(msg, data, field, kind=kind, ndim=ndim)
    # astype copies into writable memory in native byte order (see the module docstring).
    array = np.frombuffer(data, dtype=info.numpy).astype(info.numpy.newbyteorder("="))
    t = torch.from_numpy(array)
    if info.torch is torch.bfloat16:
        t = t.view(torch.int16).view(torch.bfloat16)
    return t.reshape(tuple(msg.shape))


@dataclass(frozen=True)
class Ragged:
    """A decoded batch: `values` (1-D) holds every row back to back; `lengths` (int64) per row."""

    values: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return int(self.lengths.numel())

    def rows(self) -> list[torch.Tensor]:
        """The rows as views into `values`."""
        return list(torch.split(self.values, self.lengths.tolist()))

    def offsets(self) -> torch.Tensor:
        """Start of each row in `values`, plus the total at the end (len(self) + 1 entries)."""
        return torch.cat([self.lengths.new_zeros(1), torch.cumsum(self.lengths, 0)])

    def padded(self, pad_value: float | int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded `[batch, max_len]` tensor and its boolean mask (True on real entries)."""
        max_len = int(self.lengths.max()) if len(self) else 0
        mask = torch.arange(max_len).unsqueeze(0) < self.lengths.unsqueeze(1)
        out = torch.full((len(self), max_len), pad_value, dtype=self.values.dtype)
        out[mask] = self.values
        return out, mask


def ragged_from_proto(
    msg: tensor_pb2.RaggedTensor,
    field: str,
    *,
    kind: str | None = None,
    min_length: int = 0,
    max_length: int | None = None,
    allow_empty: bool = False,
) -> Ragged:
    """Validate and decode a ragged batch. Checks: values known dtype of the right `kind`, 1-D,
    size matching its bytes; lengths >= `min_length`, <= `max_length`, summing to the values'
    size; at least one row unless `allow_empty`."""
    if not msg.HasField("values") and not msg.lengths:
        if not allow_empty:
            raise InvalidArgument(field, "is missing")
        empty_dtype = torch.int64 if kind == "int" else torch.bool if kind == "bool" else torch.float32
        return Ragged(values=torch.empty(0, dtype=empty_dtype), lengths=torch.empty(0, dtype=torch.int64))
    values = tensor_from_proto(msg.values, f"{field}.values", kind=kind, ndim=1)
    lengths = _check_lengths(
        msg, field, min_length=min_length, max_length=max_length, allow_empty=allow_empty
    )
    return Ragged(values=values, lengths=lengths)


def tokens_from_proto(
    msg: tensor_pb2.RaggedTensor,
    field: str,
    *,
    vocab_size: int | None = None,
    min_length: int = 1,
    max_length: int | None = None,
    allow_empty: bool = False,
) -> Ragged:
    """A ragged batch of token ids: integer dtype, every id in [0, vocab_size); values as int64."""
    ragged = ragged_from_proto(
        msg, field, kind="int", min_length=min_length, max_length=max_length, allow_empty=allow_empty
    )
    ids = ragged.values.to(torch.int64)
    bad = ids < 0 if vocab_size is None else (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        row = int(torch.searchsorted(ragged.offsets(), i, right=True)) - 1
        limit = "be >= 0" if vocab_size is None else f"be in [0, {vocab_size})"
        raise InvalidArgument(
            f"{field}.values", f"token id {int(ids[i])} at position {i} (row {row}) must {limit}"
        )
    return Ragged(values=ids, lengths=ragged.lengths)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _check_tensor(
    msg: tensor_pb2.Tensor, data: bytes, field: str, *, kind: str | None, ndim: int | None
) -> _DtypeInfo:
    info = _DTYPES.get(msg.dtype)
    if info is None:
        problem = (
            "is unspecified" if msg.dtype == Dtype.DTYPE_UNSPECIFIED else f"{msg.dtype} is not a known Dtype"
        )
        raise InvalidArgument(f"{field}.dtype", problem)
    if kind is not None and info.kind != kind:
        raise InvalidArgument(f"{field}.dtype", f"must be {_KIND_NAMES[kind]} dtype, got {info.name}")
    shape = list(msg.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{field}.shape", f"{shape} has a negative dimension")
    if ndim is not None and len(shape) != ndim:
        raise InvalidArgument(f"{field}.shape", f"must have {ndim} dimension(s), got {shape}")
    expected = int(np.prod(shape, dtype=object)) * info.numpy.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"{field}.data",
            f"has {len(data)} bytes, but shape {shape} of {info.name} needs {expected}",
        )
    if info.kind == "bool" and data and int(np.frombuffer(data, np.uint8).max()) > 1:
        raise InvalidArgument(f"{field}.data", "bool bytes must be 0 or 1")
    return info


def _check_lengths(
    msg: tensor_pb2.RaggedTensor, field: str, *, min_length: int, max_length: int | None, allow_empty: bool
) -> torch.Tensor:
    lengths = torch.tensor(list(msg.lengths), dtype=torch.int64)
    if lengths.numel() == 0 and not allow_empty:
        raise InvalidArgument(f"{field}.lengths", "is empty: the batch needs at least one row")
    for bad, problem in (
        (lengths < 0, "must be >= 0"),
        (lengths < min_length, f"must be >= {min_length}"),
        (lengths > max_length if max_length is not None else None, f"must be <= {max_length}"),
    ):
        if bad is not None and bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise InvalidArgument(f"{field}.lengths", f"row {i} has length {int(lengths[i])}, {problem}")
    total, size = int(lengths.sum()), int(msg.values.shape[0])
    if total != size:
        raise InvalidArgument(f"{field}.lengths", f"sum to {total}, but {field}.values has {size} elements")
    return lengths


def _le_bytes(array: np.ndarray, le_dtype: np.dtype) -> bytes:
    return np.ascontiguousarray(array).astype(le_dtype, copy=False).tobytes()


def _as_torch_dtype(dtype: int | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise TypeError(f"{dtype} is not a supported aligner.v1.Dtype")
    return _DTYPES[dtype].torch


def _as_1d_tensor(row, index: int, dtype: torch.dtype | None) -> torch.Tensor:
    t = row if isinstance(row, torch.Tensor) else torch.as_tensor(row)
    if t.dim() != 1:
        raise ValueError(f"row {index} must be 1-D, got shape {tuple(t.shape)}")
    t = t.detach().to("cpu")
    return t.to(dtype) if dtype is not None else t
