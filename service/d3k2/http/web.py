"""Shared pieces of the HTTP edge: the per-app runtime and JSON responses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from flask import Response, current_app

from d3k2.config import Settings
from d3k2.core.ruleset import RuleSet
from d3k2.fhir.client import FhirClient


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    ruleset: RuleSet
    fetcher: FhirClient
    profile: str


def runtime() -> Runtime:
    rt: Runtime = current_app.extensions["d3k2"]
    return rt


# Every answer carries these (d3k2.http.app adds them after each request). CORS: the sandbox and
# other browser-based EHR clients call from another origin.
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "authorization, content-type, accept",
    "Access-Control-Max-Age": "600",
}
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
DEFAULT_HEADERS = {**CORS_HEADERS, "Cache-Control": "no-store"}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status=status, mimetype="application/json", headers=headers)
