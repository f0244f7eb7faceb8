"""Structured logs: JSON lines with a request id (the caller's X-Request-ID or a new one), the service
and the hook instance bound; nothing from the patient's record."""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builders import SERVICE, close, hook_request, make_app, post
from d3k2.http.logs import JsonFormatter, configure_logging


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
        assert uuid.UUID(hex=generated).version == 4 and generated == uuid.UUID(generated).hex
        bad = client.get("/healthz", headers={"X-Request-ID": "bad id; with=spaces" + "x" * 200})
        assert uuid.UUID(hex=bad.headers["X-Request-ID"]).version == 4
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


def test_colour_codes_of_the_development_server_are_not_written_into_json_lines() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    record = logging.makeLogRecord(
        {
            "name": "werkzeug",
            "levelno": logging.INFO,
            "levelname": "INFO",
            "msg": "\x1b[31m\x1b[1mWARNING\x1b[0m: dev",
        }
    )
    handler.emit(record)
    assert json.loads(stream.getvalue())["event"] == "WARNING: dev"
