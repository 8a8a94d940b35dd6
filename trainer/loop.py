"""What the SFT and reward-model loops (`trainer/sft.py`, `trainer/rm.py`) share: the run
directory, batch-size and step arithmetic, the starting model and tokenizer, metric logs,
checkpoints that carry the data position, and resume. The loops themselves stay in their files,
readable top to bottom.

Run directory (`exp_manager.explicit_log_dir`, else `<exp_manager.exp_dir>/<exp_manager.name>`):

    config.yaml                 the resolved job config
    metrics.jsonl, metrics.csv  one record per optimizer step (loss, lr, grad_norm, ...)
    validation.jsonl, .csv      one record per validation
    tensorboard/                TensorBoard event files (`exp_manager.create_tensorboard_logger`)
    wandb/                      W&B offline run (`exp_manager.create_wandb_logger`, needs wandb)
    checkpoints/step_NNNNNN/    resumable: model, optimizer, scheduler, RNG, data position
    final/                      the trained model and tokenizer, no optimizer: the next stage's
                                `pretrained_checkpoint.restore_from_path`
    *.png                       curves

Starting weights: `pretrained_checkpoint.restore_from_path` (one of our checkpoints, a run
directory = its latest checkpoint, or a Hugging Face Llama/Mistral directory), whose architecture
is used (the model.* architecture keys are then ignored, except the runtime ones: parallel sizes,
precision, dropout, activation checkpointing). Unset: a freshly initialised model built from the
model.* keys (seeded by `seed`), for the tiny demo. The tokenizer is `tokenizer_path`, else the
starting checkpoint's.

Resume: when the run directory holds checkpoints and `--resume` or `exp_manager.resume_if_exists`
is set, the run continues from the newest one: weights, optimizer, scheduler, RNG states and
the sampler position are restored, so steps k+1.. are the ones an uninterrupted run computes.
Logged records after step k (written before a crash) are dropped.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from common.config import ExpManagerConfig, LoopConfig, ModelArchConfig, to_dict, to_yaml
from common.errors import InvalidArgument
from common.logging import get_logger

log = get_logger(__name__)

FINAL_DIR = "final"
STREAMS = ("metrics", "validation")
# Arch keys that describe how to run a model, not its weights: taken from the job config even
# when the weights come from a checkpoint.
RUNTIME_ARCH_FIELDS = (
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "precision",
    "attention_dropout", "hidden_dropout", "activations_checkpoint",
    "activations_checkpoint_granularity", "activations_checkpoint_method",
    "activations_checkpoint_num_layers", "megatron_amp_O2", "mcore_gpt",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Ranks, batch sizes, steps
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataParallel:
    rank: int  # data-parallel rank: which shard of each global batch this process trains on
    size: int
    group: Any
    tp_group: Any  # for the TP-aware gradient clipping
    is_main: bool  # global rank 0: writes logs, plots and prints the progress bar


def data_parallel() -> DataParallel:
    from megatron.core import parallel_state

    return DataParallel(
        rank=parallel_state.get_data_parallel_rank(),
        size=parallel_state.get_data_parallel_world_size(),
        group=parallel_state.get_data_parallel_group(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        is_main=dist.get_rank() == 0,
    )


def check_world_size(num_nodes: int, devices: int) -> None:
    """trainer.num_nodes x trainer.devices must be the number of processes torchrun started."""
    world = dist.get_world_size()
    if num_nodes * devices != world:
        raise InvalidArgument(
            "trainer.devices",
            f"trainer.num_nodes x trainer.devices = {num_nodes} x {devices} but this job has {world} "
            f"process(es); start one process per device with torchrun (--nnodes {num_nodes} "
            f"--nproc-per-node {devices})",
        )


def check_batch_sizes(global_batch_size: int, micro_batch_size: int, dp_size: int) -> int:
    """Micro-batches per rank per optimizer step: global = micro x accumulation x data-parallel."""
    if micro_batch_size < 1:
        raise InvalidArgument("model.micro_batch_size", f"must be >= 1, got {micro_batch_size}")
    if global_batch_size < 1 or global_batch_size % (micro_batch_size * dp_size):
        raise InvalidArgument(
            "model.global_batch_size",
            f"{global_batch_size} must be a positive multiple of model.micro_batch_size x "
            f"data-parallel size ({micro_batch_size} x {dp_size})",
        )
    return global_batch_size // (micro_batch_size * dp_size)


def total_steps(loop: LoopConfig, num_examples: int, global_batch_size: int, section: str) -> int:
    """Optimizer steps of the run, as NeMo-Aligner counts them: max_epochs x (examples //
    global batch), capped by max_steps when that is set (> 0); max_epochs <= 0 leaves only
    max_steps. An epoch drops its last partial batch."""
    steps_per_epoch = num_examples // global_batch_size
    if steps_per_epoch < 1:
        raise InvalidArgument(
            "model.global_batch_size",
            f"{global_batch_size} is more than the {num_examples} training examples",
        )
    by_epochs = loop.max_epochs * steps_per_epoch if loop.max_epochs > 0 else None
    if loop.max_steps > 0:
        return min(loop.max_steps, by_epochs) if by_epochs is not None else loop.max_steps
    if by_epochs is None:
        raise InvalidArgument(f"trainer.{section}.max_steps", f"set it or trainer.{section}.max_epochs (> 0)")
    return by_epochs


def validation_indices(num_examples: int, batch_size: int, limit_val_batches: float) -> list[int]:
    """The validation examples used, in file order: batches of `batch_size` (the global batch
    size), as many as `limit_val_batches` allows: <= 1.0 is a fraction of the batches, > 1 a
    number of them, 0 none."""
    available = math.ceil(num_examples / batch_size)
    if limit_val_batches <= 0:
        count = 0
    elif limit_val_batches <= 1.0:
        count = max(1, math.ceil(limit_val_batches * available))
    else:
        count = min(available, int(limit_val_batches))
    return list(range(min(num_examples, count * batch_size)))


def is_boundary(step: int, interval: int, last_step: int) -> bool:
    """Whether step `step` (1-based) ends an interval; the last step always does (interval > 0)."""
    return interval > 0 and (step % interval == 0 or step == last_step)


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def sum_over_data_parallel(values: list[float], dp: DataParallel) -> list[float]:
    """Element-wise sum of per-rank partial sums over the data-parallel group."""
    t = torch.tensor(values, dtype=torch.float64)
    if dp.size > 1:
        dist.all_reduce(t, group=dp.group)
    return t.tolist()


# ---------------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------------


def data_files(data_prefix: dict[str, list[str]], split: str, required: bool = True) -> list[str] | None:
    """The files of one split of `model.data.data_prefix` ({train: [...], validation: [...], ...})."""
    files = data_prefix.get(split)
    if not files:
        if required:
            raise InvalidArgument(
                f"model.data.data_prefix.{split}",
                'missing; give "model.data.data_prefix={train: [...], validation: [...], test: [...]}"',
            )
        return None
    return list(files)


def check_data_impl(data_impl: str) -> None:
    if data_impl != "jsonl":
        raise InvalidArgument("model.data.data_impl", f"only jsonl is supported, got {data_impl!r}")


# ---------------------------------------------------------------------------------------------
# Run directory, starting model, tokenizer
# ---------------------------------------------------------------------------------------------


def run_directory(exp: ExpManagerConfig) -> Path:
    if exp.explicit_log_dir:
        return Path(exp.explicit_log_dir)
    return Path(exp.exp_dir) / exp.name


def find_resume_checkpoint(run_dir: Path, resume_flag: bool, exp: ExpManagerConfig) -> Path | None:
    """The checkpoint to continue from, or None for a fresh start. A run directory that already
    holds checkpoints is never silently trained over from scratch."""
    from trainer.checkpoint import latest_checkpoint

    last = latest_checkpoint(run_dir)
    if last is None:
        if resume_flag:
            log.warning("--resume: no checkpoint in the run directory, starting fresh", run_dir=str(run_dir))
        return None
    if resume_flag or exp.resume_if_exists:
        return last
    raise InvalidArgument(
        "exp_manager.explicit_log_dir",
        f"{run_dir} already holds checkpoints; pass --resume (or exp_manager.resume_if_exists=true) "
        "to continue, or choose another directory",
    )


def arch_from_config(model_cfg: Any) -> ModelArchConfig:
    """The ModelArchConfig part of a job's `model` section."""
    return ModelArchConfig(
        **{f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(ModelArchConfig)}
    )


