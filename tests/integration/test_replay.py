"""`d3k2 replay`: every fixture passes, a changed golden fails with a diff naming card and field,
--update, plain Bundles, bad files, the three output formats and --url against a real server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import jwt
import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from builders import STARTUP_SECONDS, bundle_from_request, refused_port, refused_url, stop
from d3k2.http.auth import Issuer, JwksCache, Key, Verifier
from d3k2.http.jti import JtiStore
from d3k2.http.signing import TokenSigner
from d3k2.tools.cli import main
from fhir_server import FhirServer
from jwt_keys import ISSUER, NOW, SigningKey, es384, jwks, rs384

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures"
TODAY = "2026-11-24"
SANDBOX_VIEW = FIXTURES / "patient-view" / "sandbox-patient-view"
SANDBOX_SIGN = FIXTURES / "order-sign" / "sandbox-order-sign"
NOWHERE = refused_url().removesuffix("/fhir")  # a d3k2 base URL where every connection is refused


def run(*args: str, ci: str | None = None, fhir_server: str | None = None) -> Result:
    """`d3k2 replay`; recorded fhirServers are replaced by one that refuses every connection (what the
    goldens record), unless the test names its own, whatever else listens on this machine."""
    server = ["--fhir-server", fhir_server or refused_url()]
    return CliRunner(env={"CI": ci}).invoke(main, ["replay", *args, *server], catch_exceptions=False)


def last_line(result: Result) -> str:
    return result.output.rstrip("\n").splitlines()[-1]


def case_with_cards(minimum: int = 2) -> Path:
    for expected in sorted(FIXTURES.glob("patient-view/*/expected.json")):
        data = json.loads(expected.read_text(encoding="utf-8"))
        if data.get("status", 200) == 200 and len(data["response"]["cards"]) >= minimum:
            return expected.parent
    pytest.fail("no patient-view fixture with enough cards")


def copy_case(tmp_path: Path, source: Path | None = None) -> Path:
    target = tmp_path / "patient-view" / "case"
    shutil.copytree(source or case_with_cards(), target)
    return target


def edit_golden(case: Path, change: Any) -> dict[str, Any]:
    path = case / "expected.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return data


# ---------------------------------------------------------------- fixtures


def test_every_fixture_replays_to_its_golden() -> None:
    result = run(str(FIXTURES))
    assert result.exit_code == 0, result.output
    passed, failed = last_line(result).split(", ")[:2]
    assert int(passed.split()[0]) >= 1
    assert failed == "0 failed"
    assert last_line(result) == f"{passed}, 0 failed"


def test_a_changed_golden_fails_naming_card_and_field(tmp_path: Path) -> None:
    case = copy_case(tmp_path)
    data = edit_golden(case, lambda d: d["response"]["cards"][0].update(summary="changed by the test"))
    topic = data["response"]["cards"][0]["source"]["topic"]["code"]
    result = run(str(tmp_path))
    assert result.exit_code == 1
    assert f"card {topic}: summary" in result.output
    assert 'expected: "changed by the test"' in result.output
    assert last_line(result) == "0 passed, 1 failed"


def test_a_nested_field_is_named_by_its_json_path(tmp_path: Path) -> None:
    case = copy_case(tmp_path)

    def change(data: dict[str, Any]) -> None:
        data["response"]["cards"][-1]["links"][0]["url"] = "https://example.org/changed"

    data = edit_golden(case, change)
    topic = data["response"]["cards"][-1]["source"]["topic"]["code"]
    result = run(str(case / "request.json"))
    assert result.exit_code == 1
    assert f"card {topic}: links[0].url" in result.output


def test_card_order_and_key_order_do_not_matter(tmp_path: Path) -> None:
    case = copy_case(tmp_path)

    def shuffle(data: dict[str, Any]) -> None:
        data["response"]["cards"] = [dict(reversed(c.items())) for c in reversed(data["response"]["cards"])]

    edit_golden(case, shuffle)
    assert run(str(tmp_path)).exit_code == 0


def test_a_missing_card_and_a_silent_rule_that_fires_fail(tmp_path: Path) -> None:
    case = copy_case(tmp_path)
    data = json.loads((case / "expected.json").read_text(encoding="utf-8"))
    dropped = data["response"]["cards"][0]["source"]["topic"]["code"]

    def change(d: dict[str, Any]) -> None:
        d["response"]["cards"].pop(0)
        d["silent"] = [*d.get("silent", []), dropped]

    edit_golden(case, change)
    result = run(str(tmp_path))
    assert result.exit_code == 1
    assert f"card {dropped}: unexpected card" in result.output
    assert f"card {dropped}: fired, but expected.json lists it as silent" in result.output


def test_an_expected_error_status_is_compared(tmp_path: Path) -> None:
    case = copy_case(tmp_path, FIXTURES / "patient-view" / "prefetch-nothing-no-server")
    assert run(str(tmp_path)).exit_code == 0
    edit_golden(case, lambda d: d.update(status=400))
    result = run(str(tmp_path))
    assert result.exit_code == 1
    assert "response: status" in result.output


def test_update_rewrites_only_the_response(tmp_path: Path) -> None:
    case = copy_case(tmp_path)
    request_before = (case / "request.json").read_bytes()
    original = json.loads((case / "expected.json").read_text(encoding="utf-8"))
    edit_golden(case, lambda d: d["response"]["cards"].pop())
    result = run(str(tmp_path), "--update")
    assert result.exit_code == 0, result.output
    assert "[golden updated]" in result.output
    rewritten = (case / "expected.json").read_text(encoding="utf-8")
    assert rewritten.endswith("}\n")
    data = json.loads(rewritten)
    assert list(data)[:3] == ["service", "today", "profile"]
    assert {k: v for k, v in data.items() if k != "response"} == {
        k: v for k, v in original.items() if k != "response"
    }
    assert len(data["response"]["cards"]) == len(original["response"]["cards"])
    assert (case / "request.json").read_bytes() == request_before
    assert run(str(tmp_path)).exit_code == 0


def test_update_creates_a_missing_golden_and_is_refused_in_ci(tmp_path: Path) -> None:
    case = copy_case(tmp_path)
    (case / "expected.json").unlink()
    missing = run(str(tmp_path), "--today", TODAY)
    assert missing.exit_code == 1
    assert "expected.json is missing (run with --update to create it)" in missing.output
    refused = run(str(tmp_path), "--today", TODAY, "--update", ci="true")
    assert refused.exit_code == 1
    assert "refused when CI is set" in refused.output
    assert not (case / "expected.json").exists()
    created = run(str(tmp_path), "--today", TODAY, "--update")
    assert created.exit_code == 0, created.output
    data = json.loads((case / "expected.json").read_text(encoding="utf-8"))
    assert data["service"] == "d3k2-patient-view"
    assert data["today"] == TODAY
    assert data["profile"] == "seed"
    assert data["silent"] == []


# ---------------------------------------------------------------- plain bundles


def test_a_plain_bundle_builds_a_request_and_gets_a_golden(tmp_path: Path) -> None:
    export = tmp_path / "export.json"
    export.write_text(json.dumps(bundle_from_request(SANDBOX_VIEW / "request.json")), encoding="utf-8")
    first = run(str(export), "--hook", "patient-view", "--today", TODAY)
    assert first.exit_code == 0, first.output
    assert "no golden file" in first.output
    assert "kidney-advanced" in first.output
    assert run(str(export), "--hook", "patient-view", "--today", TODAY, "--update").exit_code == 0
    golden = json.loads((tmp_path / "export.expected.json").read_text(encoding="utf-8"))
    assert golden["patient"] == "d3k2-pt-1"
    assert golden["today"] == TODAY
    again = run(str(export))  # hook, patient and today now come from the golden; uuids are stable
    assert again.exit_code == 0, again.output
    assert last_line(again) == "1 passed, 0 failed"


def test_a_bundle_without_hook_is_one_error_line(tmp_path: Path) -> None:
    export = tmp_path / "export.json"
    export.write_text(json.dumps(bundle_from_request(SANDBOX_VIEW / "request.json")), encoding="utf-8")
    result = run(str(export), "--today", TODAY)
    assert result.exit_code == 1
    assert "needs --hook" in result.output


# ---------------------------------------------------------------- bad files


def test_bad_files_give_one_clear_error_line_each(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "list.json").write_text("[1, 2]", encoding="utf-8")
    (tmp_path / "patient.json").write_text('{"resourceType": "Patient", "id": "p"}', encoding="utf-8")
    (tmp_path / "hook.json").write_text(
        '{"hook": "chart-open", "hookInstance": "h", "context": {"patientId": "p"}}', encoding="utf-8"
    )
    names = ["broken.json", "list.json", "patient.json", "hook.json", "absent.json"]
    result = run(*(str(tmp_path / n) for n in names), "--today", TODAY)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(names)
    for name, line in zip(names, errors, strict=True):
        assert name in line
    assert "not JSON" in errors[0]
    assert "unknown hook 'chart-open'" in errors[3]
    assert last_line(result) == "0 passed, 5 failed"


def test_a_directory_without_fixtures_is_an_error(tmp_path: Path) -> None:
    result = run(str(tmp_path))
    assert result.exit_code == 1
    assert "no fixtures" in result.output


# ---------------------------------------------------------------- formats


def test_json_format(tmp_path: Path) -> None:
    case = copy_case(tmp_path)

    def change(data: dict[str, Any]) -> None:
        card = data["response"]["cards"][0]
        card["indicator"] = "critical" if card["indicator"] != "critical" else "info"

    data = edit_golden(case, change)
    wrong = data["response"]["cards"][0]["indicator"]
    result = run(str(tmp_path), "--format", "json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["summary"] == {"passed": 0, "failed": 1, "skipped": 0}
    (fixture,) = report["fixtures"]
    assert fixture["status"] == "failed"
    assert any(d["path"] == "indicator" and d["expected"] == wrong for d in fixture["differences"])


def test_junit_format(tmp_path: Path) -> None:
    copy_case(tmp_path)
    (tmp_path / "broken.json").write_text("nope", encoding="utf-8")
    result = run(str(tmp_path), str(tmp_path / "broken.json"), "--format", "junit")
    assert result.exit_code == 1
    suite = ET.fromstring(result.stdout.split("?>", 1)[1]).find("testsuite")
    assert suite is not None
    assert suite.get("tests") == "2"
    assert suite.get("errors") == "1"
    assert len(suite.findall("testcase")) == 2


# ---------------------------------------------------------------- --fhir-server


def _detail_of(golden: Path, topic: str) -> str:
    cards = json.loads(golden.read_text(encoding="utf-8"))["response"]["cards"]
    return next((c["detail"] for c in cards if c["source"]["topic"]["code"] == topic), "")


def test_fhir_server_replaces_the_recorded_one(tmp_path: Path, fhir_server: FhirServer) -> None:
    """The keys the recorded request lacks are fetched from the server named (it answers: nothing on
    record), no longer refused at the recorded address; the request file is not changed."""
    case = copy_case(tmp_path, SANDBOX_SIGN)
    request_before = (case / "request.json").read_bytes()
    assert "calcium results (could not be fetched: connection refused)" in _detail_of(
        case / "expected.json", "data-incomplete"
    )
    result = run(str(tmp_path), "--update", fhir_server=fhir_server.base_url)
    assert result.exit_code == 0, result.output
    assert "[golden updated]" in result.output
    assert "could not be fetched" not in _detail_of(case / "expected.json", "data-incomplete")
    assert (case / "request.json").read_bytes() == request_before


def test_fhir_server_gets_no_recorded_token(tmp_path: Path, fhir_server_auth: FhirServer) -> None:
    """A recorded fhirAuthorization is for the recorded server: sent to the server named instead, it would
    hand that server a credential. The control shows the same server answers when the token is sent."""
    assert fhir_server_auth.token
    request = json.loads((SANDBOX_SIGN / "request.json").read_text(encoding="utf-8"))
    request["fhirAuthorization"] = {"access_token": fhir_server_auth.token, "token_type": "Bearer"}
    recorded_there = tmp_path / "there.request.json"
    recorded_there.write_text(json.dumps({**request, "fhirServer": fhir_server_auth.base_url}))
    recorded_elsewhere = tmp_path / "elsewhere.request.json"
    recorded_elsewhere.write_text(json.dumps({**request, "fhirServer": refused_url()}))
    as_recorded = CliRunner(env={"CI": None}).invoke(
        main, ["replay", str(recorded_there), "--today", TODAY, "--update"], catch_exceptions=False
    )
    assert as_recorded.exit_code == 0, as_recorded.output
    elsewhere = fhir_server_auth.base_url
    redirected = run(str(recorded_elsewhere), "--today", TODAY, "--update", fhir_server=elsewhere)
    assert redirected.exit_code == 0, redirected.output
    assert "could not be fetched" not in _detail_of(tmp_path / "there.expected.json", "data-incomplete")
    assert "calcium results (could not be fetched: HTTP 401)" in _detail_of(
        tmp_path / "elsewhere.expected.json", "data-incomplete"
    )


@pytest.mark.parametrize("url", ["127.0.0.1:8090/fhir", "ftp://127.0.0.1/fhir", "http:///fhir"])
def test_fhir_server_must_be_an_http_url(url: str) -> None:
    result = run(str(FIXTURES), fhir_server=url)
    assert result.exit_code == 2
    assert "--fhir-server" in result.output and "must be an http(s) URL" in result.output


# ---------------------------------------------------------------- --url against a real server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _serve(tmp_path_factory, {"D3K2_AUTH": "off"})


def _serve(tmp_path_factory: pytest.TempPathFactory, settings: dict[str, str]) -> Iterator[str]:
    """``d3k2 serve`` in a subprocess, on a free port, until the module's tests are done."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "D3K2_ENV": "test", "D3K2_PROFILE": "seed", **settings}
    env["D3K2_DATA_DIR"] = str(tmp_path_factory.mktemp("d3k2-data"))
    log = (tmp_path_factory.mktemp("d3k2-log") / "serve.log").open("wb")
    command = [str(Path(sys.executable).parent / "d3k2"), "serve", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:  # refused, reset, or slower than 1 s (a TimeoutError urllib does not wrap)
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"d3k2 serve did not start (exit {process.poll()})")
            time.sleep(0.05)
        yield url
    finally:
        stop(process)
        log.close()


