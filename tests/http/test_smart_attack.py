"""The SMART app attacked through what it reads: a FHIR server's .well-known/smart-configuration and the
token response of the authorization server it names. A small Flask app on a free port plays both (and a
proxy named in the environment); d3k2 runs in Flask's test client. Each test failed before its fix."""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from flask import Flask, Response, jsonify, request

from builders import CARDS, ruleset, serving
from d3k2.config import Settings
from d3k2.http.app import create_app
from d3k2.http.smart_auth import SCOPE_V2 as SCOPE

CONFIGS: dict[str, Any] = {}
TOKENS: dict[str, Any] = {}
SEEN: list[str] = []  # what the proxy was asked for
RECORDS: dict[str, list[dict[str, Any]]] = {}  # the Observations each FHIR server answers every search with


def _serve(app: Flask) -> Iterator[str]:
    with serving(app) as base:
        yield base


def _answer(found: Any) -> Any:
    if isinstance(found, Response):
        return found
    if callable(found):
        return found()
    return Response(json.dumps(found), mimetype="application/json")


@pytest.fixture(scope="module")
def ehr() -> Iterator[str]:
    app = Flask("hostile-ehr")

    @app.get("/<name>/.well-known/smart-configuration")
    def configuration(name: str) -> Any:
        return _answer(CONFIGS[name])

    @app.post("/<name>/token")
    def token(name: str) -> Any:
        return _answer(TOKENS[name])

    @app.get("/<name>/<path:path>")
    def fhir(name: str, path: str) -> Any:
        found = RECORDS.get(name, []) if path == "Observation" else []
        entries = [{"resource": r} for r in found]
        return jsonify({"resourceType": "Bundle", "type": "searchset", "entry": entries})

    yield from _serve(app)


@pytest.fixture(scope="module")
def proxy() -> Iterator[str]:
    app = Flask("proxy")

    @app.route("/", defaults={"path": ""}, methods=["GET", "POST", "CONNECT"])
    @app.route("/<path:path>", methods=["GET", "POST", "CONNECT"])
    def anything(path: str) -> Any:
        SEEN.append(request.url)
        return Response("proxied", status=502)

    yield from _serve(app)


def _client(tmp_path: Any, **changes: Any) -> Any:
    settings = Settings(
        env="test",
        cards_dir=CARDS,
        data_dir=tmp_path,
        auth="off",
        smart_app_url="http://localhost/smart",
        fhir_timeout=2.0,
        fhir_budget=2.0,
    ).with_overrides(**changes)
    app = create_app(settings, ruleset())
    client = app.test_client()
    yield client
    app.extensions["d3k2"].fetcher.close()


@pytest.fixture
def client(tmp_path: Any) -> Iterator[Any]:
    yield from _client(tmp_path)


def _config(base: str, **changes: Any) -> dict[str, Any]:
    return {
        "authorization_endpoint": f"{base}/authorize",
        "token_endpoint": f"{base}/token",
        "code_challenge_methods_supported": ["S256"],
        "capabilities": ["launch-ehr", "permission-v2"],
        **changes,
    }


def _token(**changes: Any) -> dict[str, Any]:
    return {
        "access_token": "a-token",
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": SCOPE,
        "patient": "p1",
        **changes,
    }


def _launch(client: Any, ehr: str, name: str, token: Any, config: dict[str, Any] | None = None) -> Any:
    """Launch from ``{ehr}/{name}``, then call back with a code the token endpoint answers ``token`` to."""
    CONFIGS[name] = config or _config(f"{ehr}/{name}")
    TOKENS[name] = token
    started = client.get("/smart/launch", query_string={"iss": f"{ehr}/{name}", "launch": "L"})
    assert started.status_code == 302, started.get_data(as_text=True)
    state = parse_qs(urlsplit(started.headers["Location"]).query)["state"][0]
    return client.get("/smart/callback", query_string={"code": "C", "state": state})


def _page(answer: Any, status: int, title: str) -> None:
    text = html.unescape(answer.get_data(as_text=True))
    assert answer.status_code == status, text
    assert title in text and 'id="error-title"' in text


def test_a_good_launch_still_opens_the_app(client: Any, ehr: str) -> None:
    done = _launch(client, ehr, "good", _token(appContext='{"rule":"vitd-deficient"}'))
    assert done.status_code == 303
    page = client.get("/smart/", headers={"X-D3K2-Today": "2026-11-24"})
    assert page.status_code == 200 and 'id="focused-rule"' in page.get_data(as_text=True)


@pytest.mark.parametrize("methods", [None, "S256", [], ["plain"]])
def test_a_server_that_does_not_list_pkce_s256_is_refused(client: Any, ehr: str, methods: Any) -> None:
    """SMART App Launch 2 requires code_challenge_methods_supported with S256; without it the server may
    ignore the challenge. Before: a missing list (or a string) launched anyway."""
    config = _config(f"{ehr}/nopkce")
    if methods is None:
        del config["code_challenge_methods_supported"]
    else:
        config["code_challenge_methods_supported"] = methods
    CONFIGS["nopkce"] = config
    answer = client.get("/smart/launch", query_string={"iss": f"{ehr}/nopkce", "launch": "L"})
    _page(answer, 502, "does not support PKCE S256")
    assert "Location" not in answer.headers


