#!/usr/bin/env python3
"""Pinned requirements for an image built on an NVIDIA base image.

`image_requirements.py PYPROJECT CONSTRAINTS OUT_REQUIREMENTS OUT_CONSTRAINTS`

The project's dependencies (pyproject.toml) and pins (constraints.txt) name the CPU torch wheel of
the developer machines. In an image the base's CUDA build of torch (and, for generation,
TensorRT-LLM) must stay, so both lists are written again without the packages the base provides.
Every remaining requirement must have a pin in the constraints: an unpinned one is an error here,
not a surprise in a later build.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# Provided by the NVIDIA base images (PyTorch, and Triton + TensorRT-LLM); never reinstalled.
BASE_PROVIDED = {"torch", "triton", "tensorrt", "tensorrt-llm"}
# CUDA runtime wheels (nvidia-cublas-cu12, ...) come with the base's CUDA; nvidia-pytriton is ours.
_CUDA_WHEEL = re.compile(r"^nvidia-(?!pytriton$)")


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    if not match:
        raise ValueError(f"cannot read a package name from {line!r}")
    return canonical(match.group(1))


def provided_by_base(name: str) -> bool:
    return name in BASE_PROVIDED or bool(_CUDA_WHEEL.match(name))


def image_lists(pyproject: str, constraints: str) -> tuple[list[str], list[str]]:
    """(requirements, constraints) for the image, from the texts of pyproject.toml and constraints.txt."""
    dependencies = tomllib.loads(pyproject)["project"]["dependencies"]
    pins = [line.strip() for line in constraints.splitlines() if line.strip() and not line.startswith("#")]
    pinned = {requirement_name(line) for line in pins}
    requirements = [dep for dep in dependencies if not provided_by_base(requirement_name(dep))]
    unpinned = [dep for dep in requirements if requirement_name(dep) not in pinned]
    if unpinned:
        raise ValueError(f"dependencies without a pin in constraints.txt: {', '.join(unpinned)}")
    image_pins = [line for line in pins if not provided_by_base(requirement_name(line))]
    return requirements, image_pins


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    pyproject, constraints, out_requirements, out_constraints = (Path(arg) for arg in argv)
    try:
        requirements, pins = image_lists(pyproject.read_text(), constraints.read_text())
    except ValueError as exc:
        print(f"image_requirements: error: {exc}", file=sys.stderr)
        return 1
    out_requirements.write_text("\n".join(requirements) + "\n")
    out_constraints.write_text("\n".join(pins) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
