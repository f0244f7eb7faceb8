"""create_app(): the Flask factory. Configuration and the rule set are read here, once."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from d3k2.config import ConfigError, Settings, check_audience, check_smart, from_env
from d3k2.core.errors import D3K2Error, Unauthorized
from d3k2.core.loader import load_ruleset
from d3k2.core.ruleset import RuleSet
from d3k2.fhir.client import FhirClient
from d3k2.http import logs
from d3k2.http.api import blueprint
from d3k2.http.auth import Authenticator, www_authenticate
from d3k2.http.metrics import Metrics
from d3k2.http.metrics import init_app as init_metrics
from d3k2.http.preview import blueprint as preview_blueprint
from d3k2.http.smart import init_app as init_smart
from d3k2.http.web import DEFAULT_HEADERS, SECURITY_HEADERS, Runtime, json_response
from d3k2.service import prepare
from d3k2.store.feedback import FeedbackStore
from d3k2.store.schema import StoreUnavailable

log = logging.getLogger("d3k2")


def create_app(
    settings: Settings | None = None, ruleset: RuleSet | None = None, store: FeedbackStore | None = None
) -> Flask:
    settings = settings or from_env()
    ruleset = prepare(ruleset or load_ruleset(settings.cards_dir))
    if settings.profile not in ruleset.profiles:
        known = ", ".join(sorted(ruleset.profiles))
        raise ConfigError(f"profile {settings.profile!r} is not in the rule set (known: {known})")
    authenticator = Authenticator.from_settings(settings)
    check_audience(settings)
    check_smart(settings)
    # No app-wide /static: the preview blueprint serves its own files, only when it is enabled.
    app = Flask("d3k2", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["d3k2"] = Runtime(settings, ruleset, FhirClient(settings), settings.profile)
    app.register_blueprint(blueprint)
    if settings.preview_enabled:
        app.register_blueprint(preview_blueprint)
    if settings.smart_enabled:
        init_smart(app, settings)
    metrics = Metrics()
    per_request = init_metrics(app, metrics, list(ruleset.services))
    app.extensions["d3k2.store"] = opened = _open_store(store or _new_store(settings))
    opened.served.listener = metrics.served_listener()
    app.extensions["d3k2.http.auth"] = authenticator

    # One hook per phase (Flask resolves each hook it calls): logs first, so that even a refused request
    # has its id and its line; metrics; then the JWT check.
    @app.before_request
    def _before() -> None:
        logs.start_request()
        per_request.start()
        authenticator.check(request)

    @app.teardown_request
    def _teardown(_exc: BaseException | None) -> None:
        logs.clear()

    def _answer_error(exc: BaseException) -> Response:
        status, body, headers = error_answer(exc, settings.max_body_bytes)
        return json_response(body, status, headers)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        return _answer_error(exc)

    @app.errorhandler(Exception)
    def _any(exc: Exception) -> Response:
        if not isinstance(exc, D3K2Error):
            # The class and frames only: an exception's message may quote what the request sent.
            log.error(
                "unhandled error (a bug) on %s %s: %s",
                request.method,
                request.url_rule,
                logs.error_summary(exc),
            )
        return _answer_error(exc)

    @app.after_request
    def _after(response: Response) -> Response:
        # The defaults a view did not set, added at once (setdefault one by one scanned the list twice each).
        headers = response.headers
        present = {name.lower() for name, _value in headers.items()}
        headers.extend([(n, v) for n, v in DEFAULT_HEADERS.items() if n.lower() not in present])
        headers.update(SECURITY_HEADERS)
        per_request.observe(response)
        return logs.end_request(response)

    return app


def error_answer(exc: BaseException, max_body_bytes: int) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, JSON body and extra headers for an exception raised while answering a request."""
    if isinstance(exc, Unauthorized):
        return exc.status, exc.body(), {"WWW-Authenticate": www_authenticate(exc)}
    if isinstance(exc, D3K2Error):
        return exc.status, exc.body(), {}
    if isinstance(exc, RequestEntityTooLarge):
        return 413, _error("payload-too-large", f"the body is larger than {max_body_bytes} bytes"), {}
    if isinstance(exc, MethodNotAllowed):
        # RFC 9110 15.5.6: a 405 MUST say which methods the resource does support.
        allowed = ", ".join(sorted(exc.valid_methods or ()))
        return 405, _error("method-not-allowed", f"this URL answers {allowed}"), {"Allow": allowed}
    if isinstance(exc, HTTPException):
        code = (exc.name or "error").lower().replace(" ", "-")
        return exc.code or 500, _error(code, exc.description or code), {}
    return 500, _error("internal-error", "an internal error occurred; it has been logged"), {}


def _error(code: str, detail: str) -> dict[str, Any]:
    return {"error": code, "detail": detail}


def _new_store(settings: Settings) -> FeedbackStore:
    key = settings.card_key.encode() if settings.card_key else None
    return FeedbackStore(settings.database, card_key=key)


def _open_store(store: FeedbackStore) -> FeedbackStore:
    """Migrate at startup; a database that is down must not stop the service from answering hooks."""
    try:
        store.migrate()
    except StoreUnavailable:
        log.warning(
            "feedback database %s unreachable at startup; will migrate when it is back", store.display_url
        )
    return store
