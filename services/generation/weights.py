"""Weight pushes: `aligner.v1.Generation.UpdateWeights` chunks -> a validated, complete state dict.

A push is a client stream of `UpdateWeightsRequest`s, each a 1-D slice (`data`, starting at
element `offset`) of one named parameter of full `shape`, all for one `policy_version`. The
assembler checks every chunk against the engine's parameters as it arrives (name, shape, dtype,
offset range) and, at the end, that every parameter is covered exactly once; only then does the
service apply the whole state dict, atomically, under the engine lock. A bad chunk raises
`InvalidArgument` naming the field and the parameter, and nothing is applied.

Sending side: `chunk_state_dict` cuts a state dict into such messages.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from aligner.v1 import generation_pb2

from common import codec
from common.errors import AlignerError, InvalidArgument


class StaleVersion(AlignerError):
    """A push (or a generation request) whose policy version does not fit the engine's."""


@dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def param_specs(model: torch.nn.Module) -> dict[str, ParamSpec]:
    """Name -> (shape, dtype) of every weight tensor a push must carry (megatron's `_extra_state`
    entries are checkpoint metadata, not weights)."""
    return {
        name: ParamSpec(tuple(t.shape), t.dtype)
        for name, t in model.state_dict(keep_vars=True).items()
        if isinstance(t, torch.Tensor) and not name.endswith("_extra_state")
    }


class WeightAssembler:
    """Collects the chunks of one push into full tensors (on the CPU, in each parameter's dtype)."""

    def __init__(self, specs: Mapping[str, ParamSpec], current_version: int):
        self._specs = specs
        self._current_version = current_version
        self.policy_version: int | None = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._spans: dict[str, list[tuple[int, int]]] = {}
        self.num_bytes = 0
        self.num_chunks = 0

    def add(self, chunk: generation_pb2.UpdateWeightsRequest) -> None:
        where = f"chunk {self.num_chunks}"
        if self.policy_version is None:
            if chunk.policy_version <= self._current_version:
                raise StaleVersion(
                    f"policy_version: {chunk.policy_version} is not newer than the engine's version "
                    f"{self._current_version}"
                )
            self.policy_version = chunk.policy_version
        elif chunk.policy_version != self.policy_version:
            raise InvalidArgument(
                "policy_version",
                f"{where} says {chunk.policy_version}, the stream started with {self.policy_version}",
            )
        name = chunk.name
        spec = self._specs.get(name)
        if spec is None:
            known = ", ".join(sorted(self._specs)[:3])
            raise InvalidArgument(
                "name", f"{where}: {name!r} is not a parameter of the model (e.g. {known}, ...)"
            )
        if tuple(chunk.shape) != spec.shape:
            raise InvalidArgument(
                "shape", f"{where} of {name!r}: {list(chunk.shape)} != the model's {list(spec.shape)}"
            )
        kind = "float" if spec.dtype.is_floating_point else None
        data = codec.tensor_from_proto(chunk.data, "data", kind=kind, ndim=1)
        if kind is None and data.dtype != spec.dtype:
            raise InvalidArgument(
                "data.dtype", f"{where} of {name!r}: {data.dtype} != the model's {spec.dtype}"
            )
        start, size = chunk.offset, data.numel()
        if start < 0 or start + size > spec.numel:
            raise InvalidArgument(
                "offset", f"{where} of {name!r}: elements [{start}, {start + size}) outside [0, {spec.numel})"
            )
        buffer = self._buffers.get(name)
        if buffer is None:
            buffer = self._buffers[name] = torch.empty(spec.numel, dtype=spec.dtype)
            self._spans[name] = []
        buffer[start : start + size] = data  # casts a float chunk to the parameter's dtype
        self._spans[name].append((start, size))
        self.num_bytes += len(chunk.data.data)
        self.num_chunks += 1

    def finish(self) -> dict[str, torch.Tensor]:
        """The complete state dict; checks that every parameter arrived and each element exactly
        once."""
        if self.num_chunks == 0:
            raise InvalidArgument("UpdateWeightsRequest", "the stream had no chunks")
        missing = sorted(set(self._specs) - set(self._buffers))
        if missing:
            raise InvalidArgument("name", f"{len(missing)} parameter(s) never sent: {', '.join(missing[:5])}")
        for name, spans in self._spans.items():
            position = 0
            for start, size in sorted(spans):
                if start != position:
                    problem = "overlap" if start < position else "a gap"
                    raise InvalidArgument(
                        "offset", f"chunks of {name!r} have {problem} at element {min(start, position)}"
                    )
                position = start + size
            if position != self._specs[name].numel:
                raise InvalidArgument(
                    "offset", f"chunks of {name!r} end at element {position} of {self._specs[name].numel}"
                )
        return {name: buf.view(self._specs[name].shape) for name, buf in self._buffers.items()}


def chunk_state_dict(
    state_dict: Mapping[str, torch.Tensor], policy_version: int, chunk_bytes: int = 4 << 20
) -> Iterator[generation_pb2.UpdateWeightsRequest]:
    """Cut a state dict into `UpdateWeightsRequest`s of at most about `chunk_bytes` of data each
    (one parameter per message; big parameters span several). Non-tensor entries (megatron's
    `_extra_state`) are skipped."""
    if chunk_bytes < 1:
        raise InvalidArgument("chunk_bytes", f"must be >= 1, got {chunk_bytes}")
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor) or name.endswith("_extra_state"):
            continue
        flat = tensor.detach().to("cpu").contiguous().view(-1)
        step = max(1, chunk_bytes // flat.element_size())
        for start in range(0, max(flat.numel(), 1), step):
            yield generation_pb2.UpdateWeightsRequest(
                policy_version=policy_version,
                name=name,
                shape=list(tensor.shape),
                offset=start,
                data=codec.tensor_to_proto(flat[start : start + step]),
            )
