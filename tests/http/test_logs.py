"""Structured logs: JSON lines with a request id (the caller's X-Request-ID or a new one), the service
and the hook instance bound; nothing from the patient's record."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builders import SERVICE, close, hook_request, make_app, post
from d3k2.http import logs
from d3k2.http.logs import configure_logging


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    stream = io.StringIO()
    configure_logging("INFO", stream)
    configure_logging("INFO", stream)  # idempotent: one handler, not two
    yield stream
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_request_lines_carry_ids_and_no_patient_data(tmp_path: Path, log_stream: io.StringIO) -> None:
    app = make_app(tmp_path)
    try:
        client = app.test_client()
        request = hook_request()
        answer = client.post(
            f"/cds-services/{SERVICE}",
            data=json.dumps(request),
            content_type="application/json",
            headers={"X-Request-ID": "req-42", "X-D3K2-Today": "2026-11-24"},
        )
        assert answer.status_code == 200
        assert answer.headers["X-Request-ID"] == "req-42"
        generated = post(client, f"/cds-services/{SERVICE}", request).headers["X-Request-ID"]
        assert len(generated) == 32
        bad = client.get("/healthz", headers={"X-Request-ID": "bad id; with=spaces" + "x" * 200})
        assert len(bad.headers["X-Request-ID"]) == 32
    finally:
        close(app)

    logged = lines(log_stream)
    mine = [line for line in logged if line.get("request_id") == "req-42"]
    # One line per answer: the request line carries what the service did (cards, fetches).
    assert [line["logger"] for line in mine] == ["d3k2.http"]
    assert all(line["service"] == SERVICE for line in mine)
    assert all(line["hook_instance"] == request["hookInstance"] for line in mine)
    summary = next(line for line in mine if line["event"] == "request")
    assert (summary["method"], summary["path"], summary["status"]) == (
        "POST",
        f"/cds-services/{SERVICE}",
        200,
    )
    assert summary["duration_ms"] >= 0
    assert summary["cards"] == len(answer.json["cards"]) > 0
    # The two keys this request leaves out were asked of a FHIR server that is not there.
    assert summary["fetched"] == "calcium:failed,pregnancy:failed"
    assert any(line.get("request_id") == generated for line in logged)

    text = log_stream.getvalue()
    patient = request["prefetch"]["patient"]
    assert request["context"]["patientId"] not in text
    for name in patient.get("name", []):
        for given in name.get("given", []):
            assert given not in text
    assert "Practitioner/COREPRACTITIONER1" not in text


@pytest.fixture
def only_json_handler(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """Logging as d3k2.http.wsgi sets it up: its handler alone on the root logger. pytest adds its capture
    handlers again for each phase of a test, so they are taken off in the test's own phase (the
    handlers list is patched, and put back after the test)."""
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    configure_logging("INFO", stream)
    mine = [h for h in root.handlers if isinstance(h, logs._JsonHandler)]

    def alone() -> None:
        monkeypatch.setattr(root, "handlers", list(mine))

    stream.alone = alone  # type: ignore[attr-defined]
    try:
        yield stream
    finally:
        monkeypatch.undo()
        for handler in mine:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)


def _request_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [line for line in lines(stream) if line["logger"] == "d3k2.http"]


def test_the_request_line_is_the_same_whichever_way_it_is_written(only_json_handler: io.StringIO) -> None:
    only_json_handler.alone()  # type: ignore[attr-defined]
    handler = logging.getLogger().handlers[0]
    assert logs._only_handler() is handler  # the direct way: no record, no dispatch
    logs.begin_request("req-7", SERVICE)
    logs.bind(hook_instance="h-1", cards=2, fetched=None, status="bound, then replaced")
    logs.request_line("POST", "/cds-services/" + "x" * 300, 200, time.perf_counter())

    class Everything(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return True

    handler.addFilter(Everything())
    assert logs._only_handler() is None  # through Logger.handle, as every other line
    logs.request_line("POST", "/cds-services/" + "x" * 300, 200, time.perf_counter())
    logs.clear()
    direct, dispatched = _request_lines(only_json_handler)
    raw = only_json_handler.getvalue().splitlines()
    assert list(direct) == list(dispatched)  # the same keys in the same order
    for line in (direct, dispatched):
        assert line.pop("duration_ms") >= 0
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", line.pop("ts"))
    assert (
        direct
        == dispatched
        == {
            "level": "info",
            "logger": "d3k2.http",
            "event": "request",
            "request_id": "req-7",
            "service": SERVICE,
            "hook_instance": "h-1",
            "cards": 2,
            "fetched": None,
            "status": 200,
            "method": "POST",
            "path": ("/cds-services/" + "x" * 300)[:200],
        }
    )
    assert all(not line.endswith(" ") for line in raw)


@pytest.mark.parametrize("setup", ["other handler", "handler level", "logger filter", "no propagation"])
def test_anything_else_on_the_way_takes_the_usual_way(
    only_json_handler: io.StringIO, setup: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    only_json_handler.alone()  # type: ignore[attr-defined]
    http = logging.getLogger("d3k2.http")
    handler = logging.getLogger().handlers[0]
    assert logs._only_handler() is handler
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    if setup == "other handler":
        monkeypatch.setattr(logging.getLogger("d3k2"), "handlers", [Keep()])
    elif setup == "handler level":
        monkeypatch.setattr(handler, "level", logging.WARNING)
    elif setup == "logger filter":
        monkeypatch.setattr(http, "filters", [lambda record: False])
    else:
        monkeypatch.setattr(http, "propagate", False)
    assert logs._only_handler() is None
    logs.request_line("POST", "/cds-services/x", 200, None)
    written = _request_lines(only_json_handler)
    assert len(written) == (1 if setup == "other handler" else 0)
    assert len(seen) == (1 if setup == "other handler" else 0)


def test_a_failed_write_is_reported_as_logging_reports_it(
    only_json_handler: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    only_json_handler.alone()  # type: ignore[attr-defined]
    handler = logging.getLogger().handlers[0]
    assert logs._only_handler() is handler
    reported: list[logging.LogRecord] = []
    monkeypatch.setattr(handler, "handleError", reported.append)
    monkeypatch.setattr(handler, "stream", io.StringIO())
    handler.stream.close()
    logs.request_line("POST", "/cds-services/x", 503, None)
    assert [(r.getMessage(), getattr(r, "status", None)) for r in reported] == [("request", 503)]


def test_gunicorns_own_lines_still_format_once_logging_is_configured(log_stream: io.StringIO) -> None:
    """gunicorn's error log format prints %(process)d; a worker logs with it after the app is loaded. An
    integrator's format may print the thread too."""
    record = logging.LogRecord(
        "gunicorn.error", logging.INFO, "arbiter.py", 1, "Worker exiting (pid: %s)", (7,), None
    )
    text = logging.Formatter("[%(process)d] [%(thread)d %(threadName)s] [%(levelname)s] %(message)s").format(
        record
    )
    assert text.startswith(
        f"[{os.getpid()}] [{threading.get_ident()} MainThread] [INFO] Worker exiting (pid: 7)"
    )
