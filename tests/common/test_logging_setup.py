"""common.logging: JSON lines with service/run id/context fields, console text, stdlib routing."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from common.errors import InvalidArgument
from common.logging import bind_context, bound_context, clear_context, configure_logging, get_logger


@pytest.fixture(autouse=True)
def _reset():
    clear_context()
    yield
    clear_context()
    configure_logging("tests", fmt="console", level="WARNING")


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_lines_carry_service_run_id_and_context():
    out = io.StringIO()
    configure_logging("reward", fmt="json", run_id="run-1", stream=out)
    log = get_logger("test")
    bind_context(step=3)
    with bound_context(request_id="abc"):
        log.info("scored", batch=4)
    log.info("after")
    first, second = _lines(out)
    assert first["event"] == "scored" and first["batch"] == 4
    assert first["service"] == "reward" and first["run_id"] == "run-1"
    assert first["request_id"] == "abc" and first["step"] == 3 and first["level"] == "info"
    assert "timestamp" in first and first["logger"] == "test"
    assert "request_id" not in second and second["step"] == 3


def test_stdlib_records_and_exceptions_use_the_same_format():
    out = io.StringIO()
    configure_logging("critic", fmt="json", stream=out)
    with bound_context(request_id="r1"):
        logging.getLogger("some.library").warning("disk %s", "full")
    try:
        raise ValueError("bad")
    except ValueError:
        get_logger("t").exception("failed")
    library, failure = _lines(out)
    assert library["event"] == "disk full" and library["logger"] == "some.library"
    assert library["service"] == "critic" and library["request_id"] == "r1" and library["level"] == "warning"
    assert failure["level"] == "error" and "ValueError: bad" in failure["exception"]


def test_level_filters_and_console_format():
    out = io.StringIO()
    configure_logging("gen", fmt="console", level="WARNING", stream=out)
    get_logger("t").info("hidden")
    get_logger("t").warning("shown", key="value")
    text = out.getvalue()
    assert "hidden" not in text
    assert "shown" in text and "key=value" in text and "service=gen" in text
    with pytest.raises(ValueError):
        json.loads(text.splitlines()[0])  # console text, not JSON


def test_context_is_per_task():
    out = io.StringIO()
    configure_logging("svc", fmt="json", stream=out)
    log = get_logger("t")

    async def handle(request_id: str) -> None:
        bind_context(request_id=request_id)
        await asyncio.sleep(0)
        log.info("handled")

    async def main() -> None:
        await asyncio.gather(handle("a"), handle("b"))

    asyncio.run(main())
    assert sorted(line["request_id"] for line in _lines(out)) == ["a", "b"]


def test_bad_format_or_level_names_the_setting():
    with pytest.raises(InvalidArgument, match="log_format"):
        configure_logging("x", fmt="xml")
    with pytest.raises(InvalidArgument, match="log_level"):
        configure_logging("x", level="LOUD")
