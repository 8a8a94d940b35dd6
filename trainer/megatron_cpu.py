"""Run megatron-core 0.16.1 on a machine without CUDA.

Megatron assumes a GPU in a handful of places. `apply()` patches exactly those, and only when
`torch.cuda.is_available()` is false (on a GPU machine it does nothing). It must run before a
model is built; `trainer.parallel.init_parallel` calls it. What it changes, and why:

1. `torch.cuda.current_device()` returns the CPU device: megatron passes it as `device=` for
   attention score buffers, tensor-parallel gathers, KV caches, rotary tables and DDP buffers.
2. `torch.cuda.synchronize()` is a no-op (the checkpoint saver and parallel_state call it).
3. The model-parallel RNG tracker forks the CPU generator instead of the CUDA one
   (`CpuRNGStatesTracker`, same interface as `CudaRNGStatesTracker`), the tracker module's
   get/set CUDA-RNG-state helpers read and write the CPU state (activation recompute restores
   them), and `model_parallel_cuda_manual_seed` seeds that tracker (one seed per TP rank).
4. Hard-coded `device='cuda'` scalar tensors (`torch.tensor/zeros/ones/empty/full/arange`) in
   `megatron.core.optimizer.*`, `megatron.core.utils`, `megatron.core.transformer.utils` (the
   default causal mask), the pipeline schedules and the rerun state machine are created on the
   CPU: those modules see a `torch` whose factory functions turn a CUDA device into the CPU.
5. `clip_grad_by_total_norm_fp32` is replaced: the original asserts `torch.cuda.FloatTensor`.

Keep `gradient_accumulation_fusion`, `apply_rope_fusion`, `persist_layer_norm` and
`sequence_parallel` off on CPU (`trainer.model` does). Still CUDA-only after this: the
distributed optimizer, the bf16/fp16 Megatron optimizers and the dynamic inference engine.
"""

from __future__ import annotations

import contextlib
import importlib
import types

import torch

_applied = False

_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange")
# Every megatron module that creates tensors with a hard-coded `device='cuda'` on a CPU path.
_CUDA_SCALAR_MODULES = (
    "megatron.core.utils",
    "megatron.core.transformer.utils",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.pipeline_parallel.schedules",  # token counting in forward_backward_func
    "megatron.core.rerun_state_machine",
)


def _is_cuda(device) -> bool:
    if isinstance(device, int):
        return True  # a bare index means a CUDA ordinal in megatron's code
    return device is not None and torch.device(device).type == "cuda"


def _cpu_factory(fn):
    def factory(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
            kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return factory


class _CpuTorch(types.ModuleType):
    """`torch` as seen by a patched megatron module: factories never allocate on CUDA."""

    def __init__(self):
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


class CpuRNGStatesTracker:
    """The CPU twin of megatron's `CudaRNGStatesTracker`: named generator states that `fork()`
    swaps into the (CPU) default generator and back, so dropout inside tensor-parallel regions
    draws from a per-TP-rank stream and activation recompute can replay it."""

    def __init__(self, *args, **kwargs):
        self.use_cudagraphable_rng = False
        self.is_inference_rng_tracker = False
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = states

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outside = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outside)


def _cpu_model_parallel_manual_seed(seed: int, *args, tp_rank=None, ep_rank=None, etp_rank=None, **kwargs):
    """Megatron's seeding scheme (data-parallel seed, TP seed = seed + 2718 + tp_rank, expert
    seed) on the CPU generator."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    tp_rank = ps.get_tensor_model_parallel_rank() if tp_rank is None else tp_rank
    ep_rank = ps.get_expert_model_parallel_rank() if ep_rank is None else ep_rank
    etp_rank = ps.get_expert_tensor_parallel_rank() if etp_rank is None else etp_rank
    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    torch.manual_seed(seed)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)


def _clip_grad_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Scale gradients in place so that their total norm is at most `max_norm` (any device)."""
    from megatron.core.utils import to_local_if_dtensor

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [
        to_local_if_dtensor(getattr(p, attr)).detach()
        for p in parameters
        if getattr(p, attr, None) is not None
    ]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def apply() -> bool:
    """Patch megatron-core for CPU when CUDA is absent. Idempotent; returns whether it patched."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True

    # Megatron's warnings that apex/TE are missing are filtered with the other benign ones, by
    # exact text, in common/logging.py (quiet_third_party).

    # 1, 2
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None

    # 3
    import megatron.core.tensor_parallel as tp
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)
    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mrandom.model_parallel_cuda_manual_seed = _cpu_model_parallel_manual_seed
    tp.model_parallel_cuda_manual_seed = _cpu_model_parallel_manual_seed

    # 4
    cpu_torch = _CpuTorch()
    for name in _CUDA_SCALAR_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = cpu_torch

    # 5
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as optimizer_impl

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm
    optimizer_impl.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm

    _applied = True
    return True
