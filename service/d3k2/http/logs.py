"""Structured logs: one JSON object per line on stderr, with the request id and hook instance bound.

No PHI goes into a log line: callers log ids of services, rules and hook instances, counts, statuses and
durations; never patient ids, names, observation values or tokens. The request line carries the path
without its query string.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import traceback
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any

import orjson
from flask import Response, g, request

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_context: ContextVar[dict[str, Any] | None] = ContextVar("d3k2_log_context", default=None)
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

log = logging.getLogger("d3k2.http")


def error_summary(exc: BaseException) -> str:
    """An exception for an error log: the class of each exception in its chain and the frames it was
    raised through, never a message (a database error's message may quote a clinician's comment)."""
    parts = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = traceback.extract_tb(current.__traceback__)
        where = " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(frames))
        kind = type(current)
        parts.append(f"{kind.__module__}.{kind.__qualname__}" + (f" at {where}" if where else ""))
        current = current.__cause__ or current.__context__
    return "; caused by ".join(parts)


def bind(**fields: Any) -> None:
    """Add fields to every log line of the current request (or thread, outside a request)."""
    _context.set({**(_context.get() or {}), **fields})


def clear() -> None:
    _context.set(None)


def bound() -> dict[str, Any]:
    return dict(_context.get() or {})


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "event", <bound context>, <extra fields>}``; tracebacks under "exc"."""

    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}
        # The bound context first, then the record's own fields, which win over it in its place.
        line = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            # Werkzeug's development server colours its lines for a terminal; a JSON line is read by machines.
            "event": _ANSI.sub("", record.getMessage()),
            **bound(),
            **extra,
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class _JsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler configure_logging installed, so that calling it again replaces it."""


def configure_logging(level: str = "INFO", stream: IO[str] | None = None) -> None:
    """JSON lines on ``stream`` (stderr) for every logger; idempotent."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _JsonHandler)]:
        root.removeHandler(handler)
        handler.close()
    handler = _JsonHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())


def start_request() -> None:
    """Bind a request id (the caller's X-Request-ID when well-formed, else a new one) and the service id
    to every log line of the request (d3k2.http.app's first before-request step, before anything logs)."""
    clear()
    offered = request.headers.get(REQUEST_ID_HEADER, "")
    service = (request.view_args or {}).get("service_id")
    bind(
        request_id=offered if _REQUEST_ID.match(offered) else uuid.uuid4().hex,
        **({"service": service[:128]} if isinstance(service, str) else {}),
    )
    g.d3k2_log_started = time.perf_counter()


def end_request(response: Response) -> Response:
    """Log one line for the request, and echo its id in the response."""
    started = g.pop("d3k2_log_started", None)
    rid = bound().get("request_id")
    if isinstance(rid, str):
        response.headers[REQUEST_ID_HEADER] = rid
    log.info(
        "request",
        extra={
            "method": request.method,
            "path": request.path[:200],
            "status": response.status_code,
            "duration_ms": round((time.perf_counter() - started) * 1000, 2) if started else None,
        },
    )
    return response
