"""Logging for every process: structlog, JSON lines in services and containers, a readable console
locally.

`configure_logging(service, fmt)` sets it up once per process. Every record carries the process's
`service` (and `run_id` when given) and whatever is bound to the current context with
`bind_context(request_id=..., step=...)` (contextvars: each asyncio task and each gRPC call sees
its own). Records from the standard `logging` module (grpc, torch, urllib3, ...) go through the
same renderer, so a process writes one format only.

Quiet by default: `quiet_third_party()` is the one place where known-benign third-party noise is
turned off (warnings by exact text, category and module; chatty loggers by level; tritonserver's
and gRPC core's own lines through their environment settings), each with the reason it is benign.
`aligner --verbose <command>` (or ALIGNER_VERBOSE=1, which the processes a command starts
inherit) turns all of it off: every warning, every logger at DEBUG.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, TextIO

import structlog

from common.errors import InvalidArgument

FORMATS = ("json", "console")
_QUIET_LOGGERS = ("grpc._cython.cygrpc", "asyncio", "urllib3", "filelock", "matplotlib")
VERBOSE_ENV = "ALIGNER_VERBOSE"

# Known-benign third-party warnings: (category, the module the warning is attributed to, the exact
# text). Each is matched in full (anchored both ends), so a new or changed message still shows.
_TE_APEX = "Transformer Engine and Apex are not installed. Falling back to "
_SHARDED_TENSOR = "Please use DTensor instead and we are deprecating ShardedTensor."
BENIGN_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # megatron-core without Transformer Engine and Apex (always so on CPU, and on images without
    # them): it announces the torch implementations it uses instead, which are what we run.
    (UserWarning, "megatron.core.optimizer", _TE_APEX + "Torch optimizers."),
    (UserWarning, "megatron.core.optimizer.optimizer",
     _TE_APEX + "local implementations of multi_tensor_applier and multi_tensor_scale"),
    (UserWarning, "megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision",
     _TE_APEX + "local implementations of multi_tensor_applier and multi_tensor_scale"),
    (UserWarning, "megatron.core.optimizer.clip_grads",
     _TE_APEX + "local implementations of multi_tensor_applier, multi_tensor_l2norm, and multi_tensor_scale"),
    (UserWarning, "megatron.core.models.backends", "Apex is not installed. Falling back to Torch Norm"),
    (UserWarning, "megatron.core.models.gpt.gpt_layer_specs", "Apex is not installed. Falling back to Torch Norm"),
    # TransformerConfig's own default (cuda_graph_scope="full") trips its deprecation of "full";
    # we never capture CUDA graphs.
    (UserWarning, "megatron.core.transformer.transformer_config",
     "full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer."),
    # megatron's dist_checkpointing calls torch.distributed.checkpoint's old name for `load` (the
    # same function) and stores ShardedTensors, which torch plans to replace by DTensor; both work
    # on the pinned torch, and checkpoints round-trip (tests/trainer/test_checkpoint.py).
    (FutureWarning, "megatron.core.dist_checkpointing.strategies.torch",
     "`load_state_dict` is deprecated and will be removed in future versions. Please use `load` instead."),
    (FutureWarning, "torch.distributed.checkpoint.planner_helpers", _SHARDED_TENSOR),
    (FutureWarning, "torch.distributed.checkpoint.default_planner", _SHARDED_TENSOR),
    # DeprecationWarnings (Python hides them by default; pytest and -W show them), all about code
    # inside torch and megatron-core, not ours: torch.utils.mkldnn's own script_method use, megatron
    # importing its own deprecated modules, its layer specs leaving out arguments it then takes
    # from the config we built (ffn_hidden_size; the tensor-parallel group we initialised).
    (DeprecationWarning, "torch.jit._script",
     "`torch.jit.script_method` is deprecated. Please switch to `torch.compile` or `torch.export`."),
    (DeprecationWarning, "megatron.core.inference.contexts",
     "The following imports from `dynamic_context.py` will be removed in this file in `megatron-core` 0.14. "
     "The imports here result in a cyclic import issue that causes rotary embeddings to import from Apex "
     "rather than Transformer Engine."),
    (DeprecationWarning, "megatron.core.transformer.multi_latent_attention",
     "The 'megatron.core.transformer.custom_layers.transformer_engine' \n    module is deprecated and will be "
     "removed in 0.10.0. Please use \n    'megatron.core.extensions.transformer_engine' instead."),
    (DeprecationWarning, "megatron.core.transformer.spec_utils",
     "MLP requires ffn_hidden_size, but it was not provided. Using                     "
     "config.ffn_hidden_size by default."),
    (DeprecationWarning, "megatron.core.tensor_parallel.layers",
     "Warning: tp_group is None, using default tp group. Passing tp_group will be mandatory soon"),
)  # fmt: skip

# Third-party loggers that say at INFO what they found at import or startup, nothing we act on:
# Megatron-FSDP which implementation it picked (we do not use Megatron-FSDP); PyTriton its model
# URLs and "press CTRL+C" hints for an interactive session (the generation service logs its own
# ready line with every port).
_CHATTY_AT_INFO = ("megatron.core.distributed.fsdp.src.megatron_fsdp", "pytriton")

# Environment settings read by child programs, set only where the user has not set them:
_QUIET_ENV = {
    # gRPC core's INFO lines, e.g. "fork_posix.cc: Other threads are currently calling into gRPC,
    # skipping fork() handlers" when PyTriton forks to exec tritonserver (the child execs at once,
    # it never uses gRPC). Errors still show (gRPC core has no WARNING setting: DEBUG|INFO|ERROR).
    "GRPC_VERBOSITY": "ERROR",
}
# tritonserver's GPU metrics need NVML; where it cannot be loaded (no NVIDIA driver) tritonserver
# prints "Error: Failed to initialize NVML" and "DCGM unable to start" and collects CPU metrics
# only. PyTriton reads TritonConfig fields from PYTRITON_TRITON_CONFIG_* (fields the service sets
# itself win) and casts them with bool(str): only the empty string reads as False, and becomes
# `--allow-gpu-metrics False` (tests/common/test_quiet.py checks the argument tritonserver gets).
_NO_NVML_ENV = {"PYTRITON_TRITON_CONFIG_ALLOW_GPU_METRICS": ""}


def verbose() -> bool:
    """`aligner --verbose` / ALIGNER_VERBOSE=1: show everything."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def set_verbose() -> None:
    """Verbose for this process and every process it starts (services, the demo's stages)."""
    os.environ[VERBOSE_ENV] = "1"


