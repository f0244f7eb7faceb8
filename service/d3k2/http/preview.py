"""The card preview page (``GET /preview``, dev only): run a fixture, a pasted CDS Hooks request or a FHIR
Bundle through the real pipeline with what-if overrides and see the cards as an EHR shows them, next to
the facts read and every rule's verdict.

Registered by create_app only when ``Settings.preview_enabled``. What the browser sends is evaluated and
answered, never stored or logged: the routes log nothing of the body and every answer is ``no-store``.
The page is rendered with Jinja2 autoescaping and its script builds the cards with DOM text nodes, so FHIR
text is shown, never interpreted; the Content-Security-Policy admits only the page's own script and style.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson
from flask import Blueprint, Response, render_template, request

from d3k2 import whatif
from d3k2.core.errors import BadRequest, NotFound, PayloadTooLarge, UnsupportedMediaType
from d3k2.core.limits import json_too_deep, prefetch_entries
from d3k2.core.ruleset import RuleSet
from d3k2.http.web import json_response, runtime

blueprint = Blueprint(
    "preview",
    __name__,
    url_prefix="/preview",
    template_folder="templates",
    static_folder="static",
)

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
MAX_OVERRIDES = 20
# Fixture folders are chosen by name from a directory listing; a name is only ever compared, never joined.
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class FixtureCase:
    hook: str
    case: str
    folder: Path

    @property
    def id(self) -> str:
        return f"{self.hook}/{self.case}"

    def expected(self) -> dict[str, Any]:
        path = self.folder / "expected.json"
        data = orjson.loads(path.read_bytes()) if path.is_file() else {}
        return data if isinstance(data, dict) else {}


def fixtures_dir() -> Path | None:
    """fixtures/ beside cards/ in a checkout; an installed wheel has none, and then the page offers none."""
    folder = runtime().settings.cards_dir.resolve().parent / "fixtures"
    return folder if folder.is_dir() else None


def fixture_cases(ruleset: RuleSet) -> list[FixtureCase]:
    root = fixtures_dir()
    if root is None:
        return []
    hooks = {service.hook for service in ruleset.services.values()}
    found: list[FixtureCase] = []
    for hook_dir in sorted(root.iterdir()):
        if hook_dir.name not in hooks or not hook_dir.is_dir():
            continue
        for case_dir in sorted(hook_dir.iterdir()):
            if _NAME.match(case_dir.name) and (case_dir / "request.json").is_file():
                found.append(FixtureCase(hook_dir.name, case_dir.name, case_dir))
    return found


def _services_by_hook(ruleset: RuleSet) -> dict[str, str]:
    by_hook: dict[str, str] = {}
    for service in ruleset.services.values():
        by_hook.setdefault(service.hook, service.id)
    return by_hook


@blueprint.after_request
def _headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    # The app answers CORS "*" for EHRs; the preview is for its own page only.
    response.headers["Access-Control-Allow-Origin"] = request.host_url.rstrip("/")
    return response


@blueprint.get("")
def page() -> Response:
    rt = runtime()
    ruleset = rt.ruleset
    html = render_template(
        "preview.html",
        hooks=sorted(_services_by_hook(ruleset)),
        profiles=[(name, profile.title) for name, profile in sorted(ruleset.profiles.items())],
        default_profile=rt.profile,
        fixtures=[(case, case.expected().get("description", "")) for case in fixture_cases(ruleset)],
        labs=[
            (name, lab.label, sorted(lab.units), lab.canonical_unit)
            for name, lab in ruleset.facts.labs.items()
            if name in ("vitd", "egfr", "calcium")
        ],
        today=datetime.now(UTC).date().isoformat(),
    )
    return Response(html, mimetype="text/html")


@blueprint.get("/fixtures")
def list_fixtures() -> Response:
    cases = fixture_cases(runtime().ruleset)
    return json_response(
        {
            "fixtures": [
                {"hook": c.hook, "case": c.case, "description": c.expected().get("description", "")}
                for c in cases
            ]
        }
    )


@blueprint.get("/fixtures/<hook>/<case>")
def get_fixture(hook: str, case: str) -> Response:
    wanted = f"{hook}/{case}"
    for found in fixture_cases(runtime().ruleset):
        if found.id == wanted:
            expected = found.expected()
            return json_response(
                {
                    "hook": found.hook,
                    "case": found.case,
                    "description": expected.get("description", ""),
                    "today": expected.get("today"),
                    "profile": expected.get("profile"),
                    "request": orjson.loads((found.folder / "request.json").read_bytes()),
                }
            )
    raise NotFound("no such fixture")


def _json_object() -> dict[str, Any]:
    if (request.mimetype or "").lower() != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {request.content_type or 'none'!r}"
        )
    raw = request.get_data(cache=False)
    settings = runtime().settings
    if request.content_length is None and len(raw) >= settings.max_body_bytes:
        raise PayloadTooLarge(f"the body is larger than {settings.max_body_bytes} bytes")
    # One level more than a hook call: the request or Bundle sits inside this body.
    if json_too_deep(raw, settings.max_json_depth + 1):
        raise BadRequest(f"the JSON body nests deeper than {settings.max_json_depth} levels")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    return value


def _today(body: dict[str, Any]) -> date:
    raw = _optional_str(body, "today")
    if raw is None:
        return datetime.now(UTC).date()
    try:
        return date.fromisoformat(raw)
    except ValueError as exc:
        raise BadRequest(f"today must be a date (YYYY-MM-DD), got {raw!r}") from exc


def _overrides(body: dict[str, Any], ruleset: RuleSet) -> list[whatif.Override]:
    raw = body.get("overrides") or []
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise BadRequest('overrides must be a list of strings such as "vitd=18ng/mL"')
    if len(raw) > MAX_OVERRIDES:
        raise BadRequest(f"at most {MAX_OVERRIDES} overrides are accepted")
    return [whatif.parse_override(item, ruleset) for item in raw]


def _payload(body: dict[str, Any], ruleset: RuleSet) -> tuple[str, Any]:
    """The service to call and the CDS Hooks request: the one sent, or one built from the Bundle sent."""
    by_hook = _services_by_hook(ruleset)
    hook = _optional_str(body, "hook")
    if hook is not None and hook not in by_hook:
        raise BadRequest(f"unknown hook {hook!r} (known: {', '.join(sorted(by_hook))})")
    cds_request, bundle = body.get("request"), body.get("bundle")
    if (cds_request is None) == (bundle is None):
        raise BadRequest("send exactly one of 'request' (a CDS Hooks request) or 'bundle' (a FHIR Bundle)")
    limit = runtime().settings.max_prefetch_entries
    if bundle is not None:
        if not isinstance(bundle, dict):
            raise BadRequest("bundle must be a FHIR Bundle (a JSON object)")
        entries = bundle.get("entry")
        if isinstance(entries, list) and len(entries) > limit:
            raise PayloadTooLarge(f"the Bundle holds {len(entries)} resources; at most {limit} are accepted")
        hook = hook or "patient-view"
        service = by_hook[hook]
        return service, whatif.request_from_bundle(
            bundle,
            hook=hook,
            patient_id=_optional_str(body, "patient"),
            prefetch_keys=list(ruleset.services[service].prefetch),
            content=orjson.dumps(bundle, option=orjson.OPT_SORT_KEYS),
        )
    if not isinstance(cds_request, dict) or not isinstance(cds_request.get("hook"), str):
        raise BadRequest("request must be a CDS Hooks request (a JSON object with 'hook')")
    sent = cds_request["hook"]
    if sent not in by_hook:
        raise BadRequest(f"the request's hook {sent!r} is not served (known: {', '.join(sorted(by_hook))})")
    if hook is not None and hook != sent:
        raise BadRequest(f"the request is for {sent!r} but hook {hook!r} was chosen")
    entries_sent = prefetch_entries(cds_request)
    if entries_sent > limit:
        raise PayloadTooLarge(f"prefetch holds {entries_sent} resources; at most {limit} are accepted")
    return by_hook[sent], cds_request


@blueprint.post("/explain")
def explain() -> Response:
    """{request | bundle, hook, patient, profile, today, overrides} → the explain report (facts, every
    rule's verdict, the CDS Hooks response)."""
    rt = runtime()
    body = _json_object()
    service, payload = _payload(body, rt.ruleset)
    profile = _optional_str(body, "profile") or rt.profile
    if profile not in rt.ruleset.profiles:
        known = ", ".join(sorted(rt.ruleset.profiles))
        raise BadRequest(f"unknown profile {profile!r} (known: {known})")
    explanation = whatif.explain(
        rt.ruleset,
        service,
        payload,
        today=_today(body),
        profile=profile,
        fetcher=rt.fetcher,
        overrides=_overrides(body, rt.ruleset),
    )
    return json_response(whatif.report(explanation, rt.ruleset))
