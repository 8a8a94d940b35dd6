"""Our resumable checkpoint format.

A checkpoint is a directory:

    meta.json      format version, step, consumed samples, model arch, value head?, what else is
                   inside, the TP/world size it was saved at, the job config, caller extras
    config.yaml    the job config again, for people
    weights/       model + optimizer (+ scheduler, optimizer step) through Megatron
                   `dist_checkpointing` (torch_dist backend): every rank writes its shards, and
                   a checkpoint saved at one tensor-parallel size loads at another
    rng/rank_00000.pt ...   python / numpy / torch / Megatron-tracker RNG states of each rank
    tokenizer/     the tokenizer (a Hugging Face tokenizer directory), when given

It is written into `<dst>.tmp-<random>` and renamed into place, so a crash never leaves a
half-written directory under the final name; an existing checkpoint of the same name is renamed
away first and deleted after. Runs keep theirs as `<run_dir>/checkpoints/step_000010`;
`latest_checkpoint` sees only complete ones.

`load_model_for_inference` (and `load_pretrained`) also take a Hugging Face Llama/Mistral
directory, imported on the fly, so every command can start from an imported model.

Megatron's saver needs `psutil` (without it a save hangs). Its writer is built for asynchronous
saves: it forks one process per file and hands the results back through a queue that it creates,
on first use, in a spawn-mode multiprocessing manager. Both hurt a synchronous save: the manager
costs ~5 s per process, needs an `if __name__ == "__main__":` guard in every saving script and is
orphaned whenever the saver dies, and forking a process that runs other threads (a gRPC server
saving the critic) can deadlock the child on a lock some other thread held. `_write_in_process`
makes megatron write its files in the saving thread and return the results through a plain queue.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import random
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from common.config import MegatronRuntimeConfig, ModelArchConfig
from common.errors import AlignerError, InvalidArgument, NotFound

log = structlog.get_logger(__name__)

FORMAT_VERSION = 1
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"
WEIGHTS_DIR = "weights"
RNG_DIR = "rng"
TOKENIZER_DIR = "tokenizer"
CHECKPOINTS_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")

# Arch fields that define the weights and the function they compute; a checkpoint loads into a
# model only when these agree (parallel sizes, precision, dropout and sequence length may differ).
MODEL_DEFINING_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "vocab_size", "rotary_base", "norm_epsilon", "share_embeddings_and_output_weights",
)  # fmt: skip


@dataclass
class CheckpointMeta:
    path: Path
    step: int
    arch: ModelArchConfig
    has_value_head: bool
    config: dict[str, Any] = field(default_factory=dict)
    consumed_samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    has_optimizer: bool = False
    optimizer_state_keys: list[str] = field(default_factory=list)
    # Positions (in param_groups order) of the parameters that had optimizer state; None = all.
    optimizer_state_param_ids: list[int] | None = None
    has_scheduler: bool = False
    tensor_model_parallel_size: int = 1
    world_size: int = 1
    format_version: int = FORMAT_VERSION


# ---------------------------------------------------------------------------------------------
# Atomic directories
# ---------------------------------------------------------------------------------------------


def _tmp_path(dst: Path, token: str) -> Path:
    return dst.with_name(f"{dst.name}.tmp-{token}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_directory(tmp: str | Path, dst: str | Path) -> None:
    """Move the finished directory `tmp` to `dst`. An existing `dst` is renamed away first and
    deleted after, so at every instant `dst` is either the old or the new complete directory
    (or, for an instant, absent)."""
    tmp, dst = Path(tmp), Path(dst)
    _fsync_dir(tmp)
    if dst.exists() or dst.is_symlink():
        if not dst.is_dir():
            raise InvalidArgument(str(dst), "exists and is not a directory")
        old = dst.with_name(f"{dst.name}.old-{secrets.token_hex(4)}")
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)
    _fsync_dir(dst.parent)


def write_directory_atomically(dst: str | Path, fill: Callable[[Path], None]) -> Path:
    """Call `fill(tmp_dir)` and rename the result to `dst` (single process)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(dst, secrets.token_hex(4))
    tmp.mkdir()
    try:
        fill(tmp)
        publish_directory(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


# ---------------------------------------------------------------------------------------------
# Run directories: checkpoints/step_NNNNNN
# ---------------------------------------------------------------------------------------------


def step_checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{step:06d}"


def is_checkpoint(path: str | Path) -> bool:
    """One of our complete checkpoints (tmp directories never have the final name)."""
    return (Path(path) / META_FILE).is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete step checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and is_checkpoint(child):
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (keep_last <= 0 keeps all), and
    leftovers of interrupted saves. Returns the deleted paths. Call it on one rank only."""
    deleted = []
    if keep_last > 0:
        for path in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    root = Path(run_dir) / CHECKPOINTS_DIR
    if root.is_dir():
        for child in root.iterdir():
            if re.search(r"\.(tmp|old)-[0-9a-f]+$", child.name) and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
                deleted.append(child)
    return deleted


# ---------------------------------------------------------------------------------------------
# Sharded state dicts (Megatron dist_checkpointing)
# ---------------------------------------------------------------------------------------------


def model_sharded_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """Megatron's sharded state dict of an `AlignerGPT`: the GPTModel's own (TP-aware) plus the
    value head as a replicated tensor."""
    from megatron.core import parallel_state
    from megatron.core.transformer.utils import sharded_state_dict_default

    # The TP group is passed explicitly: without it megatron-core gives the replicated value head
    # replica id 0 on every TP rank, and a TP>1 save or load fails its sharding validation.
    tp_group = parallel_state.get_tensor_model_parallel_group()
    sharded: dict[str, Any] = {}
    for name, child in model.named_children():
        if child is not None:
            sharded.update(sharded_state_dict_default(child, prefix=f"{name}.", tp_group=tp_group))
    return sharded


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _optimizer_sharded_state_dict(
    optimizer, model_sharded: dict[str, Any], state: dict[str, Any]
) -> dict[str, Any]:
    """Shard a torch optimizer's per-parameter states like the parameters they belong to (so they
    reshard with them). Adam's scalar per-parameter `step` is the same for every parameter and
    is kept once, as `common_step` (as Megatron's own FP32Optimizer does)."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )

    steps = [torch.as_tensor(s["step"]) for s in state["state"].values() if "step" in s]
    if any(not torch.equal(s, steps[0]) for s in steps):
        raise AlignerError("optimizer: per-parameter steps differ; cannot checkpoint")
    id_map = get_param_id_to_sharded_param_map(model_sharded, _optimizer_params(optimizer))
    optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
    return {"optimizer": state, "common_step": steps[0].clone() if steps else None}


def _state_keys(optimizer: torch.optim.Optimizer) -> list[str]:
    keys: set[str] = set()
    for s in optimizer.state.values():
        keys.update(k for k, v in s.items() if k != "step" and isinstance(v, torch.Tensor))
    return sorted(keys)


def _state_param_ids(optimizer: torch.optim.Optimizer) -> list[int]:
    """Positions of the parameters with state: one that never got a gradient has none."""
    return [i for i, p in enumerate(_optimizer_params(optimizer)) if optimizer.state.get(p)]


def _prepare_optimizer_for_load(
    optimizer: torch.optim.Optimizer, keys: list[str], ids: list[int] | None
) -> None:
    """Give the parameters that had state at save time a state of the saved kinds (zeros) for
    the loader to fill in."""
    optimizer.state.clear()
    if not keys:
        return
    params = _optimizer_params(optimizer)
    for p in params if ids is None else [params[i] for i in ids]:
        optimizer.state[p] = {k: torch.zeros_like(p, memory_format=torch.preserve_format) for k in keys}
        optimizer.state[p]["step"] = torch.tensor(0.0)


def _write_in_process() -> None:
    """See the module docstring. megatron 0.16's `filesystem_async._get_write_results_queue`
    returns the module global `_results_queue` when it is set, and the writer's save function is
    its `write_preloaded_data_multiproc`; we set both (idempotent)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    filesystem_async.FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(_write_buckets)


def _write_buckets(transform_list, use_msc, rank, write_buckets, results_queue) -> None:
    """Megatron's per-file writer (`write_preloaded_data`) run on each file in turn, in this
    thread; puts {file index: write results} or the first exception, as megatron's forking
    version does."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    results: dict[int, Any] = {}
    local: queue.Queue = queue.Queue()
    done: queue.Queue = queue.Queue()  # the writer marks itself finished on this one
    for index, bucket in enumerate(write_buckets):
        done.put(index)
        FileSystemWriterAsync.write_preloaded_data(
            transform_list, index, bucket, local, done, True, use_msc=use_msc
        )
        _, outcome = local.get()
        if isinstance(outcome, Exception):
            results_queue.put(outcome)
            return
        results[index] = outcome
    results_queue.put(results)


# ---------------------------------------------------------------------------------------------
# RNG states
# ---------------------------------------------------------------------------------------------


def _megatron_tracker():
    from megatron.core import tensor_parallel

    return tensor_parallel.get_cuda_rng_tracker()


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
        "megatron_tracker": _megatron_tracker().get_states(),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if state.get("megatron_tracker"):
        _megatron_tracker().set_states(state["megatron_tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _tp_size() -> int:
    from megatron.core import parallel_state

    return (
        parallel_state.get_tensor_model_parallel_world_size()
        if parallel_state.model_parallel_is_initialized()
        else 1
    )


def _has_value_head(model: torch.nn.Module) -> bool:
    return getattr(model, "value_head", None) is not None


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    *,
    step: int,
    config: dict[str, Any] | None = None,
    arch: ModelArchConfig,
    tokenizer: Any = None,
    consumed_samples: int = 0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save atomically to `path`. A collective: every rank of the job calls it (the sharded
    weights come from every rank, the rest from rank 0). `config` (the job config as a dict) and
    `extra` must be JSON-serialisable."""
    from megatron.core import dist_checkpointing

    if not dist.is_initialized():
        raise AlignerError("save_checkpoint: call trainer.parallel.init_parallel() first")
    path = Path(path)
    token = [secrets.token_hex(4) if _rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)  # every rank writes into the same tmp directory
    tmp = _tmp_path(path, token[0])
    if _rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        (tmp / WEIGHTS_DIR).mkdir(parents=True)
        (tmp / RNG_DIR).mkdir()
    _barrier()
    try:
        sharded = {"model": model_sharded_state_dict(model)}
        if optimizer is not None:
            sharded.update(_optimizer_sharded_state_dict(optimizer, sharded["model"], optimizer.state_dict()))
        if scheduler is not None:
            sharded["scheduler"] = scheduler.state_dict()
        started = time.perf_counter()
        _write_in_process()
        dist_checkpointing.save(sharded, str(tmp / WEIGHTS_DIR))
        torch.save(rng_state(), tmp / RNG_DIR / f"rank_{_rank():05d}.pt")
        if _rank() == 0:
            meta = {
                "format_version": FORMAT_VERSION,
                "step": int(step),
                "consumed_samples": int(consumed_samples),
                "arch": dataclasses.asdict(arch),
                "has_value_head": _has_value_head(model),
                "has_optimizer": optimizer is not None,
                "optimizer_state_keys": _state_keys(optimizer) if optimizer is not None else [],
                "optimizer_state_param_ids": _state_param_ids(optimizer) if optimizer is not None else [],
                "has_scheduler": scheduler is not None,
                "tensor_model_parallel_size": _tp_size(),
                "world_size": dist.get_world_size(),
                "config": config or {},
                "extra": extra or {},
            }
            if tokenizer is not None:
                tokenizer.save(tmp / TOKENIZER_DIR)
            (tmp / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(config or {})))
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _barrier()
        if _rank() == 0:
            publish_directory(tmp, path)
            log.info(
                "checkpoint_saved", path=str(path), step=step, seconds=round(time.perf_counter() - started, 3)
            )
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    return path


def read_meta(path: str | Path) -> CheckpointMeta:
    path = Path(path)
    if not path.exists():
        raise NotFound(f"checkpoint {path} does not exist")
    if not is_checkpoint(path):
        raise NotFound(f"{path} is not a complete checkpoint (no {META_FILE})")
    try:
        raw = json.loads((path / META_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise InvalidArgument(str(path / META_FILE), f"is not valid JSON ({exc})") from None
    if raw.get("format_version") != FORMAT_VERSION:
        raise InvalidArgument(
            str(path / META_FILE), f"format_version {raw.get('format_version')!r} is not {FORMAT_VERSION}"
        )
    known = {f.name for f in dataclasses.fields(CheckpointMeta)} - {"path", "arch"}
    return CheckpointMeta(
        path=path,
        arch=ModelArchConfig(**raw["arch"]),
        **{k: v for k, v in raw.items() if k in known},
    )


def check_compatible(saved: ModelArchConfig, model_arch: ModelArchConfig, where: str) -> None:
    """Raise unless a checkpoint of arch `saved` can load into a model built with `model_arch`."""
    diffs = [
        f"{name} {getattr(saved, name)!r} != model {getattr(model_arch, name)!r}"
        for name in MODEL_DEFINING_FIELDS
        if getattr(saved, name) != getattr(model_arch, name)
    ]
    if diffs:
        raise InvalidArgument(where, "does not fit the model: " + "; ".join(diffs))


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    *,
    restore_rng: bool = True,
) -> CheckpointMeta:
    """Load weights (and the optimizer / scheduler when given) into an already built model at
    any tensor-parallel size. A collective, like `save_checkpoint`.

    The value head follows what exists: a model with a value head started from a checkpoint
    without one (a reward model from an SFT model) keeps its fresh head; a model without one
    ignores a saved head (a policy from a reward model). Resuming the optimizer needs the same
    model structure. RNG states are restored when the checkpoint was saved at the same world
    and TP size (otherwise the ranks' streams do not correspond and they are left alone)."""
    from megatron.core import dist_checkpointing

    meta = read_meta(path)
    model_arch = getattr(model, "arch", meta.arch)
    check_compatible(meta.arch, model_arch, f"checkpoint {meta.path}")
    model_has_head = _has_value_head(model)

    sharded_model = model_sharded_state_dict(model)
    if model_has_head and not meta.has_value_head:
        sharded_model = {k: v for k, v in sharded_model.items() if not k.startswith("value_head.")}
    sharded: dict[str, Any] = {"model": sharded_model}
    if optimizer is not None:
        if not meta.has_optimizer:
            raise InvalidArgument(str(meta.path), "holds no optimizer state to resume from")
        if model_has_head != meta.has_value_head:
            raise InvalidArgument(
                str(meta.path), "optimizer state is for a model with a different value head"
            )
        if meta.optimizer_state_param_ids is not None and max(
            meta.optimizer_state_param_ids, default=-1
        ) >= len(_optimizer_params(optimizer)):
            raise InvalidArgument(
                str(meta.path), "optimizer state is for more parameters than the optimizer has"
            )
        _prepare_optimizer_for_load(optimizer, meta.optimizer_state_keys, meta.optimizer_state_param_ids)
        sharded.update(
            _optimizer_sharded_state_dict(optimizer, model_sharded_state_dict(model), optimizer.state_dict())
        )
        sharded["common_step"] = None
    if scheduler is not None:
        if not meta.has_scheduler:
            raise InvalidArgument(str(meta.path), "holds no scheduler state to resume from")
        sharded["scheduler"] = None

    loaded = dist_checkpointing.load(sharded, str(meta.path / WEIGHTS_DIR))
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    missing = [
        k
        for k in missing
        if not k.endswith("_extra_state") and not (k.startswith("value_head.") and not meta.has_value_head)
    ]
    if missing or unexpected:
        raise InvalidArgument(
            str(meta.path), f"weights do not fit the model: missing {missing}, unexpected {unexpected}"
        )
    if optimizer is not None:
        state = loaded["optimizer"]
        if loaded.get("common_step") is not None:
            for param_state in state["state"].values():
                param_state["step"] = loaded["common_step"].clone()
        optimizer.load_state_dict(state)
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    if restore_rng:
        rng_file = meta.path / RNG_DIR / f"rank_{_rank():05d}.pt"
        same_layout = (meta.world_size, meta.tensor_model_parallel_size) == (
            dist.get_world_size() if dist.is_initialized() else 1,
            _tp_size(),
        )
        if same_layout and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        else:
            log.warning(
                "rng_not_restored", path=str(meta.path), reason="different world/TP size or no RNG file"
            )
    return meta


# ---------------------------------------------------------------------------------------------
# Building models from a checkpoint (ours or Hugging Face)
# ---------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """`path` itself when it is a checkpoint or a HF directory; the latest checkpoint when it is
    a run directory."""
    from trainer import hf

    path = Path(path)
    if not path.exists():
        raise NotFound(f"checkpoint {path} does not exist")
    if is_checkpoint(path) or hf.is_hf_checkpoint(path):
        return path
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    raise NotFound(
        f"{path} is neither one of our checkpoints ({META_FILE}), a Hugging Face model (config.json) nor a run directory with checkpoints"
    )


def checkpoint_arch(path: str | Path) -> ModelArchConfig:
    """The model arch of our checkpoint or of a HF directory."""
    from trainer import hf

    path = resolve_checkpoint(path)
    if is_checkpoint(path):
        return read_meta(path).arch
    return hf.arch_from_hf_config(hf.read_hf_config(path))


def load_tokenizer(path: str | Path):
    """The tokenizer stored with a checkpoint (ours: `tokenizer/`; HF: the directory), or None."""
    from trainer.tokenizer import Tokenizer

    path = resolve_checkpoint(path)
    directory = path / TOKENIZER_DIR if is_checkpoint(path) else path
    return Tokenizer.load(directory) if (directory / "tokenizer.json").is_file() else None


def load_pretrained(path: str | Path, model: torch.nn.Module) -> CheckpointMeta | None:
    """Load the weights of our checkpoint or a HF directory into `model` (the start of a training
    run; no optimizer, no RNG). Returns our checkpoint's meta, or None for a HF directory."""
    from trainer import hf

    path = resolve_checkpoint(path)
    if is_checkpoint(path):
        return load_checkpoint(path, model, restore_rng=False)
    arch, state = hf.import_hf(path)
    check_compatible(arch, getattr(model, "arch", arch), f"Hugging Face model {path}")
    hf.load_full_state_dict(model, state)
    return None


def load_model_for_inference(
    path: str | Path,
    value_head: bool | None = None,
    *,
    precision: str | None = None,
    seed: int = 1234,
    runtime: MegatronRuntimeConfig | None = None,
):
    """Build the model a checkpoint describes and load it: -> (model in eval mode, arch,
    tokenizer or None). `path` is our checkpoint, a run directory (its latest checkpoint) or a HF
    directory. `value_head=None` keeps the checkpoint's (HF: none); True on a checkpoint without
    one adds a freshly initialised head (a critic from an SFT model). Uses the current
    tensor-parallel size, initialising a single process group if none exists. `runtime` (a
    server's `model.*` keys) replaces the checkpoint's activation-recompute and related keys."""
    path = resolve_checkpoint(path)
    arch = checkpoint_arch(path)
    if runtime is not None:
        arch = dataclasses.replace(
            arch, **{f.name: getattr(runtime, f.name) for f in dataclasses.fields(MegatronRuntimeConfig)}
        )

    from megatron.core import parallel_state

    from trainer.model import build_model
    from trainer.parallel import init_parallel

    if not parallel_state.model_parallel_is_initialized():
        init_parallel(1, 1, seed=seed)
    arch = dataclasses.replace(arch, tensor_model_parallel_size=_tp_size(), pipeline_model_parallel_size=1)
    if precision is not None:
        arch = dataclasses.replace(arch, precision=precision)
    if value_head is None:
        value_head = is_checkpoint(path) and read_meta(path).has_value_head
    model = build_model(arch, value_head=value_head, seed=seed)
    load_pretrained(path, model)
    model.eval()
    return model, arch, load_tokenizer(path)