def _nvml_loadable() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def quiet_third_party() -> None:
    """Turn off the known-benign third-party noise above (idempotent); under --verbose, show every
    warning instead. Called before a command's imports (megatron warns at import) and by
    `configure_logging`."""
    if verbose():
        warnings.simplefilter("default")  # every warning once per place, DeprecationWarnings too
        for name in _CHATTY_AT_INFO:
            logging.getLogger(name).setLevel(logging.NOTSET)  # the root's level: DEBUG
        return
    for category, module, message in BENIGN_WARNINGS:
        # filterwarnings matches from the start; \Z anchors the end. An identical filter replaces
        # the previous one, so calling this twice adds nothing.
        warnings.filterwarnings("ignore", message=re.escape(message) + r"\Z", category=category,
                                module=re.escape(module) + r"\Z")  # fmt: skip
    for name in _CHATTY_AT_INFO:
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.level, logging.WARNING))
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if not _nvml_loadable():
        for key, value in _NO_NVML_ENV.items():
            os.environ.setdefault(key, value)

# Process-wide fields (service, run_id). Kept out of contextvars on purpose: threads started by
# libraries do not inherit the main thread's context, but their records must still say which
# service wrote them.
_PROCESS_FIELDS: dict[str, Any] = {}


def _add_process_fields(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in _PROCESS_FIELDS.items():
        event.setdefault(key, value)
    return event


def configure_logging(
    service: str,
    fmt: str = "json",
    level: str | int = "INFO",
    *,
    run_id: str | None = None,
    stream: TextIO | None = None,
) -> None:
    """Route structlog and stdlib logging to `stream` (default stderr) as JSON lines or console
    text. Calling it again replaces the previous setup (tests do). Under --verbose the level is
    DEBUG and nothing is filtered."""
    if fmt not in FORMATS:
        raise InvalidArgument("log_format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
    numeric_level = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric_level, int):
        raise InvalidArgument("log_level", f"unknown level {level!r}")
    quiet_third_party()
    if verbose():
        numeric_level = logging.DEBUG

    _PROCESS_FIELDS.clear()
    _PROCESS_FIELDS["service"] = service
    if run_id is not None:
        _PROCESS_FIELDS["run_id"] = run_id

    # Applied to structlog records and to stdlib records alike.
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _add_process_fields,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if fmt == "json":
        renderer: Any = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)  # tracebacks as one string field
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=(stream or sys.stderr).isatty())

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a reconfiguration must reach loggers created at import time.
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)
    # Chatty at DEBUG in ways nobody needs (grpc logs every event-loop lookup); --verbose shows it.
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose() else max(numeric_level, logging.INFO))
    logging.captureWarnings(True)


def get_logger(name: str | None = None, **initial: Any) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name, **initial)


def bind_context(**fields: Any) -> None:
    """Bind fields (request_id, step, run_id, ...) to the current context until unbound."""
    structlog.contextvars.bind_contextvars(**fields)


def unbind_context(*keys: str) -> None:
    structlog.contextvars.unbind_contextvars(*keys)


def clear_context() -> None:
    structlog.contextvars.clear_contextvars()


@contextmanager
def bound_context(**fields: Any) -> Iterator[None]:
    """Bind fields for the duration of a block, restoring the previous values afterwards."""
    with structlog.contextvars.bound_contextvars(**fields):
        yield
