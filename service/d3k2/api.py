"""HTTP edge: discovery, service calls, feedback. Thin: parse, call d3k2.service, answer JSON."""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime
from typing import Any

import orjson
from flask import Blueprint, Response, request

from d3k2.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from d3k2.hooks import parse_feedback
from d3k2.limits import json_too_deep, prefetch_entries
from d3k2.service import call_service, discovery, find_service
from d3k2.web import json_response, runtime

blueprint = Blueprint("cds", __name__)
log = logging.getLogger("d3k2.api")

_JSON_TYPES = ("application/json", "application/fhir+json")
TODAY_HEADER = "X-D3K2-Today"


def _json_body() -> Any:
    mimetype = (request.mimetype or "").lower()
    if mimetype not in _JSON_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {request.content_type or 'none'!r}"
        )
    raw = request.get_data(cache=False)
    if not raw:
        raise BadRequest("the body is empty; a JSON object is required")
    depth = runtime().settings.max_json_depth
    if json_too_deep(raw, depth):
        raise BadRequest(f"the JSON body nests deeper than {depth} levels")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from exc


def _today() -> date:
    """The request's day (UTC). Outside production a replay harness may fix it with X-D3K2-Today."""
    override = request.headers.get(TODAY_HEADER)
    if override and runtime().settings.env != "production":
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
    rt = runtime()
    find_service(rt.ruleset, service_id)
    payload = _json_body()
    entries, bound = prefetch_entries(payload), rt.settings.max_prefetch_entries
    if entries > bound:
        raise PayloadTooLarge(f"prefetch holds {entries} resources; at most {bound} are accepted")
    outcome = call_service(
        rt.ruleset, service_id, payload, today=_today(), profile=rt.profile, fetcher=rt.fetcher
    )
    log.info(
        "service=%s cards=%d fetched=%s",
        service_id,
        len(outcome.response["cards"]),
        ",".join(
            f"{k}:{'ok' if v == 'ok' else 'failed'}" for k, v in sorted(outcome.resolved.fetched.items())
        ),
    )
    return json_response(outcome.response)


@blueprint.post("/cds-services/<service_id>/feedback")
def post_feedback(service_id: str) -> Response:
    rt = runtime()
    find_service(rt.ruleset, service_id)
    feedback = parse_feedback(_json_body())
    log.info(
        "feedback service=%s items=%d outcomes=%s",
        service_id,
        len(feedback.feedback),
        ",".join(item.outcome for item in feedback.feedback),
    )
    # Persistence is a separate piece of work: say plainly that nothing was stored.
    return json_response({"received": len(feedback.feedback), "persisted": False})


@blueprint.get("/healthz")
def healthz() -> Response:
    return json_response({"status": "ok"})
