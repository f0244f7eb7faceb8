"""A SMART-conformant EHR for tests: an authorization server built with authlib (authorization code grant,
PKCE S256 required, public client, scopes and ``launch`` checked, ``patient`` and ``appContext`` in the
token response) and a FHIR front that publishes ``.well-known/smart-configuration``, checks each bearer
token and its scopes, and forwards reads to the real local FHIR server (sekmet-fhir), which cannot serve
that path itself. Test code only; one werkzeug server on a free loopback port.
"""

from __future__ import annotations

import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc7636 import CodeChallenge
from flask import Flask, Response, abort, jsonify, request

from builders import serving

CLIENT_ID = "d3k2-test"
CAPABILITIES = [
    "launch-ehr",
    "launch-standalone",
    "client-public",
    "context-ehr-patient",
    "context-standalone-patient",
    "permission-patient",
    "permission-v2",
]


@dataclass
class Client:
    client_id: str
    redirect_uri: str

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_allowed_scope(self, scope: str) -> str:
        return scope

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri == self.redirect_uri

    def check_client_secret(self, client_secret: str) -> bool:
        return False

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == "none"

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "authorization_code"


@dataclass
class Code:
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    code_challenge: str | None
    code_challenge_method: str | None
    patient: str
    app_context: str | None
    issued: float

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope


@dataclass
class Ehr:
    """What a test controls: registered launches, the patient of a standalone launch, scopes the server
    withholds, codes that expire at once; and what it saw: every token issued, every FHIR read."""

    base_url: str = ""
    redirect_uri: str = ""
    standalone_patient: str = ""
    launches: dict[str, dict[str, Any]] = field(default_factory=dict)
    withhold: set[str] = field(default_factory=set)
    code_ttl: float = 60.0
    codes: dict[str, Code] = field(default_factory=dict)
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    reads: list[str] = field(default_factory=list)

    @property
    def fhir_base(self) -> str:
        return f"{self.base_url}/fhir"

    def register_launch(self, patient: str, app_context: str | None = None) -> str:
        launch = secrets.token_urlsafe(12)
        self.launches[launch] = {"patient": patient, "appContext": app_context}
        return launch


def _reads(scopes: str, resource: str) -> bool:
    return any(s in (f"patient/{resource}.rs", f"patient/{resource}.read") for s in scopes.split())


def build(ehr: Ehr, sekmet_base: str) -> Flask:
    app = Flask("smart-ehr")
    app.config["OAUTH2_TOKEN_EXPIRES_IN"] = {"authorization_code": 600}

    class CodeGrant(grants.AuthorizationCodeGrant):
        TOKEN_ENDPOINT_AUTH_METHODS = ["none"]  # noqa: RUF012 (authlib's class attribute)

        def save_authorization_code(self, code: str, req: Any) -> None:
            data = req.payload.data
            launch = data.get("launch")
            context = (
                ehr.launches[launch] if launch else {"patient": ehr.standalone_patient, "appContext": None}
            )
            scope = " ".join(
                s for s in (req.payload.scope or "").split() if s.split(".")[0] not in ehr.withhold
            )
            ehr.codes[code] = Code(
                code,
                req.client.client_id,
                req.payload.redirect_uri,
                scope,
                data.get("code_challenge"),
                data.get("code_challenge_method"),
                context["patient"],
                context["appContext"],
                time.monotonic(),
            )

        def query_authorization_code(self, code: str, client: Client) -> Code | None:
            found = ehr.codes.get(code)
            if found is None or found.client_id != client.client_id:
                return None
            return None if time.monotonic() - found.issued > ehr.code_ttl else found

        def delete_authorization_code(self, authorization_code: Code) -> None:
            ehr.codes.pop(authorization_code.code, None)

        def authenticate_user(self, authorization_code: Code) -> dict[str, str]:
            return {"patient": authorization_code.patient, "code": authorization_code.code}

    def query_client(client_id: str) -> Client | None:
        return Client(CLIENT_ID, ehr.redirect_uri) if client_id == CLIENT_ID else None

    def save_token(token: dict[str, Any], req: Any) -> None:
        code = req.authorization_code
        token["patient"] = code.patient
        if code.app_context is not None:
            token["appContext"] = code.app_context
        ehr.tokens[token["access_token"]] = {"patient": code.patient, "scope": token.get("scope", "")}

    server = AuthorizationServer(app, query_client=query_client, save_token=save_token)
    server.register_grant(CodeGrant, [CodeChallenge(required=True)])

    @app.get("/fhir/.well-known/smart-configuration")
    def smart_configuration() -> Response:
        return jsonify(
            {
                "issuer": ehr.base_url,
                "authorization_endpoint": f"{ehr.base_url}/auth/authorize",
                "token_endpoint": f"{ehr.base_url}/auth/token",
                "grant_types_supported": ["authorization_code"],
                "response_types_supported": ["code"],
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": ["none"],
                "capabilities": CAPABILITIES,
                "scopes_supported": ["openid", "fhirUser", "launch", "launch/patient", "patient/*.rs"],
            }
        )

    @app.get("/auth/authorize")
    def authorize() -> Any:
        args = request.args
        if args.get("aud") != ehr.fhir_base:
            return Response("aud is not this FHIR server", status=400)
        scopes = (args.get("scope") or "").split()
        launch = args.get("launch")
        if launch is not None and (launch not in ehr.launches or "launch" not in scopes):
            return Response("unknown launch", status=400)
        if launch is None and "launch/patient" not in scopes:
            return Response("a standalone launch asks for launch/patient", status=400)
        if args.get("code_challenge_method") != "S256":
            return Response("PKCE S256 is required", status=400)
        # Auto-approved: the user of this test EHR consents to every request.
        user = {"patient": "consented"}
        try:
            grant = server.get_consent_grant(end_user=user)
        except OAuth2Error as exc:
            return Response(f"{exc.error}: {exc.description}", status=400)
        return server.create_authorization_response(grant=grant, grant_user=user)

    @app.post("/auth/token")
    def issue_token() -> Any:
        return server.create_token_response()

    @app.get("/fhir/<path:path>")
    def fhir(path: str) -> Response:
        header = request.headers.get("Authorization", "")
        token = ehr.tokens.get(header.removeprefix("Bearer ")) if header.startswith("Bearer ") else None
        if token is None:
            abort(401)
        resource = path.split("/")[0]
        if not _reads(token["scope"], resource):
            abort(403)
        ehr.reads.append(resource)
        query = request.query_string.decode()
        url = f"{sekmet_base}/{path}" + (f"?{query}" if query else "")
        upstream = urllib.request.Request(url, headers={"Accept": "application/fhir+json"})
        try:
            with urllib.request.urlopen(upstream, timeout=10) as answer:
                return Response(answer.read(), status=answer.status, mimetype="application/fhir+json")
        except urllib.error.HTTPError as exc:
            with exc:
                return Response(exc.read(), status=exc.code, mimetype="application/fhir+json")

    return app


@contextmanager
def running(sekmet_base: str) -> Iterator[Ehr]:
    ehr = Ehr()
    with serving(build(ehr, sekmet_base)) as base:
        ehr.base_url = base  # read by its handlers at request time, none of which has come yet
        yield ehr