def test_url_mode_replays_against_a_running_server(server: str) -> None:
    result = run(str(FIXTURES), "--url", server)
    assert result.exit_code == 0, result.output
    summary = last_line(result)
    assert summary.split(", ")[1] == "0 failed"
    assert int(summary.split()[0]) >= 1
    profiles = {
        json.loads(p.read_text(encoding="utf-8")).get("profile", "seed")
        for p in FIXTURES.glob("*/*/expected.json")
    }
    if profiles - {"seed"}:
        assert summary.endswith(" skipped")
        assert "(the server runs seed)" in result.output


def test_url_mode_reports_a_changed_golden(server: str, tmp_path: Path) -> None:
    case = copy_case(tmp_path)
    data = edit_golden(case, lambda d: d["response"]["cards"][0].update(summary="changed"))
    topic = data["response"]["cards"][0]["source"]["topic"]["code"]
    result = run(str(tmp_path), "--url", server)
    assert result.exit_code == 1
    assert f"card {topic}: summary" in result.output


def test_url_mode_without_a_server_is_one_error_line(tmp_path: Path) -> None:
    copy_case(tmp_path)
    result = run(str(tmp_path), "--url", f"http://127.0.0.1:{refused_port()}")
    assert result.exit_code == 1
    assert "cannot read discovery" in result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------- --url with a signed bearer token


