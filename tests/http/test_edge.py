"""d3k2.http.edge.ServiceCalls answers service calls before Flask routes them: every answer must be the one
Flask's own route gives (status, body, headers), and every other request must still reach Flask."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask import Flask, Request
from werkzeug.test import Client, TestResponse

import d3k2.http.api
from builders import CARDS, TODAY, fixtures, ruleset, sandbox_request
from d3k2.config import Settings
from d3k2.core.errors import BadRequest, PrefetchUnavailable, Unauthorized
from d3k2.http.app import create_app
from d3k2.http.edge import ServiceCalls, error_answer, is_service_call, request_path

SERVICE = "d3k2-patient-view"
HEADERS = {"X-D3K2-Today": TODAY.isoformat(), "X-Request-ID": "edge-test"}


def sandbox_call() -> bytes:
    return orjson.dumps(sandbox_request("patient-view.request.json"))


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    settings = Settings(env="test", cards_dir=CARDS, data_dir=tmp_path, max_body_bytes=64_000)
    built = create_app(settings, ruleset())
    yield built
    built.extensions["d3k2.store"].close()


def edge_and_flask(app: Flask) -> tuple[Client, Client]:
    """A client of the app as served (edge first) and one of Flask's own wsgi_app behind it."""
    edge = app.wsgi_app
    assert isinstance(edge, ServiceCalls)
    return Client(app, TestResponse), Client(edge.inner, TestResponse)


def comparable(response: TestResponse) -> tuple[int, Any, list[tuple[str, str]]]:
    headers = sorted((name.lower(), value) for name, value in response.headers.items())
    return response.status_code, json.loads(response.get_data()), headers


# ---------------------------------------------------------------- which requests the edge takes


@pytest.mark.parametrize(
    ("method", "path", "taken"),
    [
        ("POST", "/cds-services/d3k2-patient-view", True),
        ("POST", "/cds-services/no-such-service", True),
        ("POST", "/cds-services/", False),
        ("POST", "/cds-services", False),
        ("POST", "/cds-services/d3k2-patient-view/feedback", False),
        ("POST", "/cds-services/d3k2-patient-view/", False),
        ("POST", "/cds-servicesx/d3k2-patient-view", False),
        ("GET", "/cds-services/d3k2-patient-view", False),
        ("OPTIONS", "/cds-services/d3k2-patient-view", False),
        ("HEAD", "/cds-services/d3k2-patient-view", False),
    ],
)
def test_only_service_calls_are_taken(method: str, path: str, taken: bool) -> None:
    assert is_service_call({"REQUEST_METHOD": method, "PATH_INFO": path}) is taken


# ---------------------------------------------------------------- the same answers as Flask's route


@pytest.mark.parametrize("fixture", fixtures(), ids=lambda f: f.id)
def test_every_fixture_is_answered_as_flask_answers_it(app: Flask, fixture: Any) -> None:
    edge, flask = edge_and_flask(app)
    path = f"/cds-services/{fixture.expected['service']}"
    body = orjson.dumps(fixture.request)
    headers = {**HEADERS, "X-D3K2-Today": fixture.expected["today"]}
    answers = [
        c.post(path, data=body, content_type="application/json", headers=headers) for c in (edge, flask)
    ]
    assert comparable(answers[0]) == comparable(answers[1])
    assert answers[0].status_code == fixture.expected.get("status", 200)


class Unreadable(io.BytesIO):
    """A request body whose connection is lost: every read fails, as gunicorn's NoMoreData does."""

    def read(self, size: int | None = -1) -> bytes:
        raise ConnectionResetError("connection lost")

    readline = read  # type: ignore[assignment]


def _deep(levels: int) -> bytes:
    return b'{"hook":"patient-view","x":' + b"[" * levels + b"]" * levels + b"}"


