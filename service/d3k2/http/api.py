"""HTTP edge: discovery, service calls, feedback. Thin: parse, call d3k2.service, answer JSON."""

from __future__ import annotations

import logging
import time
from datetime import UTC, date, datetime
from typing import Any

import orjson
from flask import Blueprint, Request, Response, current_app, request
from gunicorn.http.errors import ParseException  # type: ignore[import-untyped]

from d3k2.config import Settings
from d3k2.core.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from d3k2.core.hooks import parse_feedback
from d3k2.core.limits import json_too_deep, prefetch_entries
from d3k2.http import logs
from d3k2.http.metrics import InstrumentedFetcher, Metrics, metrics_of
from d3k2.http.openapi import build_openapi
from d3k2.http.web import json_response, runtime
from d3k2.service import call_service, discovery, find_service
from d3k2.store.feedback import FeedbackStore
from d3k2.store.schema import StoreUnavailable

blueprint = Blueprint("cds", __name__)
log = logging.getLogger("d3k2.http.api")

_JSON_TYPES = ("application/json", "application/fhir+json")
TODAY_HEADER = "X-D3K2-Today"


def json_body(req: Request, settings: Settings) -> Any:
    """The request's JSON body, within the configured limits; a D3K2Error saying what was wrong."""
    if req.mimetype not in _JSON_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {req.content_type or 'none'!r}"
        )
    try:
        raw = req.get_data(cache=False)
    except (OSError, ParseException):
        # The server decodes a chunked body while the app reads it: gunicorn raises its ParseException
        # (InvalidChunkSize for a chunk size "zz", ChunkMissingTerminator) or NoMoreData (an IOError, the
        # client gone mid-body), Werkzeug's own server an OSError. The client's fault: 400, not 500.
        raise BadRequest("the request body could not be read (malformed chunked encoding)") from None
    limit = settings.max_body_bytes
    if raw and req.content_length is None and len(raw) >= limit:
        # A chunked body is cut at the limit by Werkzeug without an error: what reached it was too large.
        raise PayloadTooLarge(f"the body is larger than {limit} bytes")
    if not raw:
        raise BadRequest("the body is empty; a JSON object is required")
    depth = settings.max_json_depth
    if json_too_deep(raw, depth):
        raise BadRequest(f"the JSON body nests deeper than {depth} levels")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from exc


def _today(override: str | None, settings: Settings) -> date:
    """The request's day (UTC). Outside production a replay harness may fix it with X-D3K2-Today
    (``override``: that header's value)."""
    if override and settings.env != "production":
        try:
            return date.fromisoformat(override)
        except ValueError as exc:
            raise BadRequest(f"{TODAY_HEADER} must be a date (YYYY-MM-DD), got {override!r}") from exc
    return datetime.now(UTC).date()


@blueprint.get("/cds-services")
def get_discovery() -> Response:
    return json_response(discovery(runtime().ruleset))


@blueprint.post("/cds-services/<service_id>")
def post_service(service_id: str) -> Response:
    rt, store, metrics = runtime(), _store(), metrics_of(current_app)
    find_service(rt.ruleset, service_id)
    payload = json_body(request, rt.settings)
    entries, bound = prefetch_entries(payload), rt.settings.max_prefetch_entries
    if entries > bound:
        raise PayloadTooLarge(f"prefetch holds {entries} resources; at most {bound} are accepted")
    if isinstance(payload, dict) and isinstance(payload.get("hookInstance"), str):
        logs.bind(hook_instance=payload["hookInstance"][:100])
    outcome = call_service(
        rt.ruleset,
        service_id,
        payload,
        today=_today(request.headers.get(TODAY_HEADER), rt.settings),
        profile=rt.profile,
        fetcher=InstrumentedFetcher(rt.fetcher, metrics),
        card_key=store.card_key,
        smart_url=rt.settings.smart_launch_url,
    )
    cards = outcome.response["cards"]
    # Said on the request's own log line (d3k2.http.logs), not on a second one.
    logs.bind(cards=len(cards), fetched=_fetched(outcome.resolved.fetched))
    _record_served(store, service_id, cards, metrics)
    return json_response(outcome.response)


def _fetched(fetched: dict[str, str]) -> str | None:
    """Which prefetch keys were fetched from the FHIR server, and how each went (none: not logged).
    Medications read by reference are counted (``medications:2 ok 1 failed``): their ids stay out."""
    named, reads = [], {"ok": 0, "failed": 0}
    for key, how in sorted(fetched.items()):
        went = "ok" if how == "ok" else "failed"
        if key.startswith("Medication/"):
            reads[went] += 1
        else:
            named.append(f"{key}:{went}")
    if reads["ok"] or reads["failed"]:
        named.append(f"medications:{reads['ok']} ok {reads['failed']} failed")
    return ",".join(named) or None


def _store() -> FeedbackStore:
    store: FeedbackStore = current_app.extensions["d3k2.store"]
    return store


def _record_served(
    store: FeedbackStore, service_id: str, cards: list[dict[str, Any]], metrics: Metrics
) -> None:
    """Cards served are what feedback is measured against; losing them must never cost the answer.

    The answer only queues the rows (``cards_record_seconds`` is that time): the writer thread
    (d3k2.store.served) writes them in batches, and failed batches and dropped rows reach
    ``store_errors`` through ``Metrics.served_listener``."""
    metrics.count_cards(cards)
    started = time.perf_counter()
    try:
        store.enqueue_cards(service_id, cards)
    except Exception:
        metrics.store_errors.labels("record_cards").inc()
        log.exception("cards served not recorded (a bug)")
    metrics.cards_record_seconds.observe(time.perf_counter() - started)


@blueprint.post("/cds-services/<service_id>/feedback")
def post_feedback(service_id: str) -> Response:
    rt = runtime()
    find_service(rt.ruleset, service_id)
    feedback = parse_feedback(json_body(request, rt.settings))
    log.info(
        "feedback service=%s items=%d outcomes=%s",
        service_id,
        len(feedback.feedback),
        ",".join(item.outcome for item in feedback.feedback),
    )
    metrics = metrics_of(current_app)
    try:
        stored = _store().record_feedback(service_id, feedback.feedback)
    except StoreUnavailable:
        metrics.store_errors.labels("record_feedback").inc()
        for item in feedback.feedback:
            metrics.feedback.labels(item.outcome, "error").inc()
        raise
    for item, new in zip(feedback.feedback, stored.new, strict=True):
        metrics.feedback.labels(item.outcome, "stored" if new else "duplicate").inc()
    return json_response(
        {
            "received": stored.received,
            "stored": stored.stored,
            "duplicates": stored.duplicates,
            "persisted": True,
        }
    )


@blueprint.get("/healthz")
def healthz() -> Response:
    return json_response({"status": "ok"})


@blueprint.get("/openapi.json")
def get_openapi() -> Response:
    """Not under /cds-services, so never behind the JWT check (auth.protected)."""
    return json_response(build_openapi(runtime().ruleset))


@blueprint.get("/readyz")
def readyz() -> Response:
    """Ready when the rule set has services and the feedback database answers (schema at head)."""
    checks = {"rules": "ok" if runtime().ruleset.services else "no services loaded"}
    try:
        _store().ping()
        checks["database"] = "ok"
    except StoreUnavailable as exc:
        checks["database"] = exc.detail
    ready = all(value == "ok" for value in checks.values())
    return json_response(
        {"status": "ready" if ready else "not-ready", "checks": checks}, 200 if ready else 503
    )