def test_a_token_endpoint_off_the_allow_list_gets_nothing(tmp_path: Any, ehr: str) -> None:
    """d3k2 posts the code and the PKCE verifier to the token endpoint itself: an allowed FHIR server's
    configuration must not send that request to any other local port or host. Before: launched."""
    for client in _client(tmp_path, fhir_allowed=(ehr,)):
        CONFIGS["elsewhere"] = _config(f"{ehr}/elsewhere", token_endpoint="http://127.0.0.1:9/token")
        answer = client.get("/smart/launch", query_string={"iss": f"{ehr}/elsewhere", "launch": "L"})
        _page(answer, 502, "The token endpoint is not allowed")
        assert "Location" not in answer.headers
        # The same server with its own token endpoint launches.
        assert _launch(client, ehr, "own", _token()).status_code == 303


def test_proxy_variables_do_not_reroute_the_app(
    client: Any, ehr: str, proxy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like the fetcher, the configuration and token requests take nothing from the environment (a proxy
    would see the code and the verifier). Before: both went through HTTP_PROXY."""
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy)
    monkeypatch.setenv("http_proxy", proxy)
    SEEN.clear()
    assert _launch(client, ehr, "proxied", _token()).status_code == 303
    assert SEEN == []


def _drip(body: bytes, pause: float = 0.3, lead: int = 20) -> Callable[[], Response]:
    """An answer that sends ``lead`` spaces (valid JSON whitespace) one by one, then ``body``."""

    def answer() -> Response:
        def chunks() -> Iterator[bytes]:
            for _ in range(lead):
                yield b" "
                time.sleep(pause)
            yield body

        return Response(chunks(), mimetype="application/json")

    return answer


def test_a_dripping_configuration_is_cut_at_the_budget(tmp_path: Any, ehr: str) -> None:
    """Each byte within the read timeout, the whole far beyond the budget: the sync worker is not held.
    Before: the launch waited for the last byte and went on."""
    for client in _client(tmp_path, fhir_timeout=1.0, fhir_budget=1.0):
        CONFIGS["drip"] = _drip(json.dumps(_config(f"{ehr}/drip")).encode())
        answer = client.get("/smart/launch", query_string={"iss": f"{ehr}/drip", "launch": "L"})
        _page(answer, 502, "could not be reached")
        assert "did not arrive within 1 s" in answer.get_data(as_text=True)


def test_a_dripping_token_response_is_cut_at_the_budget(tmp_path: Any, ehr: str) -> None:
    # The read timeout far above the 0.3 s between bytes: a drip thread stalled on a loaded machine must not
    # end the read by its timeout (another message) before the budget does.
    for client in _client(tmp_path, fhir_timeout=5.0, fhir_budget=1.5):
        answer = _launch(client, ehr, "tokendrip", _drip(json.dumps(_token()).encode()))
        _page(answer, 502, "The authorization server could not be reached")
        assert "did not arrive within 1.5 s" in answer.get_data(as_text=True)


def test_a_huge_token_response_is_not_read(client: Any, ehr: str) -> None:
    """Before: any size was read into memory."""
    answer = _launch(client, ehr, "huge", _token(padding="x" * 200_000))
    _page(answer, 502, "The authorization server's answer is too large")


def test_a_token_response_that_is_not_json(client: Any, ehr: str) -> None:
    """Before: "could not be reached (JSONDecodeError)", about a server that answered."""
    answer = _launch(client, ehr, "html", Response("<html>", mimetype="text/html"))
    _page(answer, 502, "The authorization server's answer is not JSON")


def test_a_token_too_large_for_a_cookie_is_a_clear_page(client: Any, ehr: str) -> None:
    """A browser drops a cookie over 4 KiB without a word: the app would say "no session" after a launch
    that worked. Before: a 14 KB cookie was set."""
    answer = _launch(client, ehr, "bigtoken", _token(access_token="t" * 5000))
    _page(answer, 502, "The access token is too large for this app")
    # A token of a usual size (a 2 KB JWT) fits.
    assert _launch(client, ehr, "jwt", _token(access_token="j" * 2000)).status_code == 303


def test_a_large_app_context_keeps_only_the_rule(client: Any, ehr: str) -> None:
    """The EHR's appContext may be of any size; the session keeps the rule it names. Before: all of it
    went into the cookie."""
    context = json.dumps({"rule": "vitd-deficient", "extra": "x" * 8000})
    done = _launch(client, ehr, "bigcontext", _token(appContext=context))
    assert done.status_code == 303
    assert len(done.headers["Set-Cookie"]) < 4000
    page = client.get("/smart/", headers={"X-D3K2-Today": "2026-11-24"})
    assert page.status_code == 200 and 'id="focused-rule"' in page.get_data(as_text=True)


@pytest.mark.parametrize(
    ("changes", "title"),
    [
        ({"patient": "p1&_id=p2"}, "invalid patient"),
        ({"patient": "../Patient/p2"}, "invalid patient"),
        ({"patient": "p" * 65}, "invalid patient"),
        ({"access_token": 12345}, "token is not usable"),
        ({"access_token": {"a": 1}}, "token is not usable"),
        ({"access_token": "a b"}, "token is not usable"),
        ({"access_token": "ab\r\nX-Injected: 1"}, "token is not usable"),
        ({"access_token": "caf\u00e9\u20ac"}, "token is not usable"),
    ],
)
def test_a_token_response_with_an_unusable_patient_or_token(
    client: Any, ehr: str, changes: dict[str, Any], title: str
) -> None:
    """The patient id goes into every query, the token into a header: checked where they arrive, with a
    page that names the authorization server. Before: a session was opened and the app page said the FHIR
    server "did not give what the rules need"."""
    answer = _launch(client, ehr, "shapes", _token(**changes))
    _page(answer, 502, title)
    assert client.get("/smart/").status_code == 401


def test_a_short_cookie_secret_is_refused() -> None:
    """The cookie is sealed with a key derived from D3K2_SMART_SECRET by one SHA-256: a short secret can be
    guessed offline from one cookie, and a forged launch cookie names the token endpoint the callback posts
    the code to. Before: any length, "x" included, was accepted in production."""
    from d3k2.config import ConfigError, from_env

    env = {
        "D3K2_ENV": "production",
        "D3K2_PUBLIC_BASE_URL": "https://cds.example.org",
        "D3K2_SMART_APP_URL": "https://cds.example.org/smart",
    }
    with pytest.raises(ConfigError, match="D3K2_SMART_SECRET must be at least 32") as caught:
        from_env({**env, "D3K2_SMART_SECRET": "hunter2"})
    assert "hunter2" not in str(caught.value)
    assert from_env({**env, "D3K2_SMART_SECRET": "s" * 32}).smart_secret == "s" * 32


def test_a_token_for_another_patient_than_the_cards_is_refused(client: Any, ehr: str) -> None:
    """The card's appContext names its patient; a token response for another patient (the EHR's context
    moved on, a mix-up) must not show that patient's record under this card. Before: it did."""
    context = json.dumps({"rule": "vitd-deficient", "patient": "p1"})
    answer = _launch(client, ehr, "other", _token(patient="p2", appContext=context))
    _page(answer, 409, "opened for another patient than the card")
    assert client.get("/smart/").status_code == 401
    # The card's own patient opens the app; so does a launch whose appContext names no patient.
    assert _launch(client, ehr, "same", _token(patient="p1", appContext=context)).status_code == 303
    assert _launch(client, ehr, "bare", _token(appContext='{"rule":"vitd-deficient"}')).status_code == 303


