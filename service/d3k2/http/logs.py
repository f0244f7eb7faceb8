"""Structured logs: one JSON object per line on stderr, with the request id and hook instance bound.

No PHI goes into a log line: callers log ids of services, rules and hook instances, counts, statuses and
durations; never patient ids, names, observation values or tokens. The request line carries the path
without its query string.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import secrets
import sys
import time
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


def bind(**fields: Any) -> None:
    """Add fields to every log line of the current request (or thread, outside a request)."""
    _context.set({**(_context.get() or {}), **fields})


def clear() -> None:
    _context.set(None)


def bound() -> dict[str, Any]:
    return dict(_context.get() or {})


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "event", <bound context>, <extra fields>}``; tracebacks under "exc"."""

    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}
        line = json_line(record.created, record.levelname, record.name, record.getMessage(), extra)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def json_line(created: float, level: str, logger: str, event: str, extra: dict[str, Any]) -> dict[str, Any]:
    """A log line as a dict: the bound context, then ``extra`` (which wins over it, in its place)."""
    return {
        "ts": datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds"),
        "level": level.lower(),
        "logger": logger,
        "event": event,
        **bound(),
        **extra,
    }


class _JsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler configure_logging installed, so that calling it again replaces it."""

    def write_line(self, created: float, fields: dict[str, Any]) -> None:
        """What ``handle`` does with an INFO record of the request logger carrying ``fields``, for a
        handler without filters: the same line, written the same way, without making the record."""
        text = orjson.dumps(json_line(created, "INFO", log.name, "request", fields), default=str).decode()
        self.acquire()
        try:
            self.stream.write(text + self.terminator)
            self.flush()
        except RecursionError:
            raise
        except Exception:
            record = log.makeRecord(log.name, logging.INFO, __file__, 0, "request", (), None, extra=fields)
            self.handleError(record)
        finally:
            self.release()


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
    # The logging module's global switches (logThreads, logProcesses, logMultiprocessing) stay as they are:
    # other handlers in the process (gunicorn's, an integrator's) may print %(process)d or %(thread)d, and
    # records without them fail to format there. The request line, the one record of every answer, is
    # written without a record when this handler alone takes it (request_line).


def request_id() -> str | None:
    value = bound().get("request_id")
    return value if isinstance(value, str) else None


def begin_request(offered_id: str, service: str | None) -> str:
    """Bind a request id (``offered_id``, the caller's X-Request-ID, when well-formed, else a new one) and
    the service id to every log line of the request; the id. Called first, before anything can log."""
    clear()
    rid = offered_id if _REQUEST_ID.match(offered_id) else _ids.next()
    bind(request_id=rid, **({"service": service[:128]} if isinstance(service, str) else {}))
    return rid


def request_line(method: str, path: str, status: int, started: float | None) -> None:
    """The request's one log line (``started``: its time.perf_counter() at the start)."""
    if log.isEnabledFor(logging.INFO):
        fields = {
            "method": method,
            "path": path[:200],
            "status": status,
            "duration_ms": round((time.perf_counter() - started) * 1000, 2) if started else None,
        }
        only = _only_handler()
        if only is not None:
            only.write_line(time.time(), fields)
            return
        # makeRecord + handle: Logger.info would also walk the stack for a caller nobody prints.
        log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, "request", (), None, extra=fields))


def _only_handler() -> _JsonHandler | None:
    """configure_logging's handler when it alone would write the request line, untouched by filters.

    Then the line is written without a LogRecord and without the logging module's dispatch: under load
    the line cost 43 µs of worker CPU an answer that way and 31 µs this way (bench/leave_out.py). Any
    other handler, filter or level on the way (pytest's, an integrator's) sends the line through
    ``Logger.handle`` as usual."""
    if log.filters or log.disabled:
        return None
    found: _JsonHandler | None = None
    logger: logging.Logger | None = log
    while logger is not None:
        for handler in logger.handlers:
            if found is not None or type(handler) is not _JsonHandler or handler.filters:
                return None
            if handler.level > logging.INFO:
                return None
            found = handler
        if not logger.propagate:
            break
        logger = logger.parent
    return found


def start_request() -> None:
    """begin_request for a request routed by Flask (d3k2.http.app's first before-request step)."""
    service = (request.view_args or {}).get("service_id")
    begin_request(request.headers.get(REQUEST_ID_HEADER, ""), service if isinstance(service, str) else None)
    g.d3k2_log_started = time.perf_counter()


def end_request(response: Response) -> Response:
    """Log one line for the request, and echo its id in the response."""
    started = g.pop("d3k2_log_started", None)
    rid = request_id()
    if rid:
        response.headers[REQUEST_ID_HEADER] = rid
    request_line(request.method, request.path, response.status_code, started)
    return response


class _RequestIds:
    """Request ids for requests that bring none: 32 hex digits, a random half per process (renewed in a
    forked child) and a counter. Unique, not secret; no system call per request (uuid4 reads
    os.urandom, which cost 15–30 µs per request under load here)."""

    def __init__(self) -> None:
        self._renew()
        os.register_at_fork(after_in_child=self._renew)

    def _renew(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._count = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._count):016x}"


_ids = _RequestIds()