def starting_arch(model_cfg: Any, checkpoint_path: str | Path | None) -> ModelArchConfig:
    """The checkpoint's architecture with the job's runtime keys, or the job's own arch."""
    from trainer.checkpoint import checkpoint_arch

    wanted = arch_from_config(model_cfg)
    if checkpoint_path is None:
        return wanted
    return dataclasses.replace(
        checkpoint_arch(checkpoint_path), **{k: getattr(wanted, k) for k in RUNTIME_ARCH_FIELDS}
    )


def load_tokenizer(
    tokenizer_path: str | None, checkpoint_paths: list[str | Path | None], arch: ModelArchConfig
):
    """`tokenizer_path`, else the first of `checkpoint_paths` that stores one."""
    from trainer import checkpoint
    from trainer.tokenizer import Tokenizer

    tokenizer = None
    if tokenizer_path:
        tokenizer = Tokenizer.load(tokenizer_path)
    else:
        for path in checkpoint_paths:
            if path is not None and (tokenizer := checkpoint.load_tokenizer(path)) is not None:
                break
    if tokenizer is None:
        raise InvalidArgument(
            "tokenizer_path",
            "not set, and the starting checkpoint has no tokenizer (aligner tokenizer train)",
        )
    if tokenizer.vocab_size > arch.vocab_size:
        raise InvalidArgument(
            "tokenizer_path",
            f"the tokenizer has {tokenizer.vocab_size} tokens, more than model.vocab_size {arch.vocab_size}",
        )
    return tokenizer


