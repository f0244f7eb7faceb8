"""The SMART app's side of OAuth (d3k2.http.smart uses it): the FHIR server's
``.well-known/smart-configuration`` read and checked, the scopes asked for and the scopes granted, and the
HTTP session fhirclient exchanges the code on. Every request here uses the fetcher's transport (nothing
from the environment, no redirects) with a size cap and the whole answer within the FHIR budget.
"""

from __future__ import annotations

import re
import time
from typing import Any
from urllib.parse import urlsplit

import orjson
import requests

from d3k2.config import Settings
from d3k2.fhir.client import configure_session, origin, read_deadline

MAX_DOCUMENT_BYTES = 256 * 1024
MAX_TOKEN_RESPONSE_BYTES = 64 * 1024
RESOURCES = ("Patient", "Observation", "MedicationStatement", "MedicationRequest", "Condition")
SCOPE_V2 = "openid fhirUser " + " ".join(f"patient/{r}.rs" for r in RESOURCES)
SCOPE_V1 = "openid fhirUser " + " ".join(f"patient/{r}.read" for r in RESOURCES)
_SCOPE = re.compile(r"^(patient|user)/(\*|[A-Za-z]+)\.(\*|read|[cruds]+)$")


class SmartError(Exception):
    """An error page: what went wrong, in words a clinician or an integrator can act on."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(title)
        self.status, self.title, self.detail = status, title, detail


def _read_capped(response: requests.Response, limit: int) -> bytes | None:
    """The body, or None when it is larger than ``limit`` (decoded bytes counted: no compression bomb)."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(chunk_size=16 * 1024):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _bounded_get_json(url: str, settings: Settings) -> Any:
    # The fetcher's transport: no proxy variable or ~/.netrc entry from the environment, no cookies, and
    # the whole answer within the budget (a server that drips a byte a second never trips a read timeout).
    with (
        configure_session(requests.Session(), settings) as session,
        read_deadline(settings.fhir_budget),
        session.get(
            url,
            timeout=settings.fhir_timeout,
            allow_redirects=False,
            stream=True,
            headers={"Accept": "application/json"},
        ) as answer,
    ):
        if answer.status_code != 200:
            raise SmartError(
                502,
                "The FHIR server gave no SMART configuration",
                f"HTTP {answer.status_code} from its .well-known/smart-configuration.",
            )
        body = _read_capped(answer, MAX_DOCUMENT_BYTES)
    if body is None:
        raise SmartError(502, "The FHIR server's SMART configuration is too large", "More than 256 KiB.")
    return orjson.loads(body)


def endpoint(config: dict[str, Any], name: str) -> str:
    url = config.get(name)
    if not isinstance(url, str) or origin(url) is None:
        raise SmartError(
            502,
            "The FHIR server's SMART configuration is incomplete",
            f"{name} is missing or not an http(s) URL.",
        )
    host = urlsplit(url).hostname or ""
    if url.startswith("http://") and host not in ("127.0.0.1", "localhost", "::1"):
        raise SmartError(502, "The authorization server is not on https", f"{name} must use https.")
    return url


def unreachable(what: str, exc: Exception, started: float, budget: float) -> str:
    if time.monotonic() - started >= budget:
        return f"{what} did not arrive within {budget:g} s."
    return f"{what} could not be read ({type(exc).__name__})."


def smart_configuration(iss: str, settings: Settings) -> dict[str, Any]:
    started = time.monotonic()
    try:
        config = _bounded_get_json(f"{iss}/.well-known/smart-configuration", settings)
    except requests.RequestException as exc:
        raise SmartError(
            502,
            "The FHIR server could not be reached",
            unreachable("Its SMART configuration", exc, started, settings.fhir_budget),
        ) from exc
    except orjson.JSONDecodeError as exc:
        raise SmartError(
            502, "The FHIR server's SMART configuration is not JSON", "Ask its administrator."
        ) from exc
    if not isinstance(config, dict):
        raise SmartError(
            502, "The FHIR server's SMART configuration is not a JSON object", "Ask its administrator."
        )
    # SMART App Launch 2 requires the list, with S256: a server that does not name it may ignore the
    # PKCE challenge, and an intercepted code would then be exchanged without the verifier.
    methods = config.get("code_challenge_methods_supported")
    if not isinstance(methods, list) or "S256" not in methods:
        raise SmartError(
            502,
            "The authorization server does not support PKCE S256",
            "Its SMART configuration does not list S256 in code_challenge_methods_supported; SMART App "
            "Launch 2 requires it, and d3k2 does not launch without it.",
        )
    return config


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def wanted_scope(config: dict[str, Any]) -> str:
    """SMART v2 read scopes (``.rs``) unless the server advertises only v1."""
    capabilities = _list(config.get("capabilities"))
    supported = _list(config.get("scopes_supported"))
    v1_only = "permission-v2" not in capabilities and (
        "permission-v1" in capabilities or any(str(s).endswith(".read") for s in supported)
    )
    return SCOPE_V1 if v1_only else SCOPE_V2


class TokenSession(requests.Session):
    """fhirclient's HTTP session for the token request: the fetcher's transport (nothing from the
    environment), a timeout, no redirects (the code and the code_verifier go to the token endpoint the
    configuration named, nowhere else) and an answer of at most 64 KiB."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        configure_session(self, settings)
        self.timeout = settings.fhir_timeout

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs["timeout"] = self.timeout
        kwargs["allow_redirects"] = False
        kwargs["stream"] = True
        with super().request(method, url, *args, **kwargs) as response:
            body = _read_capped(response, MAX_TOKEN_RESPONSE_BYTES)
        if body is None:
            raise SmartError(
                502, "The authorization server's answer is too large", "Its token response is over 64 KiB."
            )
        response._content = body  # read here, bounded; requests serves .json() from it
        return response


def granted(scopes: str, resource: str) -> bool:
    for scope in scopes.split():
        match = _SCOPE.match(scope)
        if match and match.group(2) in ("*", resource):
            access = match.group(3)
            if access in ("*", "read") or ("r" in access and "s" in access):
                return True
    return False


def _oauth_error(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, requests.Response):
        try:
            body = response.json()
        except ValueError:
            body = {}
        error = body.get("error") if isinstance(body, dict) else None
        return f"HTTP {response.status_code}" + (f": {error}" if isinstance(error, str) else "")
    return type(exc).__name__


def refused(exc: Exception) -> SmartError:
    return SmartError(
        400,
        "The authorization server refused the code",
        f"{_oauth_error(exc)}. The code may have expired or been used already: launch the app again "
        "from the card.",
    )
