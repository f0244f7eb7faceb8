"""Shared pieces of the HTTP edge: the per-app runtime and JSON responses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from flask import Response, current_app

from d3k2.config import Settings
from d3k2.fhir.client import FhirClient
from d3k2.ruleset import RuleSet


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    ruleset: RuleSet
    fetcher: FhirClient
    profile: str


def runtime() -> Runtime:
    rt: Runtime = current_app.extensions["d3k2"]
    return rt


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    response = Response(orjson.dumps(body), status=status, mimetype="application/json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def error_response(status: int, code: str, detail: str, **extra: Any) -> Response:
    return json_response({"error": code, "detail": detail, **extra}, status)
