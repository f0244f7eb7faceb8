"""docker/trust/cds-sandbox.toml, the ready trust file for the public CDS Hooks sandbox: the recorded
sandbox tokens pass it (signature, issuer, jku, at the recording time) with no key fetched; altered ones
fail."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from builders import REPO, close
from d3k2.config import Settings
from d3k2.core.errors import Unauthorized
from d3k2.core.loader import load_ruleset
from d3k2.http.app import create_app
from d3k2.http.auth import JwksCache, Verifier, load_trust, parse_jwks
from d3k2.http.jti import JtiStore
from jwt_keys import BASE_URL, SANDBOX_DIR, SANDBOX_ISSUER, SANDBOX_JKU, sandbox_tokens

TRUST_FILE = REPO / "docker" / "trust" / "cds-sandbox.toml"
KID = "44823f3d-0b01-4a6c-a80e-b9d3e8a7226f"


def no_fetch(url: str) -> Mapping[str, Any]:
    raise AssertionError(f"the trust file holds the key: nothing may be fetched ({url})")


def verifier(tmp_path: Path) -> Verifier:
    return Verifier(load_trust(TRUST_FILE), JwksCache(300.0, no_fetch), JtiStore(tmp_path / "jti.sqlite3"))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_the_trust_file_names_the_sandbox_issuer_its_jku_and_its_published_key() -> None:
    issuers = load_trust(TRUST_FILE)
    assert set(issuers) == {SANDBOX_ISSUER}
    sandbox = issuers[SANDBOX_ISSUER]
    assert sandbox.jku_allow == frozenset({SANDBOX_JKU})
    assert sandbox.jwks_url is None
    published = parse_jwks(json.loads((SANDBOX_DIR / "jwks.json").read_text()), "recorded jwks.json")
    assert set(sandbox.keys) == set(published) == {KID}
    assert sandbox.keys[KID].key.public_numbers() == published[KID].key.public_numbers()
    assert sandbox.keys[KID].alg == "ES384"


def test_every_recorded_sandbox_token_verifies_against_it_at_the_recording_time(tmp_path: Path) -> None:
    check = verifier(tmp_path)
    recorded = sandbox_tokens()
    assert len(recorded) == 25
    for item in recorded:
        assert item["header"]["kid"] == KID and item["header"]["jku"] == SANDBOX_JKU
        claims = check.verify(item["token"], BASE_URL + item["path"], now=item["claims"]["iat"] + 1)
        assert claims == item["claims"]


def tampered_claims(token: str, **changes: Any) -> str:
    header, payload, signature = token.split(".")
    claims = {**json.loads(unb64(payload)), **changes}
    return ".".join([header, b64(json.dumps(claims).encode()), signature])


def tampered_signature(token: str) -> str:
    header, payload, signature = token.split(".")
    raw = bytearray(unb64(signature))
    raw[10] ^= 0x01
    return ".".join([header, payload, b64(bytes(raw))])


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda t: tampered_claims(t, jti=f"{t[-8:]}-replaced"), "signature does not verify"),
        (lambda t: tampered_claims(t, exp=4_000_000_000), "signature does not verify"),
        (tampered_signature, "signature does not verify"),
        (lambda t: tampered_claims(t, iss="https://sandbox.cds-hooks.org.evil"), "issuer is not trusted"),
    ],
    ids=["jti", "exp", "signature", "iss"],
)
def test_an_altered_sandbox_token_fails(tmp_path: Path, tamper: Any, reason: str) -> None:
    item = sandbox_tokens()[0]
    with pytest.raises(Unauthorized, match=reason):
        verifier(tmp_path).verify(tamper(item["token"]), BASE_URL + item["path"], item["claims"]["iat"] + 1)


def test_a_recorded_sandbox_token_has_expired_five_minutes_later(tmp_path: Path) -> None:
    item = sandbox_tokens()[0]
    with pytest.raises(Unauthorized, match="expired"):
        verifier(tmp_path).verify(item["token"], BASE_URL + item["path"], item["claims"]["exp"] + 61)


def test_d3k2_auth_required_with_the_trust_file_answers_the_sandbox_and_refuses_the_rest(
    tmp_path: Path,
) -> None:
    settings = Settings(
        env="test",
        auth="required",
        trust_file=TRUST_FILE,
        public_base_url=BASE_URL,
        data_dir=tmp_path,
        jti_db=tmp_path / "jti.sqlite3",
    )
    app = create_app(settings, load_ruleset(settings.cards_dir))
    try:
        item = sandbox_tokens()[0]
        app.extensions["d3k2.http.auth"].clock = lambda: item["claims"]["iat"] + 1
        client = app.test_client()
        answered = client.get(item["path"], headers={"Authorization": f"Bearer {item['token']}"})
        assert answered.status_code == 200
        assert answered.json["services"]
        assert client.get(item["path"]).status_code == 401
        altered = tampered_signature(item["token"])
        assert client.get(item["path"], headers={"Authorization": f"Bearer {altered}"}).status_code == 401
    finally:
        close(app)
