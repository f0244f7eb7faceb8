"""The SMART app's launch against FHIR servers whose .well-known/smart-configuration is missing, broken or
unsafe: a clear error page each time, never a 500 and never a redirect. Scope choice (v2 or v1) and the
check of granted scopes. A small Flask app on a free port plays the FHIR server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from flask import Flask, Response, jsonify

from builders import CARDS, refused_port, ruleset, serving
from d3k2.config import Settings
from d3k2.http.app import create_app
from d3k2.http.smart import focused_rule
from d3k2.http.smart_auth import SCOPE_V1, SCOPE_V2, granted, wanted_scope

CONFIGS: dict[str, Any] = {}


@pytest.fixture(scope="module")
def fhir() -> Iterator[str]:
    app = Flask("fake-fhir")

    @app.get("/<name>/.well-known/smart-configuration")
    def configuration(name: str) -> Any:
        found = CONFIGS[name]
        return found if isinstance(found, Response) else jsonify(found)

    with serving(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    settings = Settings(
        env="test",
        cards_dir=CARDS,
        data_dir=tmp_path_factory.mktemp("smart-launch"),
        auth="off",
        smart_app_url="http://localhost/smart",
        smart_frame_ancestors="https://ehr.example.org",
    )
    app = create_app(settings, ruleset())
    yield app.test_client()
    app.extensions["d3k2"].fetcher.close()


def _good(base: str) -> dict[str, Any]:
    return {
        "authorization_endpoint": f"{base}/authorize",
        "token_endpoint": f"{base}/token",
        "code_challenge_methods_supported": ["S256"],
        "capabilities": ["launch-ehr", "permission-v2"],
    }


@pytest.mark.parametrize(
    ("name", "config", "status", "title"),
    [
        ("gone", Response("no", status=404), 502, "gave no SMART configuration"),
        ("text", Response("<html>", mimetype="text/html"), 502, "is not JSON"),
        ("list", [1, 2], 502, "not a JSON object"),
        ("nopkce", {"code_challenge_methods_supported": ["plain"]}, 502, "does not support PKCE S256"),
        (
            "noauth",
            {"token_endpoint": "http://127.0.0.1:9/token", "code_challenge_methods_supported": ["S256"]},
            502,
            "incomplete",
        ),
        (
            "plainhttp",
            {
                "authorization_endpoint": "http://as.example.org/a",
                "token_endpoint": "https://as.example.org/t",
                "code_challenge_methods_supported": ["S256"],
            },
            502,
            "not on https",
        ),
        ("big", {"padding": "x" * 300_000}, 502, "too large"),
    ],
)
def test_a_bad_configuration_is_a_clear_page(
    client: Any, fhir: str, name: str, config: Any, status: int, title: str
) -> None:
    CONFIGS[name] = config
    answer = client.get("/smart/launch", query_string={"iss": f"{fhir}/{name}", "launch": "abc"})
    assert answer.status_code == status
    html = answer.get_data(as_text=True)
    assert title in html and 'id="error-title"' in html
    assert "Location" not in answer.headers


def test_an_unreachable_server(client: Any) -> None:
    answer = client.get("/smart/launch", query_string={"iss": f"http://127.0.0.1:{refused_port()}/fhir"})
    assert answer.status_code == 502 and "could not be reached" in answer.get_data(as_text=True)


def test_a_good_configuration_redirects_with_pkce_and_a_sealed_cookie(client: Any, fhir: str) -> None:
    CONFIGS["good"] = _good(fhir)
    answer = client.get("/smart/launch", query_string={"iss": f"{fhir}/good", "launch": "abc"})
    assert answer.status_code == 302
    query = parse_qs(urlsplit(answer.headers["Location"]).query)
    assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) == 43
    assert query["launch"] == ["abc"] and query["aud"] == [f"{fhir}/good"]
    cookie = answer.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "Path=/smart" in cookie and "SameSite=Lax" in cookie
    # Neither the PKCE verifier nor the state is readable in the cookie.
    assert query["state"][0] not in cookie
    assert "frame-ancestors https://ehr.example.org" in answer.headers["Content-Security-Policy"]


def test_a_launch_value_too_long(client: Any, fhir: str) -> None:
    CONFIGS["good"] = _good(fhir)
    answer = client.get("/smart/launch", query_string={"iss": f"{fhir}/good", "launch": "x" * 3000})
    assert answer.status_code == 400


def test_a_tampered_cookie_is_no_session(client: Any) -> None:
    client.set_cookie("d3k2_smart", "gAAAAA-not-sealed", path="/smart")
    assert client.get("/smart/").status_code == 401
    assert client.get("/smart/callback?code=a&state=b").status_code == 400


def test_scopes() -> None:
    assert wanted_scope({"capabilities": ["permission-v2"]}) == SCOPE_V2
    assert wanted_scope({"capabilities": ["permission-v1"]}) == SCOPE_V1
    assert wanted_scope({"scopes_supported": ["patient/*.read"]}) == SCOPE_V1
    assert wanted_scope({}) == SCOPE_V2
    assert granted("patient/Observation.rs", "Observation")
    assert granted("patient/*.read", "Condition") and granted("user/Condition.cruds", "Condition")
    assert not granted("patient/Observation.r", "Observation")  # read without search
    assert not granted("patient/Observation.rs", "Condition") and not granted("", "Patient")


def test_focused_rule() -> None:
    assert focused_rule('{"rule":"vitd-deficient"}') == "vitd-deficient"
    for bad in (None, "", "not json", "[1]", '{"rule": 5}', '{"rule":"<script>"}'):
        assert focused_rule(bad) is None


def test_cards_with_smart_links_match_the_openapi_document(client: Any) -> None:
    """The links stay CDS Hooks 2.0.1 Links (label, url, type smart, appContext a string)."""
    from test_openapi import check_response, document

    from builders import FIXTURES

    body = (FIXTURES / "patient-view" / "deficient" / "request.json").read_bytes()
    answer = client.post(
        "/cds-services/d3k2-patient-view",
        data=body,
        headers={"Content-Type": "application/json", "X-D3K2-Today": "2026-11-24"},
    )
    assert any(link["type"] == "smart" for card in answer.get_json()["cards"] for link in card["links"])
    check_response(document(), "post", "/cds-services/d3k2-patient-view", answer)
