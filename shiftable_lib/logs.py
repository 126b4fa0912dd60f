"""Log lines every process writes the same way: text or JSON (`SMA_LOG_FORMAT`), at
`SMA_LOG_LEVEL`, each carrying the id of the request it serves.

The gateway takes a request's id from its `X-Request-Id` header (or makes one), and every gRPC
call it makes for that request carries it as `x-request-id` metadata; each service puts it in
`request_id` for the duration of the call, so one id finds a request's lines in every service's
log. Lines written outside any request carry "-".
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

request_id: ContextVar[str] = ContextVar("request_id", default="-")
METADATA_KEY = "x-request-id"  # gRPC metadata (lower case); HTTP: X-Request-Id
_VALID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


@contextmanager
def bound(value: str) -> Iterator[None]:
    """Lines written inside carry `value`: for work done on a request's behalf outside the
    call that made it (a queued job that starts later)."""
    token = request_id.set(value)
    try:
        yield
    finally:
        request_id.reset(token)


def new_request_id() -> str:
    return secrets.token_hex(8)


def accept_request_id(value: str | None) -> str:
    """A caller's id if it is one we can put in a log line as it is (at most 128 characters
    of letters, digits and `._:/+=-`), else a new one."""
    return value if value and _VALID.fullmatch(value) else new_request_id()


class _WithRequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, request_id, message, and
    the exception when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(fmt: str = "text", level: str = "INFO") -> None:
    """Send every logger's records to stderr in `fmt`, from `level` up (replacing any
    handlers the root logger had)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, not {fmt!r}")
    handler = logging.StreamHandler()
    handler.addFilter(_WithRequestId())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
