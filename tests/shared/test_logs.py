"""shared/logs.py: one line format for every process, and JSON lines for log shippers."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from shared import logs


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_text_lines_carry_utc_time_service_and_instance() -> None:
    out = io.StringIO()
    logs.setup("gateway", "gateway-1", "INFO", "text", out)
    logging.getLogger("gateway").info("connection from %s", "127.0.0.1:5000")
    logging.getLogger("x").warning("two\nlines")
    logging.getLogger("x").debug("not at INFO")
    first, second = out.getvalue().splitlines()
    m = logs.TEXT_LINE.match(first)
    assert m is not None, first
    assert (m["level"], m["service"], m["instance"], m["logger"]) == (
        "INFO",
        "gateway",
        "gateway-1",
        "gateway",
    )
    assert m["msg"] == "connection from 127.0.0.1:5000" and m["ts"].endswith("Z")
    assert logs.TEXT_LINE.match(second) and second.endswith("two\\nlines")  # one record, one line


def test_json_lines_are_objects_with_service_and_instance() -> None:
    out = io.StringIO()
    logs.setup("feeds", None, "DEBUG", "json", out)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("cme.feeds").exception("failed %d", 3)
    record = orjson.loads(out.getvalue())
    assert record["service"] == "feeds" and record["instance"].startswith("feeds-")
    assert record["msg"] == "failed 3" and record["level"] == "ERROR" and "ValueError: boom" in record["exc"]
    assert logs.TEXT_LINE.match(f"{record['ts']} INFO a b c: d")  # the same timestamp style as text


def test_timestamps_are_utc_with_milliseconds() -> None:
    assert logs.timestamp(0.25) == "1970-01-01T00:00:00.250Z"


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="text, json"):
        logs.setup("up", fmt="xml")
