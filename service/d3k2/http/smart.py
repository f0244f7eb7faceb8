"""The "Why this card?" SMART on FHIR app (``/smart/``): SMART App Launch 2 (EHR launch and standalone),
authorization code with PKCE S256, then the patient's data read from the FHIR server with the token and run
through the SAME hook pipeline as a patient-view call (with its trace and the what-if overrides).

The OAuth client is the `fhirclient` library (SMART's Python client): it builds the authorize URL (state,
PKCE S256, aud, launch) and exchanges the code (checking state, sending the code_verifier). It does not read
``.well-known/smart-configuration`` (it reads the CapabilityStatement's security extension), so that
document is fetched here, only from a FHIR server on the allow-list (D3K2_FHIR_ALLOWED).

No PHI at rest and no server-side state: the launch (fhirclient's state: state value, code_verifier,
endpoints) and then the session (token, patient id, granted scopes) live only in one HttpOnly cookie,
sealed with Fernet (encrypted and authenticated) and expiring; nothing is written to disk or a database,
and nothing of it is logged (the request log carries the path only, never the query).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import requests
from cryptography.fernet import Fernet, InvalidToken
from fhirclient.auth import FHIROAuth2Auth
from fhirclient.client import FHIRClient
from flask import Blueprint, Flask, Response, current_app, redirect, render_template, request
from werkzeug.wrappers import Response as BaseResponse

from d3k2 import whatif
from d3k2.config import Settings
from d3k2.core.errors import D3K2Error
from d3k2.fhir.client import is_allowed, read_deadline
from d3k2.http import smart_view as view
from d3k2.http.api import TODAY_HEADER, _today
from d3k2.http.smart_auth import (
    RESOURCES,
    SmartError,
    TokenSession,
    endpoint,
    granted,
    refused,
    smart_configuration,
    unreachable,
    wanted_scope,
)
from d3k2.http.web import runtime

blueprint = Blueprint(
    "smart", __name__, url_prefix="/smart", static_folder="static", static_url_path="/static"
)
log = logging.getLogger("d3k2.smart")
# fhirclient logs its authorize parameters (state, PKCE challenge) at DEBUG: never in d3k2's logs.
logging.getLogger("fhirclient").setLevel(logging.WARNING)

COOKIE = "d3k2_smart"
LAUNCH_SECONDS = 300  # from the launch to the callback
SESSION_SECONDS = 1800  # at most; less when the token expires sooner
# A browser keeps a cookie of at most 4096 bytes (name, value and attributes); a larger one is dropped
# without a word, and the app would then say "no session" after a launch that worked.
MAX_COOKIE_BYTES = 3900
_RULE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_FHIR_ID = re.compile(r"^[A-Za-z0-9.-]{1,64}$")
_TOKEN = re.compile(r"^[\x21-\x7e]+$")  # what an Authorization header can carry: visible ASCII
_SWITCHES = ("warfarin", "k2", "pregnant")


@dataclass(frozen=True)
class SmartApp:
    settings: Settings
    sealer: Fernet

    @classmethod
    def from_settings(cls, settings: Settings) -> SmartApp:
        if settings.smart_secret:
            key = base64.urlsafe_b64encode(hashlib.sha256(settings.smart_secret.encode()).digest())
        else:
            key = Fernet.generate_key()
        return cls(settings, Fernet(key))

    @property
    def redirect_uri(self) -> str:
        return f"{self.settings.smart_app_url}/callback"

    def seal(self, data: dict[str, Any]) -> str:
        return self.sealer.encrypt(orjson.dumps(data)).decode()

    def unseal(self, raw: str | None, phase: str) -> dict[str, Any] | None:
        if not raw:
            return None
        try:
            data = orjson.loads(self.sealer.decrypt(raw.encode(), ttl=SESSION_SECONDS))
        except (InvalidToken, orjson.JSONDecodeError):
            return None
        if not isinstance(data, dict) or data.get("phase") != phase or data.get("exp", 0) < time.time():
            return None
        return data


def init_app(app: Flask, settings: Settings) -> None:
    app.extensions["d3k2.smart"] = SmartApp.from_settings(settings)
    app.register_blueprint(blueprint)


def _app() -> SmartApp:
    found: SmartApp = current_app.extensions["d3k2.smart"]
    return found


def content_security_policy(settings: Settings) -> str:
    # The EHR shows the app in its own frame: the origins it may be framed by are configured (none: no frame).
    ancestors = settings.smart_frame_ancestors or "'none'"
    return (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        f"base-uri 'none'; form-action 'self'; frame-ancestors {ancestors}"
    )


@blueprint.after_request
def _headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = content_security_policy(_app().settings)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Access-Control-Allow-Origin"] = request.host_url.rstrip("/")
    return response


@blueprint.errorhandler(SmartError)
def _error_page(exc: SmartError) -> Response:
    html = render_template("smart_error.html", title=exc.title, detail=exc.detail)
    response = Response(html, status=exc.status, mimetype="text/html")
    response.delete_cookie(COOKIE, path="/smart")
    return response


def _set_cookie(response: BaseResponse, value: str, seconds: int) -> None:
    secure = (_app().settings.smart_app_url or "").startswith("https://")
    response.set_cookie(
        COOKIE,
        value,
        max_age=seconds,
        path="/smart",
        httponly=True,
        secure=secure,
        # Inside the EHR's frame the cookie is a third-party one: SameSite=None, which needs https.
        samesite="None" if secure else "Lax",
    )


# ---------------------------------------------------------------- launch


@blueprint.get("/launch")
def launch() -> BaseResponse:
    app = _app()
    settings = app.settings
    iss = (request.args.get("iss") or settings.smart_iss or "").rstrip("/")
    launch_token = request.args.get("launch") or None
    if not iss:
        raise SmartError(
            400,
            "No FHIR server named",
            "Launch the app from the EHR (it sends iss and launch), or configure D3K2_SMART_ISS for a "
            "standalone launch.",
        )
    if not is_allowed(iss, settings.fhir_allowed):
        raise SmartError(
            403,
            "This FHIR server is not allowed",
            "The iss the launch named is not on d3k2's FHIR allow-list (D3K2_FHIR_ALLOWED); nothing was "
            "fetched from it.",
        )
    if launch_token is not None and len(launch_token) > 2048:
        raise SmartError(400, "The launch parameter is too long", "At most 2048 characters.")
    config = smart_configuration(iss, settings)
    authorize_uri, token_uri = (
        endpoint(config, "authorization_endpoint"),
        endpoint(config, "token_endpoint"),
    )
    if not is_allowed(token_uri, settings.fhir_allowed):
        # d3k2 itself posts the code and the PKCE verifier there: only to a server the operator allowed.
        raise SmartError(
            502,
            "The token endpoint is not allowed",
            "The FHIR server's SMART configuration names a token endpoint whose origin is not on d3k2's "
            "allow-list (D3K2_FHIR_ALLOWED); nothing was sent to it. Add the authorization server's origin "
            "to the list if it is the EHR's.",
        )
    client = FHIRClient(
        settings={
            "app_id": settings.smart_client_id,
            "api_base": iss,
            "redirect_uri": app.redirect_uri,
            "scope": wanted_scope(config),
            "launch_token": launch_token,
        }
    )
    client.server.auth = FHIROAuth2Auth(
        state={
            "app_id": settings.smart_client_id,
            "aud": iss,
            "authorize_uri": authorize_uri,
            "token_uri": token_uri,
            "redirect_uri": app.redirect_uri,
        }
    )
    url = client.authorize_url
    client.server.session.close()  # fhirclient's own session: unused, d3k2 fetched the configuration
    sealed = app.seal(
        {"phase": "launch", "exp": time.time() + LAUNCH_SECONDS, "iss": iss, "client": client.state}
    )
    response = redirect(url, code=302)
    _set_cookie(response, sealed, LAUNCH_SECONDS)
    return response


# ---------------------------------------------------------------- callback


def _exchange(app: SmartApp, launched: dict[str, Any]) -> tuple[FHIRClient, dict[str, Any]]:
    client = FHIRClient(state=launched["client"])
    client.server.session.close()
    client.server.session = session = TokenSession(app.settings)
    started = time.monotonic()
    try:
        with read_deadline(app.settings.fhir_budget):
            client.handle_callback(request.url)
    except SmartError:
        raise
    except requests.HTTPError as exc:
        raise refused(exc) from exc
    except requests.JSONDecodeError as exc:
        raise SmartError(
            502, "The authorization server's answer is not JSON", "Its token response could not be read."
        ) from exc
    except requests.RequestException as exc:
        raise SmartError(
            502,
            "The authorization server could not be reached",
            unreachable("The token response", exc, started, app.settings.fhir_budget),
        ) from exc
    except Exception as exc:  # fhirclient raises plain Exceptions (no token, a 401 from the token endpoint)
        raise refused(exc) from exc
    finally:
        session.close()
    context = client.launch_context
    return client, context if isinstance(context, dict) else {}


@blueprint.get("/callback")
def callback() -> BaseResponse:
    app = _app()
    launched = app.unseal(request.cookies.get(COOKIE), "launch")
    if launched is None:
        raise SmartError(
            400, "This launch has expired or was never started here", "Launch the app again from the card."
        )
    error = request.args.get("error")
    if error:
        raise SmartError(
            403, "Authorization was refused", f"The authorization server answered {error[:100]!r}."
        )
    if request.args.get("state") != launched["client"]["server"]["auth"].get("auth_state"):
        raise SmartError(
            400,
            "The authorization answer does not match this launch",
            "Its state is not the one this launch sent; nothing was exchanged. Launch the app again from "
            "the card.",
        )
    if not request.args.get("code"):
        raise SmartError(400, "The authorization server sent no code", "Launch the app again from the card.")
    client, context = _exchange(app, launched)
    scope = context.get("scope")
    scopes = scope if isinstance(scope, str) else ""
    missing = [r for r in RESOURCES if not granted(scopes, r)]
    if missing:
        raise SmartError(
            403,
            "Not enough access was granted",
            "The app reads, and was not allowed to read: "
            + ", ".join(missing)
            + ". Ask for these read scopes to be granted.",
        )
    patient = context.get("patient")
    if not isinstance(patient, str) or not patient:
        raise SmartError(
            400, "No patient was selected", "The authorization server named no patient for this launch."
        )
    if not _FHIR_ID.match(patient):
        # It goes into every query (patient=...): only a FHIR id, never more query or another path.
        raise SmartError(
            502,
            "The authorization server named an invalid patient",
            "Its token response's patient is not a FHIR id; nothing was read.",
        )
    token = client.server.auth.access_token
    if not isinstance(token, str) or not _TOKEN.match(token):
        raise SmartError(
            502,
            "The authorization server's token is not usable",
            "Its access_token is not a string that an Authorization header can carry; nothing was read.",
        )
    # fhirclient keeps the token's expires_in as expires_at (local time); the session ends with the token.
    expires_at = client.server.auth.expires_at
    lifetime = (expires_at - datetime.now()).total_seconds() if expires_at else SESSION_SECONDS
    seconds = int(max(1, min(SESSION_SECONDS, lifetime)))
    # Only the rule the card named is kept (a short id): the EHR's appContext may be of any size.
    app_context = context.get("appContext") if isinstance(context.get("appContext"), str) else None
    card_patient = _from_app_context(app_context, "patient")
    if card_patient is not None and card_patient != patient:
        # The card was for one patient, the token is for another (the EHR's context moved on, or a mix-up):
        # the page would show that other patient's record under this card's rule.
        raise SmartError(
            409,
            "The app was opened for another patient than the card's",
            "The authorization server named a different patient than the one the card was shown for; "
            "nothing was read. Open the app again from the card of the patient in front of you.",
        )
    sealed = app.seal(
        {
            "phase": "session",
            "exp": time.time() + seconds,
            "iss": launched["iss"],
            "token": token,
            "patient": patient,
            "scope": scopes,
            "focus": focused_rule(app_context),
        }
    )
    if len(COOKIE) + 1 + len(sealed) > MAX_COOKIE_BYTES:
        raise SmartError(
            502,
            "The access token is too large for this app",
            f"The authorization server's token ({len(token)} characters) does not fit in the app's session "
            "cookie, which a browser keeps only up to 4 KiB; ask for shorter tokens for this client.",
        )
    response = redirect(f"{app.settings.smart_app_url}/", code=303)
    _set_cookie(response, sealed, seconds)
    return response


# ---------------------------------------------------------------- the app page


def _from_app_context(app_context: str | None, name: str) -> str | None:
    """A string member of a card's appContext (``{"rule": "vitd-deficient", "patient": "p1"}``)."""
    if not app_context:
        return None
    try:
        data = orjson.loads(app_context)
    except orjson.JSONDecodeError:
        return None
    value = data.get(name) if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def focused_rule(app_context: str | None) -> str | None:
    """The rule a card's appContext names (``{"rule": "vitd-deficient"}``), when it is one."""
    rule = _from_app_context(app_context, "rule")
    return rule if rule is not None and _RULE.match(rule) else None


