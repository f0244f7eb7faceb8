"""JWT verification: the recorded sandbox tokens, each rejection reason, trust configuration, JWKS caching
and the shared jti store. Every check runs at a fixed "now" (jwt_keys.NOW or the token's own iat)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from flask import Flask
from flask.testing import FlaskClient

from d3k2.config import ConfigError, Settings, from_env
from d3k2.core.errors import Unauthorized
from d3k2.core.loader import load_ruleset
from d3k2.core.ruleset import RuleSet
from d3k2.http.app import create_app
from d3k2.http.auth import (
    Authenticator,
    Issuer,
    JwksCache,
    KeysUnavailable,
    Verifier,
    fetch_jwks,
    load_trust,
    parse_jwks,
)
from d3k2.http.jti import JtiStore
from jwt_keys import (
    BASE_URL,
    ISSUER,
    JKU,
    NOW,
    SANDBOX_DIR,
    SANDBOX_ISSUER,
    SANDBOX_JKU,
    SigningKey,
    default_claims,
    es384,
    jwks,
    rs384,
    sandbox_tokens,
)

DISCOVERY = f"{BASE_URL}/cds-services"


@pytest.fixture(scope="module")
def ruleset() -> RuleSet:
    return load_ruleset(Settings().cards_dir)


def write_trust(directory: Path, issuers: Mapping[str, Any]) -> Path:
    path = directory / "trust.json"
    path.write_text(json.dumps({"issuers": issuers}))
    return path


def trust_file(tmp_path: Path) -> Path:
    """The EHR test issuer (ES384 + RS384 keys inline) and the sandbox (its published key, as a file)."""
    return write_trust(
        tmp_path,
        {
            ISSUER: {"jwks": jwks(es384(), rs384()), "jku_allow": [JKU]},
            SANDBOX_ISSUER: {"jwks_file": str(SANDBOX_DIR / "jwks.json"), "jku_allow": [SANDBOX_JKU]},
        },
    )


def make_app(
    ruleset: RuleSet, tmp_path: Path, mode: str = "required", now: float = NOW, **changes: Any
) -> Flask:
    settings = Settings(
        env="test",
        data_dir=tmp_path,
        auth=mode,
        trust_file=trust_file(tmp_path),
        public_base_url=BASE_URL,
        jti_db=tmp_path / "jti.sqlite3",
        **changes,
    )
    app = create_app(settings, ruleset)
    app.extensions["d3k2.http.auth"].clock = lambda: now
    return app


@pytest.fixture
def client(ruleset: RuleSet, tmp_path: Path) -> FlaskClient:
    return make_app(ruleset, tmp_path).test_client()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def verifier(tmp_path: Path, issuers: Mapping[str, Issuer] | None = None, fetch: Any = None) -> Verifier:
    trusted = dict(issuers) if issuers is not None else load_trust(trust_file(tmp_path))
    return Verifier(trusted, JwksCache(300.0, fetch or fail_fetch), JtiStore(tmp_path / "jti.sqlite3"))


def fail_fetch(url: str) -> Mapping[str, Any]:
    raise OSError("offline")


def assert_401(response: Any, reason: str) -> None:
    assert response.status_code == 401, response.get_data(as_text=True)
    assert response.json["error"] == "unauthorized"
    assert reason in response.json["detail"]
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="d3k2", error="invalid_token", error_description="')


# ---------------------------------------------------------------- the recorded sandbox tokens


def test_all_recorded_sandbox_tokens_verify(tmp_path: Path) -> None:
    recorded = sandbox_tokens()
    assert len(recorded) == 25
    check = verifier(tmp_path)
    for item in recorded:
        claims = check.verify(item["token"], BASE_URL + item["path"], now=item["claims"]["iat"] + 1)
        assert claims == item["claims"]


def test_sandbox_token_through_http_with_public_base_url(ruleset: RuleSet, tmp_path: Path) -> None:
    item = next(t for t in sandbox_tokens() if t["path"] == "/cds-services")
    app = make_app(ruleset, tmp_path, now=item["claims"]["iat"] + 1)
    response = app.test_client().get("/cds-services", headers=bearer(item["token"]))
    assert response.status_code == 200
    assert response.json["services"]


def test_sandbox_feedback_token_through_http(ruleset: RuleSet, tmp_path: Path) -> None:
    item = next(t for t in sandbox_tokens() if t["path"].endswith("/feedback"))
    body = (SANDBOX_DIR / "raw" / "0006-POST-cds-services_d3k2-patient-view_feedback.json").read_bytes()
    app = make_app(ruleset, tmp_path, now=item["claims"]["iat"] + 1)
    headers = {**bearer(item["token"]), "Content-Type": "application/json"}
    response = app.test_client().post(item["path"], data=body, headers=headers)
    assert response.status_code == 200, response.json


def test_sandbox_token_is_one_shot(tmp_path: Path) -> None:
    item = sandbox_tokens()[0]
    check = verifier(tmp_path)
    check.verify(item["token"], BASE_URL + item["path"], now=item["claims"]["iat"] + 1)
    with pytest.raises(Unauthorized, match="replayed"):
        check.verify(item["token"], BASE_URL + item["path"], now=item["claims"]["iat"] + 2)


def test_sandbox_token_expires_after_its_five_minutes(tmp_path: Path) -> None:
    item = sandbox_tokens()[0]
    with pytest.raises(Unauthorized, match="expired"):
        verifier(tmp_path).verify(item["token"], BASE_URL + item["path"], now=item["claims"]["exp"] + 61)


# ---------------------------------------------------------------- accepted tokens


@pytest.mark.parametrize("key", [es384(), rs384()], ids=["ES384", "RS384"])
def test_valid_token_is_accepted(client: FlaskClient, key: SigningKey) -> None:
    response = client.get("/cds-services", headers=bearer(key.sign()))
    assert response.status_code == 200
    assert "services" in response.json


def test_aud_is_the_endpoint_called(client: FlaskClient) -> None:
    token = es384().sign(aud=f"{BASE_URL}/cds-services/d3k2-patient-view/feedback")
    feedback = {"feedback": [{"card": "c1", "outcome": "overridden"}]}
    response = client.post("/cds-services/d3k2-patient-view/feedback", json=feedback, headers=bearer(token))
    assert response.status_code == 200
    response = client.get("/cds-services", headers=bearer(es384().sign(aud=f"{BASE_URL}/cds-services/x")))
    assert_401(response, "aud is not the URL called (http://127.0.0.1:8095/cds-services)")


def test_aud_without_public_base_url_is_the_request_url(ruleset: RuleSet, tmp_path: Path) -> None:
    app = make_app(ruleset, tmp_path)
    app.extensions["d3k2.http.auth"].public_base_url = None
    client = app.test_client()
    ok = client.get("/cds-services", base_url=BASE_URL, headers=bearer(es384().sign()))
    assert ok.status_code == 200
    elsewhere = client.get("/cds-services", base_url="https://proxy.test", headers=bearer(es384().sign()))
    assert_401(elsewhere, "aud is not the URL called (https://proxy.test/cds-services)")


def test_token_with_allowed_jku_and_configured_key(client: FlaskClient) -> None:
    response = client.get("/cds-services", headers=bearer(es384().sign(headers={"jku": JKU})))
    assert response.status_code == 200


# ---------------------------------------------------------------- rejected tokens


def _hs384() -> str:
    return jwt.encode(default_claims(), "k" * 64, algorithm="HS384", headers={"kid": es384().kid})


def _none() -> str:
    return jwt.encode(default_claims(), None, algorithm="none", headers={"kid": es384().kid})


def _other_key_same_kid() -> str:
    return SigningKey(es384().kid, "ES384", rs384().private).sign(alg="RS384")


def _forged() -> str:
    return SigningKey(es384().kid, "ES384", es384("attacker").private).sign()


def _tampered() -> str:
    header, payload, signature = es384().sign().split(".")
    claims = json.loads(jwt.utils.base64url_decode(payload))
    claims["iss"] = ISSUER  # same value, re-encoded differently: the signed bytes change
    forged = jwt.utils.base64url_encode(json.dumps(claims, indent=1).encode()).decode()
    return f"{header}.{forged}.{signature}"


def _ps384() -> str:
    return rs384().sign(alg="PS384")


def _rs256() -> str:
    return rs384().sign(alg="RS256")


REJECTED: dict[str, tuple[Callable[[], str], str]] = {
    "wrong-alg-RS256": (_rs256, "algorithm is not accepted"),
    "wrong-alg-PS384": (_ps384, "algorithm is not accepted"),
    "HS384": (_hs384, "algorithm is not accepted"),
    "none": (_none, "algorithm is not accepted"),
    "alg-does-not-fit-key": (_other_key_same_kid, "does not fit the key"),
    "bad-signature": (_forged, "signature does not verify"),
    "tampered-claims": (_tampered, "signature does not verify"),
    "wrong-aud": (lambda: es384().sign(aud="https://other.test/cds-services"), "aud is not the URL called"),
    "aud-list-without-us": (lambda: es384().sign(aud=["https://other.test"]), "aud is not the URL called"),
    "expired": (lambda: es384().sign(iat=NOW - 500, exp=NOW - 200), "expired"),
    "future-iat": (lambda: es384().sign(iat=NOW + 300, exp=NOW + 600), "iat is in the future"),
    "too-long-lived": (lambda: es384().sign(exp=NOW + 7200), "lifetime"),
    "not-yet-valid": (lambda: es384().sign(nbf=NOW + 600), "not valid yet"),
    "no-exp": (lambda: es384().sign(exp=None), "no exp claim"),
    "no-iat": (lambda: es384().sign(iat=None), "no iat claim"),
    "no-jti": (lambda: es384().sign(jti=None), "no jti claim"),
    "exp-not-a-number": (lambda: es384().sign(exp="soon"), "exp"),
    "untrusted-iss": (lambda: es384().sign(iss="https://evil.test"), "issuer is not trusted"),
    "no-iss": (lambda: es384().sign(iss=None), "issuer is not trusted"),
    "jku-off-allow-list": (
        lambda: es384().sign(headers={"jku": "https://evil.test/jwks.json"}),
        "jku is not on the issuer's allow-list",
    ),
    "sandbox-jku-for-other-issuer": (
        lambda: es384().sign(headers={"jku": SANDBOX_JKU}),
        "jku is not on the issuer's allow-list",
    ),
    "unknown-kid": (lambda: es384("unknown").sign(), "no key of the issuer has the token's kid"),
    "no-kid": (lambda: jwt.encode(default_claims(), es384().private, algorithm="ES384"), "no kid"),
    "not-a-jwt": (lambda: "not.a.jwt", "not a well-formed JWT"),
}


@pytest.mark.parametrize("case", list(REJECTED))
def test_rejected_token_is_401(client: FlaskClient, case: str) -> None:
    make, reason = REJECTED[case]
    token = make()
    response = client.get("/cds-services", headers=bearer(token))
    assert_401(response, reason)
    assert token not in response.get_data(as_text=True)
    assert token not in response.headers["WWW-Authenticate"]


def test_replayed_jti_is_401(client: FlaskClient) -> None:
    token = es384().sign()
    assert client.get("/cds-services", headers=bearer(token)).status_code == 200
    assert_401(client.get("/cds-services", headers=bearer(token)), "jti replayed")
    fresh = es384().sign()
    assert client.get("/cds-services", headers=bearer(fresh)).status_code == 200


def test_same_jti_from_two_issuers_is_no_replay(tmp_path: Path) -> None:
    check = verifier(
        tmp_path,
        {
            ISSUER: Issuer(ISSUER, parse_jwks(jwks(es384()), "t")),
            "https://b.test": Issuer("https://b.test", parse_jwks(jwks(es384()), "t")),
        },
    )
    check.verify(es384().sign(jti="same"), DISCOVERY, NOW)
    check.verify(es384().sign(jti="same", iss="https://b.test"), DISCOVERY, NOW)


def test_rejection_in_optional_mode_is_still_401(ruleset: RuleSet, tmp_path: Path) -> None:
    client = make_app(ruleset, tmp_path, mode="optional").test_client()
    assert_401(client.get("/cds-services", headers=bearer(_forged())), "signature")


@pytest.mark.parametrize("header", ["Basic dXNlcjpwdw==", "Bearer", "Bearer   ", "token-without-scheme"])
def test_not_a_bearer_header_is_401(client: FlaskClient, header: str) -> None:
    assert_401(client.get("/cds-services", headers={"Authorization": header}), "Bearer <JWT>")


# ---------------------------------------------------------------- modes and unauthenticated paths


def test_missing_token_required_is_401_with_a_bare_challenge(client: FlaskClient) -> None:
    response = client.get("/cds-services")
    assert response.status_code == 401
    assert response.json == {
        "error": "unauthorized",
        "detail": "a bearer token (JWT) is required in the Authorization header",
    }
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="d3k2"'
    assert response.headers["Content-Type"] == "application/json"


def test_missing_token_optional_is_a_warning(
    ruleset: RuleSet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_app(ruleset, tmp_path, mode="optional").test_client()
    with caplog.at_level(logging.WARNING, logger="d3k2.http.auth"):
        assert client.get("/cds-services").status_code == 200
    assert "without a bearer token" in caplog.text


def test_auth_off_ignores_tokens(ruleset: RuleSet, tmp_path: Path) -> None:
    client = make_app(ruleset, tmp_path, mode="off").test_client()
    assert client.get("/cds-services").status_code == 200
    assert client.get("/cds-services", headers=bearer("garbage")).status_code == 200
    assert not (tmp_path / "jti.sqlite3").exists()


@pytest.mark.parametrize("path", ["/cds-services", "/cds-services/d3k2-patient-view"])
def test_preflight_is_not_authenticated(client: FlaskClient, path: str) -> None:
    response = client.options(
        path,
        headers={
            "Origin": "http://127.0.0.1:8000",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert response.status_code == 200
    assert "authorization" in response.headers["Access-Control-Allow-Headers"]


def test_health_is_not_authenticated(client: FlaskClient) -> None:
    assert client.get("/healthz").status_code == 200


def test_every_cds_route_is_authenticated(client: FlaskClient) -> None:
    for path in ("/cds-services/d3k2-patient-view", "/cds-services/d3k2-patient-view/feedback"):
        assert client.post(path, json={}).status_code == 401
    assert client.get("/cds-services/unknown").status_code == 401


# ---------------------------------------------------------------- the dev profile (sandbox via its jku)


def dev_app(ruleset: RuleSet, tmp_path: Path, mode: str, fetch: Any) -> Flask:
    settings = Settings(env="dev", auth=mode, data_dir=tmp_path, public_base_url=BASE_URL)
    app = create_app(settings, ruleset)
    auth = Authenticator.from_settings(settings, fetch=fetch)
    auth.clock = lambda: NOW
    app.extensions["d3k2.http.auth"].verifier = auth.verifier
    app.extensions["d3k2.http.auth"].clock = auth.clock
    return app


def test_dev_profile_trusts_the_sandbox_keys_from_its_jku(ruleset: RuleSet, tmp_path: Path) -> None:
    published = json.loads((SANDBOX_DIR / "jwks.json").read_text())
    asked: list[str] = []

    def fetch(url: str) -> Mapping[str, Any]:
        asked.append(url)
        return published

    item = sandbox_tokens()[0]
    app = dev_app(ruleset, tmp_path, "required", fetch)
    app.extensions["d3k2.http.auth"].clock = lambda: item["claims"]["iat"] + 1
    response = app.test_client().get(item["path"], headers=bearer(item["token"]))
    assert response.status_code == 200
    assert asked == [SANDBOX_JKU]


def test_dev_profile_offline_optional_warns(
    ruleset: RuleSet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    item = sandbox_tokens()[0]
    app = dev_app(ruleset, tmp_path, "optional", fail_fetch)
    app.extensions["d3k2.http.auth"].clock = lambda: item["claims"]["iat"] + 1
    with caplog.at_level(logging.WARNING, logger="d3k2"):
        response = app.test_client().get(item["path"], headers=bearer(item["token"]))
    assert response.status_code == 200
    assert "could not be fetched" in caplog.text


def test_dev_profile_offline_required_is_401(ruleset: RuleSet, tmp_path: Path) -> None:
    item = sandbox_tokens()[0]
    app = dev_app(ruleset, tmp_path, "required", fail_fetch)
    app.extensions["d3k2.http.auth"].clock = lambda: item["claims"]["iat"] + 1
    response = app.test_client().get(item["path"], headers=bearer(item["token"]))
    assert_401(response, "could not be fetched")


def test_the_sandbox_is_not_trusted_outside_dev(tmp_path: Path) -> None:
    auth = Authenticator.from_settings(
        Settings(env="production", trust_file=trust_without_sandbox(tmp_path), jti_db=tmp_path / "j.db")
    )
    item = sandbox_tokens()[0]
    with pytest.raises(Unauthorized, match="issuer is not trusted"):
        auth.verifier.verify(item["token"], BASE_URL + item["path"], item["claims"]["iat"] + 1)


def trust_without_sandbox(tmp_path: Path) -> Path:
    return write_trust(tmp_path, {ISSUER: {"jwks": jwks(es384())}})


# ---------------------------------------------------------------- JWKS URLs and the cache


def test_jwks_url_is_cached_for_its_ttl(tmp_path: Path) -> None:
    asked: list[str] = []

    def fetch(url: str) -> Mapping[str, Any]:
        asked.append(url)
        return jwks(es384(), rs384())

    issuer = Issuer(ISSUER, jwks_url="https://ehr.test/keys")
    check = Verifier({ISSUER: issuer}, JwksCache(300.0, fetch), JtiStore(tmp_path / "jti.sqlite3"))
    check.verify(es384().sign(), DISCOVERY, NOW)
    check.verify(rs384().sign(), DISCOVERY, NOW + 299)
    assert asked == ["https://ehr.test/keys"]
    check.verify(es384().sign(iat=NOW + 290, exp=NOW + 500), DISCOVERY, NOW + 301)
    assert len(asked) == 2


def test_unknown_kid_refreshes_at_most_once_a_minute(tmp_path: Path) -> None:
    served = [jwks(es384())]
    asked: list[str] = []

    def fetch(url: str) -> Mapping[str, Any]:
        asked.append(url)
        return served[-1]

    check = Verifier(
        {ISSUER: Issuer(ISSUER, jwks_url="https://ehr.test/keys")},
        JwksCache(3600.0, fetch),
        JtiStore(tmp_path / "jti.sqlite3"),
    )
    check.verify(es384().sign(), DISCOVERY, NOW)
    served.append(jwks(es384(), rs384()))  # the EHR rotates in a new key
    with pytest.raises(Unauthorized, match="kid"):
        check.verify(rs384().sign(), DISCOVERY, NOW + 10)
    assert len(asked) == 1
    check.verify(rs384().sign(), DISCOVERY, NOW + 61)
    assert len(asked) == 2
    for _ in range(3):
        with pytest.raises(Unauthorized, match="kid"):
            check.verify(es384("random").sign(), DISCOVERY, NOW + 70)
    assert len(asked) == 2


def test_failed_fetch_serves_stale_keys_and_backs_off(tmp_path: Path) -> None:
    calls: list[str] = []
    online = [True]

    def fetch(url: str) -> Mapping[str, Any]:
        calls.append(url)
        if not online[0]:
            raise OSError("down")
        return jwks(es384())

    cache = JwksCache(100.0, fetch)
    assert "es384-test" in cache.keys("https://k.test", NOW)
    online[0] = False
    assert "es384-test" in cache.keys("https://k.test", NOW + 200)
    assert "es384-test" in cache.keys("https://k.test", NOW + 210)
    assert len(calls) == 2
    with pytest.raises(KeysUnavailable):
        JwksCache(100.0, fetch).keys("https://k.test", NOW)


Routes = dict[str, tuple[int, dict[str, str], bytes]]


@dataclass
class JwksServer:
    base: str
    routes: Routes
    seen: list[str]


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    """A loopback HTTP server answering each path from ``routes`` (status, headers, body)."""
    routes: Routes = {}
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            status, headers, body = routes.get(self.path, (404, {}, b""))
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield JwksServer(f"http://127.0.0.1:{server.server_address[1]}", routes, seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_fetch_jwks_over_http(jwks_server: JwksServer) -> None:
    base, routes = jwks_server.base, jwks_server.routes
    routes["/jwks.json"] = (200, {"Content-Type": "application/json"}, json.dumps(jwks(es384())).encode())
    assert fetch_jwks(f"{base}/jwks.json")["keys"][0]["kid"] == "es384-test"


def test_fetch_jwks_does_not_follow_redirects(jwks_server: JwksServer) -> None:
    base, routes, seen = jwks_server.base, jwks_server.routes, jwks_server.seen
    routes["/jwks.json"] = (302, {"Location": f"{base}/elsewhere.json"}, b"")
    routes["/elsewhere.json"] = (200, {}, json.dumps(jwks(es384())).encode())
    with pytest.raises(OSError, match="HTTP 302"):
        fetch_jwks(f"{base}/jwks.json")
    assert seen == ["/jwks.json"]


def test_fetch_jwks_is_bounded(jwks_server: JwksServer) -> None:
    base, routes = jwks_server.base, jwks_server.routes
    routes["/big.json"] = (200, {}, b'{"keys": [' + b" " * 300_000 + b"]}")
    with pytest.raises(OSError, match="larger than"):
        fetch_jwks(f"{base}/big.json")


def test_token_verified_with_keys_from_a_jwks_url(jwks_server: JwksServer, tmp_path: Path) -> None:
    base, routes, seen = jwks_server.base, jwks_server.routes, jwks_server.seen
    routes["/jwks.json"] = (200, {}, json.dumps(jwks(rs384())).encode())
    trust = write_trust(tmp_path, {ISSUER: {"jwks_url": f"{base}/jwks.json"}})
    check = Verifier(load_trust(trust), JwksCache(300.0), JtiStore(tmp_path / "jti.sqlite3"))
    assert check.verify(rs384().sign(), DISCOVERY, NOW)["iss"] == ISSUER
    assert seen == ["/jwks.json"]


# ---------------------------------------------------------------- the jti store


def test_jti_store_is_shared_by_processes_using_the_same_file(tmp_path: Path) -> None:
    first, second = JtiStore(tmp_path / "d" / "jti.sqlite3"), JtiStore(tmp_path / "d" / "jti.sqlite3")
    assert first.claim(ISSUER, "j1", NOW + 300, NOW)
    assert not second.claim(ISSUER, "j1", NOW + 300, NOW + 1)
    assert second.claim(ISSUER, "j2", NOW + 300, NOW + 1)


def test_jti_store_forgets_expired_entries(tmp_path: Path) -> None:
    store = JtiStore(tmp_path / "jti.sqlite3")
    assert store.claim(ISSUER, "j1", NOW + 300, NOW)
    assert store.claim(ISSUER, "j1", NOW + 700, NOW + 400)


# ---------------------------------------------------------------- trust configuration


def test_trust_file_in_toml(tmp_path: Path) -> None:
    (tmp_path / "ehr.jwks.json").write_text(json.dumps(jwks(es384())))
    path = tmp_path / "trust.toml"
    path.write_text(
        f'[issuers."{ISSUER}"]\njwks_file = "ehr.jwks.json"\njku_allow = ["{JKU}"]\n\n'
        '[issuers."https://other.test"]\njwks_url = "https://other.test/.well-known/jwks.json"\n'
    )
    issuers = load_trust(path)
    assert set(issuers[ISSUER].keys) == {"es384-test"}
    assert issuers[ISSUER].jku_allow == {JKU}
    assert issuers["https://other.test"].jwks_url == "https://other.test/.well-known/jwks.json"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"issuers": {ISSUER: {}}}, "has no keys"),
        ({"issuers": {ISSUER: {"jwks_url": "http://ehr.test/jwks"}}}, "https URL"),
        ({"issuers": {ISSUER: {"jku_allow": "https://ehr.test/jwks"}}}, "list of URLs"),
        ({"issuers": {ISSUER: {"jwks": {"keys": []}, "keys_url": "x"}}}, "unknown fields"),
        ({"issuers": {ISSUER: {"jwks": {"nokeys": 1}}}}, "'keys' list"),
        ({"issuers": {ISSUER: {"jwks_file": "missing.json"}}}, "missing.json"),
        ({"trusted": {}}, "'issuers' table"),
    ],
)
def test_trust_file_errors_name_the_problem(tmp_path: Path, content: Any, message: str) -> None:
    path = tmp_path / "trust.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=message):
        load_trust(path)


def test_required_without_trusted_issuers_fails_at_startup(ruleset: RuleSet, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="D3K2_TRUST_FILE"):
        create_app(Settings(env="production", data_dir=tmp_path, public_base_url=BASE_URL), ruleset)


@pytest.mark.parametrize(
    ("env", "mode"),
    [
        ({}, "optional"),
        ({"D3K2_ENV": "production", "D3K2_PUBLIC_BASE_URL": BASE_URL}, "required"),
        ({"D3K2_ENV": "production", "D3K2_TRUST_HOST_HEADER": "1", "D3K2_AUTH": "off"}, "off"),
        ({"D3K2_ENV": "dev", "D3K2_AUTH": "required"}, "required"),
    ],
)
def test_auth_mode_from_environment(env: dict[str, str], mode: str) -> None:
    assert from_env(env).auth_mode == mode


def test_auth_settings_from_environment() -> None:
    settings = from_env(
        {
            "D3K2_TRUST_FILE": "/etc/d3k2/trust.toml",
            "D3K2_PUBLIC_BASE_URL": "https://cds.example.org/d3k2/",
            "D3K2_DATA_DIR": "/var/lib/d3k2",
        }
    )
    assert settings.trust_file == Path("/etc/d3k2/trust.toml")
    assert settings.public_base_url == "https://cds.example.org/d3k2"
    assert settings.jti_path == Path("/var/lib/d3k2/jti.sqlite3")
    assert from_env({"D3K2_JTI_DB": "/tmp/j.db"}).jti_path == Path("/tmp/j.db")


@pytest.mark.parametrize(
    ("name", "value"), [("D3K2_AUTH", "maybe"), ("D3K2_PUBLIC_BASE_URL", "cds.example.org")]
)
def test_bad_auth_settings_are_refused(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        from_env({name: value})