def _lab(oid: str, code: str, value: float, unit: str, day: str = "2026-10-01") -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": day,
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
    }


@pytest.mark.parametrize(
    "record",
    [
        [_lab("v", "1989-3", 1e308, "ng/mL")],
        [_lab("c", "17861-6", 1e308, "mmol/L")],  # ×4.008: infinite in mg/dL
        [_lab("e", "33914-3", 1e308, "mL/min/{1.73_m2}")],
    ],
)
def test_a_result_no_body_can_have_is_listed_not_drawn(client: Any, ehr: str, record: list[Any]) -> None:
    """The facts do not use a value outside what a body can have; the chart drew it, and 1e308 overflowed
    the chart's scale. Before: 500."""
    RECORDS["absurd"] = [*record, _lab("ok", "1989-3", 19, "ng/mL", "2025-10-01")]
    assert _launch(client, ehr, "absurd", _token()).status_code == 303
    page = client.get("/smart/", headers={"X-D3K2-Today": "2026-11-24"})
    text = page.get_data(as_text=True)
    assert page.status_code == 200, text
    assert "not used: no body can have it" in text and "1e+308" in text
    assert "<title>19 ng/mL on 2025-10-01</title>" in text  # the usable result is still drawn


def test_sealed_cookies_are_bound_to_their_phase_and_their_time(client: Any) -> None:
    """Replay guards that held when attacked (no fix needed; kept so they stay): a launch cookie is no
    session, a session past its exp is none, and a session cookie is no launch for the callback."""
    smart = client.application.extensions["d3k2.smart"]
    now = time.time()
    session = {"phase": "session", "iss": "http://127.0.0.1:9/f", "token": "t", "patient": "p1", "scope": ""}
    for value in (
        smart.seal({**session, "phase": "launch", "exp": now + 60}),
        smart.seal({**session, "exp": now - 1}),
    ):
        client.set_cookie("d3k2_smart", value, path="/smart")
        assert client.get("/smart/").status_code == 401
    client.set_cookie("d3k2_smart", smart.seal({**session, "exp": now + 60}), path="/smart")
    assert client.get("/smart/callback?code=a&state=b").status_code == 400
