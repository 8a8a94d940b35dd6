"""torch.distributed and Megatron model-parallel setup, for one process or a `torchrun` job.

`init_parallel()` is the one entry point: under `torchrun` it reads RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT from the environment; in a plain process it starts a single-process
group on 127.0.0.1 itself. The backend is NCCL when CUDA is available, gloo otherwise (and then
the CPU shim `trainer.megatron_cpu` is applied first). It then sets Megatron's tensor/pipeline
parallel groups and seeds the model-parallel RNG tracker. Calling it again with the same sizes
does nothing; with other sizes it rebuilds the model-parallel groups.
"""

from __future__ import annotations

import atexit
import os
import tempfile

import torch
import torch.distributed as dist

from common.errors import InvalidArgument

_sizes: tuple[int, int] | None = None


def device() -> torch.device:
    """The device this process computes on: its local GPU under CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _init_process_group() -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun (env:// rendezvous)
        dist.init_process_group(backend=backend)
        return
    # A plain process: a private one-member group. A FileStore needs no port.
    store_file = tempfile.NamedTemporaryFile(prefix="aligner-dist-", delete=False)
    store_file.close()
    atexit.register(lambda: os.path.exists(store_file.name) and os.unlink(store_file.name))
    store = dist.FileStore(store_file.name, 1)
    dist.init_process_group(backend=backend, store=store, rank=0, world_size=1)


def init_parallel(
    tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1, seed: int = 1234
) -> None:
    """Initialise torch.distributed (if needed) and Megatron's model-parallel state."""
    global _sizes
    if not torch.cuda.is_available():
        from trainer import megatron_cpu

        megatron_cpu.apply()
    from megatron.core import parallel_state

    if not dist.is_initialized():
        _init_process_group()
    world = dist.get_world_size()
    sizes = (int(tensor_model_parallel_size), int(pipeline_model_parallel_size))
    if sizes[0] < 1 or world % sizes[0]:
        raise InvalidArgument(
            "tensor_model_parallel_size", f"{sizes[0]} must be >= 1 and divide the world size {world}"
        )
    if sizes[1] < 1 or world % (sizes[0] * sizes[1]):
        raise InvalidArgument(
            "pipeline_model_parallel_size",
            f"{sizes[1]} x tensor parallel {sizes[0]} must divide the world size {world}",
        )
    if _sizes == sizes and parallel_state.model_parallel_is_initialized():
        return
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=sizes[0], pipeline_model_parallel_size=sizes[1]
    )
    reseed(seed)
    _sizes = sizes


def reseed(seed: int) -> None:
    """Seed torch (CPU and CUDA) and Megatron's model-parallel RNG tracker: the data-parallel
    stream gets `seed`, each tensor-parallel rank its own stream (`seed + 2718 + tp_rank`)."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def tp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank()


def tp_world_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()