def save_config(run_dir: Path, cfg: Any) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def save_step_checkpoint(
    run_dir, step, model, optimizer, scheduler, sampler, *, cfg, arch, tokenizer, consumed_samples, keep_last
):
    """A resumable checkpoint `checkpoints/step_NNNNNN` (all ranks call it), then prune old ones."""
    from trainer import checkpoint

    path = checkpoint.save_checkpoint(
        checkpoint.step_checkpoint_path(run_dir, step), model, optimizer, scheduler, step=step,
        config=to_dict(cfg), arch=arch, tokenizer=tokenizer, consumed_samples=consumed_samples,
        extra={"sampler": sampler.state_dict()},
    )  # fmt: skip
    if dist.get_rank() == 0:
        checkpoint.prune_checkpoints(run_dir, keep_last=keep_last)
    return path


def restore_step_checkpoint(path: Path, model, optimizer, scheduler, sampler) -> tuple[int, int]:
    """Load a step checkpoint into the run's objects (RNG states too); -> (step, consumed samples)."""
    from trainer import checkpoint

    meta = checkpoint.load_checkpoint(path, model, optimizer, scheduler)
    if "sampler" not in meta.extra:
        raise InvalidArgument(str(path), "holds no data position (not a checkpoint of this trainer)")
    sampler.load_state_dict(meta.extra["sampler"])
    log.info("resumed", path=str(path), step=meta.step)
    return meta.step, meta.consumed_samples


def save_final(run_dir: Path, step: int, model, *, cfg, arch, tokenizer) -> Path:
    """`<run_dir>/final`: weights and tokenizer only, the next stage's starting checkpoint."""
    from trainer import checkpoint

    return checkpoint.save_checkpoint(
        run_dir / FINAL_DIR, model, step=step, config=to_dict(cfg), arch=arch, tokenizer=tokenizer
    )


# ---------------------------------------------------------------------------------------------
# Metric logs
# ---------------------------------------------------------------------------------------------


def check_loggers(exp: ExpManagerConfig) -> None:
    """Fail before training (on every rank) when a requested logger cannot work."""
    if exp.create_wandb_logger:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise InvalidArgument(
                "exp_manager.create_wandb_logger",
                "wandb is not installed (pip install wandb), or set exp_manager.create_wandb_logger=false",
            ) from None


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the records of steps <= last_step (a resumed run recomputes the later ones); a line
    torn by a crash goes too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class MetricsLog:
    """`<stream>.jsonl` (+ CSV), TensorBoard scalars `<stream>/<key>` and, when asked, W&B.
    Only the main rank writes; elsewhere every call does nothing. `resume_step`: records after
    it are dropped (a resumed run logs them again); None appends to what is there (a server)."""

    def __init__(
        self, run_dir: Path, exp: ExpManagerConfig, cfg: Any, resume_step: int | None, enabled: bool
    ):
        self.run_dir, self.enabled = run_dir, enabled
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        if resume_step is not None:
            for stream in STREAMS:
                _truncate_jsonl(run_dir / f"{stream}.jsonl", resume_step)
        if exp.create_tensorboard_logger:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed run logged after its last checkpoint.
            purge = None if resume_step is None else resume_step + 1
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
        if exp.create_wandb_logger:
            import wandb

            kwargs = exp.wandb_logger_kwargs
            self.wandb = wandb.init(
                project=kwargs.project, name=kwargs.name, mode=kwargs.mode, dir=str(run_dir),
                config=to_dict(cfg), resume="allow",
            )  # fmt: skip

    def log(self, stream: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in values.items()}}
        with open(self.run_dir / f"{stream}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in values.items():
            if self.tensorboard is not None:
                self.tensorboard.add_scalar(f"{stream}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{stream}/{k}": v for k, v in values.items()}, step=step)

    def flush(self) -> None:
        """Rewrite the CSV copies from the JSONL logs and flush TensorBoard."""
        if not self.enabled:
            return
        from trainer.plots import read_metrics

        for stream in STREAMS:
            records = read_metrics(self.run_dir / f"{stream}.jsonl")
            if not records:
                continue
            columns = list(dict.fromkeys(k for r in records for k in r))
            with open(self.run_dir / f"{stream}.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(records)
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        self.flush()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
