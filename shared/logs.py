"""One log format for every process of the stack, so `cme up`'s merged output (and a log shipper) can
tell the lines apart: UTC timestamps in one style, and the service and instance on every line.

text (the default), one line per record:

    2024-11-25T09:15:02.123Z INFO gateway gateway-1 gateway: gateway listening on 127.0.0.1:8000

json (`--log-format json`), one object per line:

    {"ts":"2024-11-25T09:15:02.123Z","level":"INFO","service":"gateway","instance":"gateway-1",
     "logger":"gateway","pid":4242,"msg":"gateway listening on 127.0.0.1:8000"}
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
import time
from typing import IO, Any, Final

import orjson

FORMATS: Final = ("text", "json")
# What a text line looks like: the tests and anyone grepping the merged output rely on it.
TEXT_LINE: Final = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (?P<level>[A-Z]+) (?P<service>\S+) "
    r"(?P<instance>\S+) (?P<logger>\S+): (?P<msg>.*)$"
)


def timestamp(created: float) -> str:
    """ISO 8601 in UTC with milliseconds: sorts as text and means the same on every host."""
    seconds = int(created)
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int((created - seconds) * 1000):03d}Z"
    )


class TextFormatter(logging.Formatter):
    def __init__(self, service: str, instance: str) -> None:
        super().__init__()
        self.prefix = f"{service} {instance}"

    def format(self, record: logging.LogRecord) -> str:
        # Newlines inside a message would break the one-record-per-line rule a grep relies on.
        text = record.getMessage().replace("\n", "\\n")
        line = f"{timestamp(record.created)} {record.levelname} {self.prefix} {record.name}: {text}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str, instance: str) -> None:
        super().__init__()
        self.service, self.instance = service, instance

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": timestamp(record.created),
            "level": record.levelname,
            "service": self.service,
            "instance": self.instance,
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def default_instance(service: str) -> str:
    """The same name metrics use (shared.metrics.instance_name) when none is given."""
    return f"{service}-{socket.gethostname()}-{os.getpid()}"


def setup(
    service: str,
    instance: str | None = None,
    level: str = "INFO",
    fmt: str = "text",
    stream: IO[str] | None = None,
) -> None:
    """Replace the root logger's handlers with one that writes this process's format to `stream`
    (stderr by default)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    name = instance or default_instance(service)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(TextFormatter(service, name) if fmt == "text" else JsonFormatter(service, name))
    logging.basicConfig(
        level=getattr(logging, str(level).upper(), logging.INFO), handlers=[handler], force=True
    )


def from_args(service: str, args: argparse.Namespace) -> None:
    """`setup` from a command's --instance, --log-level and --log-format (shared by every service)."""
    setup(
        service,
        getattr(args, "instance", None),
        getattr(args, "log_level", "INFO"),
        getattr(args, "log_format", "text"),
    )