def _pem(key: SigningKey, directory: Path) -> Path:
    path = directory / f"{key.kid}.pem"
    path.write_bytes(
        key.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server with D3K2_AUTH=required that trusts the test issuer's ES384 and RS384 public keys."""
    trust = tmp_path_factory.mktemp("trust") / "trust.json"
    trust.write_text(json.dumps({"issuers": {ISSUER: {"jwks": jwks(es384(), rs384())}}}))
    yield from _serve(tmp_path_factory, {"D3K2_AUTH": "required", "D3K2_TRUST_FILE": str(trust)})


def signed(key: SigningKey, directory: Path, *args: str) -> list[str]:
    return [*args, "--jwt-key", str(_pem(key, directory)), "--jwt-iss", ISSUER, "--jwt-kid", key.kid]


@pytest.mark.parametrize("key", [es384, rs384], ids=["ES384", "RS384"])
def test_url_mode_signs_every_call_for_a_server_that_checks_tokens(
    secured: str, tmp_path: Path, key: Any
) -> None:
    copy_case(tmp_path / "cases")
    result = run(*signed(key(), tmp_path, str(tmp_path / "cases"), "--url", secured))
    assert result.exit_code == 0, result.output
    assert last_line(result).startswith("1 passed, 0 failed")


def test_url_mode_without_a_token_is_refused_by_such_a_server(secured: str, tmp_path: Path) -> None:
    copy_case(tmp_path)
    result = run(str(tmp_path), "--url", secured)
    assert result.exit_code == 1
    assert "cannot read discovery" in result.output and "401" in result.output


def test_url_mode_with_a_key_the_server_does_not_trust_is_refused(secured: str, tmp_path: Path) -> None:
    copy_case(tmp_path / "cases")
    stranger = SigningKey(es384().kid, "ES384", es384("stranger").private)
    result = run(*signed(stranger, tmp_path, str(tmp_path / "cases"), "--url", secured))
    assert result.exit_code == 1
    assert "401" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--jwt-iss", ISSUER], "--jwt-iss and --jwt-kid go with --jwt-key"),
        (["--jwt-key", "{key}", "--jwt-iss", ISSUER, "--jwt-kid", "k"], "it needs --url"),
        (["--url", NOWHERE, "--jwt-key", "{key}", "--jwt-kid", "k"], "needs --jwt-iss and"),
    ],
)
def test_token_options_go_together(tmp_path: Path, args: list[str], message: str) -> None:
    key = str(_pem(es384(), tmp_path))
    result = CliRunner().invoke(main, ["replay", str(tmp_path), *(a.format(key=key) for a in args)])
    assert result.exit_code == 2
    assert message in result.output


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "absent.pem", "cannot read the signing key"),
        (lambda d: _text(d / "not.pem", "not a key"), "is not an unencrypted PEM private key"),
        (lambda d: _key_file(d, ec.generate_private_key(ec.SECP256R1())), "must be EC P-384 (ES384) or RSA"),
        (
            lambda d: _key_file(d, rsa.generate_private_key(public_exponent=65537, key_size=1024)),
            "of at least 2048 bits",
        ),
    ],
    ids=["absent", "not-pem", "p-256", "rsa-1024"],
)
def test_an_unusable_signing_key_is_one_error_line(tmp_path: Path, make: Any, message: str) -> None:
    path = make(tmp_path)
    args = ["--url", NOWHERE, "--jwt-key", str(path), "--jwt-iss", ISSUER, "--jwt-kid", "k"]
    result = CliRunner().invoke(main, ["replay", str(tmp_path), *args])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _key_file(directory: Path, key: Any) -> Path:
    return _pem(SigningKey("other", "ES384", key), directory)


def test_a_signed_token_carries_what_the_verifier_checks(tmp_path: Path) -> None:
    """The token d3k2's own verifier accepts for the URL called, once (its jti is fresh each time)."""
    signer = TokenSigner.from_pem(_pem(rs384(), tmp_path), ISSUER, rs384().kid)
    signer = replace(signer, clock=lambda: NOW)
    audience = "http://127.0.0.1:8095/cds-services/d3k2-patient-view"
    trusted = {ISSUER: Issuer(ISSUER, {k.kid: Key(k.kid, k.public, k.alg) for k in (es384(), rs384())})}
    check = Verifier(trusted, JwksCache(60.0), JtiStore(tmp_path / "jti.sqlite3"))
    first, second = (signer.authorization(audience).removeprefix("Bearer ") for _ in range(2))
    claims = check.verify(first, audience, NOW)
    assert (claims["iss"], claims["sub"], claims["aud"], claims["exp"] - claims["iat"]) == (
        ISSUER, ISSUER, audience, 300,
    )  # fmt: skip
    assert jwt.get_unverified_header(first) == {"alg": "RS384", "kid": rs384().kid, "typ": "JWT"}
    assert check.verify(second, audience, NOW)["jti"] != claims["jti"]
