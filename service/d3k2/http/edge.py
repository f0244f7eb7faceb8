"""Service calls (``POST /cds-services/<id>``) answered in front of Flask, at the WSGI level.

A typical call costs d3k2 about 0.6 ms of worker time under gunicorn; Flask's own request machinery
(request and app contexts, routing, hooks, the Response object) added 0.15 ms to each (BENCHMARKS.md).
So ServiceCalls answers these calls itself, with the same steps Flask ran for them, in the same order:
request id and log binding, the JWT check, d3k2.http.api.answer_call, metrics, the one log line, and the
same JSON errors and headers. Every other request — discovery, feedback, CORS preflight (OPTIONS), other
methods (405), metrics, preview — goes on to Flask unchanged.

The body, path and headers of a call are read from the environ itself (``payload``, ``request_path``):
building Werkzeug's request and its stream wrappers took 10 µs in process and about 45 µs of worker CPU
under load (cold code, measured in BENCHMARKS.md). Werkzeug still reads a chunked body, and the JWT
check gets a Werkzeug request when D3K2_AUTH is not off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import orjson
from flask import Request
from werkzeug.exceptions import ClientDisconnected, HTTPException, RequestEntityTooLarge
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wsgi import get_content_length

from d3k2.config import Settings
from d3k2.core.errors import D3K2Error, Unauthorized
from d3k2.http import logs
from d3k2.http.api import TODAY_HEADER, Call, answer_call, check_json_type, json_body, parse_json
from d3k2.http.auth import Authenticator, www_authenticate
from d3k2.http.metrics import Metrics, RequestMetrics
from d3k2.http.web import JSON_HEADERS, Runtime
from d3k2.store.feedback import FeedbackStore

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger("d3k2")

PREFIX = "/cds-services/"
ENDPOINT = "cds.post_service"  # Flask's name for the same rule: metrics label the calls alike


def error_answer(exc: BaseException, max_body_bytes: int) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, JSON body and extra headers for an exception raised while answering a request."""
    if isinstance(exc, Unauthorized):
        return exc.status, exc.body(), {"WWW-Authenticate": www_authenticate(exc)}
    if isinstance(exc, D3K2Error):
        return exc.status, exc.body(), {}
    if isinstance(exc, RequestEntityTooLarge):
        return 413, _error("payload-too-large", f"the body is larger than {max_body_bytes} bytes"), {}
    if isinstance(exc, HTTPException):
        code = (exc.name or "error").lower().replace(" ", "-")
        return exc.code or 500, _error(code, exc.description or code), {}
    return 500, _error("internal-error", "an internal error occurred; it has been logged"), {}


def _error(code: str, detail: str) -> dict[str, Any]:
    return {"error": code, "detail": detail}


def is_service_call(environ: WSGIEnvironment) -> bool:
    """``POST /cds-services/<id>``: one non-empty path segment after the prefix."""
    if environ.get("REQUEST_METHOD") != "POST":
        return False
    path: str = environ.get("PATH_INFO") or ""
    return path.startswith(PREFIX) and len(path) > len(PREFIX) and "/" not in path[len(PREFIX) :]


class ServiceCalls:
    """WSGI middleware: answers service calls, hands everything else to ``inner`` (Flask's wsgi_app)."""

    def __init__(
        self,
        inner: WSGIApplication,
        rt: Runtime,
        store: FeedbackStore,
        metrics: Metrics,
        per_request: RequestMetrics,
        authenticator: Authenticator,
    ) -> None:
        self.inner = inner
        self._rt = rt
        self._store = store
        self._metrics = metrics
        self._per_request = per_request
        self._authenticator = authenticator

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if not is_service_call(environ):
            return self.inner(environ, start_response)
        started = time.perf_counter()
        settings = self._rt.settings
        path = request_path(environ)
        service_id = path[len(PREFIX) :]
        rid = logs.begin_request(environ.get(_REQUEST_ID_KEY, ""), service_id)
        after_send: Callable[[], None] | None = None
        extra: dict[str, str] = {}
        try:
            if self._authenticator.mode != "off":
                self._authenticator.check(_request(environ, settings))
            call = Call(lambda: payload(environ, settings), environ.get(_TODAY_KEY))
            body = orjson.dumps(answer_call(call, self._rt, self._store, self._metrics, service_id))
            status = 200
        except Exception as exc:  # every failure is an answer, as Flask's error handlers make them
            status, error, extra = error_answer(exc, settings.max_body_bytes)
            if status == 500:
                log.exception("unhandled error (a bug) on POST %s<service_id>", PREFIX)
            body = orjson.dumps(error)
        self._per_request.count(service_id, ENDPOINT, status, started)
        logs.request_line("POST", path, status, started)
        logs.clear()
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            *JSON_HEADERS,
            *extra.items(),
            (logs.REQUEST_ID_HEADER, rid),
        ]
        start_response(f"{status} {HTTP_STATUS_CODES.get(status, 'Unknown')}", headers)
        return _Answer(body, after_send)


def _environ_key(header: str) -> str:
    return "HTTP_" + header.upper().replace("-", "_")


_REQUEST_ID_KEY = _environ_key(logs.REQUEST_ID_HEADER)
_TODAY_KEY = _environ_key(TODAY_HEADER)


def request_path(environ: WSGIEnvironment) -> str:
    """The path as Werkzeug's ``Request.path`` gives it (PATH_INFO is latin-1 text of UTF-8 bytes)."""
    raw: str = environ.get("PATH_INFO") or ""
    text = raw if raw.isascii() else raw.encode("latin1").decode(errors="replace")
    return "/" + text.lstrip("/")


def _request(environ: WSGIEnvironment, settings: Settings) -> Request:
    req = Request(environ)
    req.max_content_length = settings.max_body_bytes
    return req


def payload(environ: WSGIEnvironment, settings: Settings) -> Any:
    """The call's JSON body read from the environ, as ``d3k2.http.api.json_body`` reads it from a Flask
    request: same checks, same errors, in the same order. A body of known length is read straight from
    ``wsgi.input`` (Werkzeug's request and stream wrappers cost 10 µs a call, a tenth of the edge);
    a chunked one, or a malformed Content-Length, goes through Werkzeug."""
    content_type: str | None = environ.get("CONTENT_TYPE") or None
    # Werkzeug's Request.mimetype: the type before any parameter, stripped, lower case.
    check_json_type(content_type.partition(";")[0].strip().lower() if content_type else "", content_type)
    length = get_content_length(environ)
    declared: str = environ.get("CONTENT_LENGTH") or ""
    if length is None or not declared.isdigit():
        return json_body(_request(environ, settings), settings)
    if length > settings.max_body_bytes:
        raise RequestEntityTooLarge()
    try:
        raw: bytes = environ["wsgi.input"].read(length) if length else b""
    except (OSError, ValueError) as exc:  # as Werkzeug's LimitedStream: gunicorn's NoMoreData is an OSError
        raise ClientDisconnected() from exc
    if len(raw) < length:
        raise ClientDisconnected()  # what Werkzeug's LimitedStream raises for a body cut short
    return parse_json(raw, settings)


class _Answer:
    """The response body; ``after_send`` runs when the server closes it, once the answer is sent."""

    __slots__ = ("_after_send", "_body")

    def __init__(self, body: bytes, after_send: Callable[[], None] | None) -> None:
        self._body = body
        self._after_send = after_send

    def __iter__(self) -> Iterator[bytes]:
        yield self._body

    def close(self) -> None:
        if self._after_send is not None:
            self._after_send()
