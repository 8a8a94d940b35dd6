"""Logging for every process: structlog, JSON lines in services and containers, a readable console
locally.

`configure_logging(service, fmt)` sets it up once per process. Every record carries the process's
`service` (and `run_id` when given) and whatever is bound to the current context with
`bind_context(request_id=..., step=...)` (contextvars: each asyncio task and each gRPC call sees
its own). Records from the standard `logging` module (grpc, torch, urllib3, ...) go through the
same renderer, so a process writes one format only.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, TextIO

import structlog

from common.errors import InvalidArgument

FORMATS = ("json", "console")
_QUIET_LOGGERS = ("grpc._cython.cygrpc", "asyncio", "urllib3", "filelock", "matplotlib")

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
    text. Calling it again replaces the previous setup (tests do)."""
    if fmt not in FORMATS:
        raise InvalidArgument("log_format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
    numeric_level = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric_level, int):
        raise InvalidArgument("log_level", f"unknown level {level!r}")

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
    # Chatty at DEBUG in ways nobody needs (grpc logs every event-loop lookup).
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric_level, logging.INFO))
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