def _overrides() -> tuple[list[str], dict[str, str]]:
    chosen: dict[str, str] = {}
    for name in (*view.LABS, *_SWITCHES):
        value = (request.args.get(name) or "").strip()[:40]
        if value:
            chosen[name] = value
    return [f"{name}={value}" for name, value in chosen.items()], chosen


def _patient_view() -> str:
    return next(s.id for s in runtime().ruleset.services.values() if s.hook == "patient-view")


@blueprint.get("/")
def page() -> Response:
    app = _app()
    rt = runtime()
    session = app.unseal(request.cookies.get(COOKIE), "session")
    if session is None:
        raise SmartError(
            401,
            "No session",
            "The app's session has expired or was never opened: launch it from a card in the EHR.",
        )
    today = _today(request.headers.get(TODAY_HEADER), rt.settings)
    texts, chosen = _overrides()
    try:
        overrides = [whatif.parse_override(text, rt.ruleset) for text in texts]
    except D3K2Error as exc:
        raise SmartError(400, "A what-if value was not understood", exc.detail) from exc
    payload = {
        "hook": "patient-view",
        "hookInstance": f"smart-{int(time.time())}",
        "fhirServer": session["iss"],
        "fhirAuthorization": {
            "access_token": session["token"],
            "token_type": "Bearer",
            "scope": session["scope"],
            "subject": app.settings.smart_client_id,
        },
        "context": {"patientId": session["patient"]},
    }
    try:
        explanation = whatif.explain(
            rt.ruleset,
            _patient_view(),
            payload,
            today=today,
            profile=rt.profile,
            fetcher=rt.fetcher,
            overrides=overrides,
        )
    except D3K2Error as exc:
        raise SmartError(
            502,
            "The patient's data could not be read",
            f"The FHIR server did not give what the rules need ({exc.code}).",
        ) from exc
    report = whatif.report(explanation, rt.ruleset)
    context = view.page_context(report, explanation, rt.ruleset, rt.profile, today)
    focus = session.get("focus")
    titles = {rule.id: rule.title for rule in rt.ruleset.rules_for("patient-view")}
    html = render_template(
        "smart.html",
        **context,
        focus=focus if focus in titles else None,
        focus_title=titles.get(focus or ""),
        chosen=chosen,
    )
    return Response(html, mimetype="text/html")