ERROR_CALLS: dict[str, dict[str, Any]] = {
    "malformed JSON": {"data": b'{"hook": ', "content_type": "application/json"},
    "empty body": {"data": b"", "content_type": "application/json"},
    "not JSON": {"data": sandbox_call(), "content_type": "text/plain"},
    "no content type": {"data": sandbox_call()},
    "too deep": {"data": _deep(200), "content_type": "application/json"},
    "over the limit": {"data": b" " * 70_000 + sandbox_call(), "content_type": "application/json"},
    "chunked, over the limit": {
        "input_stream": io.BytesIO(b" " * 70_000 + sandbox_call()),
        "headers": {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        "environ_overrides": {"wsgi.input_terminated": True},
    },
    "chunked": {
        "input_stream": io.BytesIO(sandbox_call()),
        "headers": {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        "environ_overrides": {"wsgi.input_terminated": True},
    },
    "a JSON array": {"data": b"[1, 2]", "content_type": "application/json"},
    "no prefetch, no fhirServer": {
        "data": b'{"hook":"patient-view","hookInstance":"x","context":{"patientId":"p"}}',
        "content_type": "application/json",
    },
    "a bad X-D3K2-Today": {
        "data": sandbox_call(),
        "content_type": "application/json",
        "headers": {"X-D3K2-Today": "24/11/2026"},
    },
    "a Content-Type with parameters": {
        "data": sandbox_call(),
        "headers": {"Content-Type": " Application/FHIR+JSON ; charset=utf-8"},
    },
    "a Content-Type that only starts like JSON": {
        "data": sandbox_call(),
        "headers": {"Content-Type": "application/jsonx"},
    },
    "a body shorter than its Content-Length": {
        "input_stream": io.BytesIO(sandbox_call()[:100]),
        "headers": {"Content-Type": "application/json"},
        "environ_overrides": {"CONTENT_LENGTH": str(len(sandbox_call()))},
    },
    "a connection lost while the body is read": {
        "input_stream": Unreadable(),
        "headers": {"Content-Type": "application/json"},
        "environ_overrides": {"CONTENT_LENGTH": "5000"},
    },
    "a Content-Length that is not a number": {
        "input_stream": io.BytesIO(sandbox_call()),
        "headers": {"Content-Type": "application/json"},
        "environ_overrides": {"wsgi.input_terminated": True, "CONTENT_LENGTH": "12abc"},
    },
    "a zero Content-Length": {
        "input_stream": io.BytesIO(sandbox_call()),
        "headers": {"Content-Type": "application/json"},
        "environ_overrides": {"CONTENT_LENGTH": "0"},
    },
    "a malformed X-Request-ID": {
        "data": sandbox_call(),
        "content_type": "application/json",
        "headers": {"X-Request-ID": "not an id; " + "x" * 300},
    },
}


@pytest.mark.parametrize("case", list(ERROR_CALLS), ids=str)
@pytest.mark.parametrize("service", [SERVICE, "no-such-service"])
def test_refusals_are_answered_as_flask_answers_them(app: Flask, case: str, service: str) -> None:
    edge, flask = edge_and_flask(app)
    answers = []
    for client in (edge, flask):
        kwargs = {**ERROR_CALLS[case]}
        if isinstance(kwargs.get("input_stream"), Unreadable):
            kwargs["input_stream"] = Unreadable()
        elif "input_stream" in kwargs:
            kwargs["input_stream"] = io.BytesIO(kwargs["input_stream"].getvalue())
        kwargs["headers"] = {**HEADERS, **kwargs.get("headers", {})}
        answers.append(client.post(f"/cds-services/{service}", **kwargs))
    edge_status, edge_body, edge_headers = comparable(answers[0])
    flask_status, flask_body, flask_headers = comparable(answers[1])
    assert (edge_status, edge_body) == (flask_status, flask_body)
    # A generated request id differs from call to call; every other header is the same.
    assert [h for h in edge_headers if h[0] != "x-request-id"] == [
        h for h in flask_headers if h[0] != "x-request-id"
    ]
    assert len(answers[0].headers["X-Request-ID"]) in (len("edge-test"), 32)
    if service != SERVICE:
        assert edge_status in (404, 413, 415, 400)


def test_a_service_id_that_is_not_ascii_is_read_as_flask_reads_it(app: Flask) -> None:
    edge, flask = edge_and_flask(app)
    path = "/cds-services/d3k2-\u00e9t\u00e9"
    answers = [
        c.post(path, data=sandbox_call(), content_type="application/json", headers=HEADERS)
        for c in (edge, flask)
    ]
    assert comparable(answers[0]) == comparable(answers[1])
    assert answers[0].status_code == 404
    assert "d3k2-\u00e9t\u00e9" in answers[0].json["detail"]


@pytest.mark.parametrize(("raw", "path"), [("/cds-services/x", "/cds-services/x"), ("", "/"), ("//a", "/a")])
def test_request_path_is_werkzeugs(raw: str, path: str) -> None:
    environ = {"PATH_INFO": raw, "REQUEST_METHOD": "POST", "SERVER_NAME": "h", "SERVER_PORT": "80"}
    assert request_path(environ) == path == Request(environ).path


def test_a_bug_is_a_logged_500_that_says_nothing_of_the_request(
    app: Flask, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(d3k2.http.api, "call_service", broken)
    edge, flask = edge_and_flask(app)
    with caplog.at_level(logging.INFO):
        answers = [
            c.post(f"/cds-services/{SERVICE}", data=sandbox_call(), content_type="application/json")
            for c in (edge, flask)
        ]
    for answer in answers:
        assert answer.status_code == 500
        assert answer.json == {
            "error": "internal-error",
            "detail": "an internal error occurred; it has been logged",
        }
        assert answer.headers["Access-Control-Allow-Origin"] == "*"
    bugs = [r for r in caplog.records if r.getMessage().startswith("unhandled error (a bug)")]
    assert len(bugs) == 2 and all(r.exc_info for r in bugs)
    assert bugs[0].getMessage() == "unhandled error (a bug) on POST /cds-services/<service_id>"
    lines = [r for r in caplog.records if r.name == "d3k2.http"]
    assert [getattr(r, "status", None) for r in lines] == [500, 500]


def test_each_call_is_counted_and_timed_once(app: Flask) -> None:
    edge, _flask = edge_and_flask(app)
    for _ in range(3):
        edge.post(f"/cds-services/{SERVICE}", data=sandbox_call(), content_type="application/json")
    edge.post("/cds-services/no-such-service", data=sandbox_call(), content_type="application/json")
    registry = app.extensions["d3k2.http.metrics"].registry
    count = registry.get_sample_value(
        "d3k2_requests_total", {"service": SERVICE, "endpoint": "service", "status": "200"}
    )
    timed = registry.get_sample_value(
        "d3k2_request_seconds_count", {"service": SERVICE, "endpoint": "service"}
    )
    unknown = registry.get_sample_value(
        "d3k2_requests_total", {"service": "unknown", "endpoint": "service", "status": "404"}
    )
    assert (count, timed, unknown) == (3.0, 3.0, 1.0)


def test_the_queue_is_written_only_after_the_answer_is_closed(app: Flask) -> None:
    store = app.extensions["d3k2.store"]
    store.served.due_rows = 1
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": f"/cds-services/{SERVICE}",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(sandbox_call())),
        "HTTP_X_D3K2_TODAY": TODAY.isoformat(),
        "wsgi.input": io.BytesIO(sandbox_call()),
        "wsgi.url_scheme": "http",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
    }
    started: list[str] = []
    body = app.wsgi_app(environ, lambda status, _headers, _exc=None: started.append(status))
    assert started == ["200 OK"]
    cards = json.loads(b"".join(body))["cards"]
    assert cards and store.served.queued == len(cards)
    body.close()  # type: ignore[attr-defined]
    assert store.served.queued == 0


@pytest.mark.parametrize(
    ("exc", "status", "extra"),
    [
        (BadRequest("x"), 400, {}),
        (PrefetchUnavailable("x", keys=["vitd"]), 412, {}),
        (Unauthorized("bad token"), 401, {"WWW-Authenticate": 'Bearer realm="d3k2", error="invalid_token"'}),
        (KeyError("x"), 500, {}),
    ],
)
def test_error_answers(exc: Exception, status: int, extra: dict[str, str]) -> None:
    got_status, body, headers = error_answer(exc, 100)
    assert got_status == status and body["error"]
    for name, value in extra.items():
        assert headers[name].startswith(value)


def test_settings_are_read_from_the_app(tmp_path: Path) -> None:
    settings = Settings(env="test", cards_dir=CARDS, data_dir=tmp_path)
    app = create_app(replace(settings, max_body_bytes=500), ruleset())
    try:
        client = Client(app, TestResponse)
        answer = client.post(f"/cds-services/{SERVICE}", data=sandbox_call(), content_type="application/json")
        assert answer.status_code == 413
        assert answer.json["detail"] == "the body is larger than 500 bytes"
    finally:
        app.extensions["d3k2.store"].close()
