"""The pre-launch attack (issue 24), replayed class by class with generated inputs: a spoofed audience,
non-finite and huge JWT times, access tokens that are no bearer token, outcome timestamps at the ends of
time, oversized feedback, other methods, production's FHIR allow-list, and at the edge (gunicorn as
production runs it) malformed chunked bodies and SCRIPT_NAME headers.

Every class: never a 5xx, and no token, comment or other secret of the request in any log line (each
record formatted as d3k2.http.logs writes it); every feedback item acknowledged is in the store
(tests/ledger.py; under database outages and killed workers: tests/integration/test_feedback_durable.py).
Bounded for `make test`; `make attack` raises the examples with D3K2_ATTACK_EXAMPLES (and runs the fuzzers,
tests/integration/test_edge.py and test_feedback_durable.py with it).
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from builders import CARDS, SERVICE, hook_request, refused_url, ruleset
from d3k2.config import Settings, from_env
from d3k2.http.app import create_app
from d3k2.http.auth import MAX_LIFETIME
from d3k2.http.logs import JsonFormatter
from edge import gunicorn, raw
from jwt_keys import BASE_URL, NOW, es384, write_trust
from ledger import Ledger

EXAMPLES = int(os.environ.get("D3K2_ATTACK_EXAMPLES", "15"))
ATTACK = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FEEDBACK = f"/cds-services/{SERVICE}/feedback"
HOOK = f"/cds-services/{SERVICE}"


class Lines(logging.Handler):
    """Every log record of the module, as the JSON formatter writes it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def assert_absent(self, *secrets: str) -> None:
        for secret in secrets:
            leaked = [line for line in self.lines if secret in line]
            assert not leaked, f"{secret!r} logged: {leaked[:2]}"


@pytest.fixture(scope="module")
def lines() -> Iterator[Lines]:
    handler, root = Lines(), logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(previous)


@pytest.fixture(autouse=True)
def _fresh(lines: Lines) -> None:
    lines.lines.clear()


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    directory = tmp_path_factory.mktemp("attack")
    trust = directory / "trust.json"
    write_trust(trust)
    configured = Settings(
        env="test",
        cards_dir=CARDS,
        data_dir=directory,
        auth="optional",
        trust_file=trust,
        public_base_url=BASE_URL,
        jti_db=directory / "jti.sqlite3",
        fhir_budget=1.0,
    )
    built = create_app(configured, ruleset())
    built.extensions["d3k2.http.auth"].clock = lambda: NOW
    yield built
    built.extensions["d3k2.store"].close()


def assert_no_5xx(response: Any) -> None:
    assert response.status_code < 500, response.get_data(as_text=True)[:500]
    assert response.is_json or response.status_code in (200, 204), response.status_code


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "X-D3K2-Today": "2026-11-24"}


# ---------------------------------------------------------------- 1. the audience


hosts = st.from_regex(r"\A[a-z][a-z0-9-]{0,20}(\.[a-z]{2,6}){0,2}(:[0-9]{1,4})?\Z")


@ATTACK
@given(host=hosts, scheme=st.sampled_from(["http", "https"]), forwarded=st.booleans())
def test_a_token_for_the_host_header_is_never_accepted(
    app: Flask, lines: Lines, host: str, scheme: str, forwarded: bool
) -> None:
    token = es384().sign(aud=f"{scheme}://{host}/cds-services")
    headers = bearer(token)
    if forwarded:
        headers |= {"X-Forwarded-Proto": scheme, "X-Forwarded-Host": host, "Forwarded": f"host={host}"}
    response = app.test_client().get("/cds-services", base_url=f"{scheme}://{host}", headers=headers)
    assert response.status_code == 401
    lines.assert_absent(token)


# ---------------------------------------------------------------- 5. JWT numbers


numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.integers(min_value=NOW - 7200, max_value=NOW + 7200),
    st.sampled_from([math.nan, math.inf, -math.inf, 10**400, True, None, "1795547500", [NOW]]),
)


@ATTACK
@given(exp=numbers, iat=numbers, nbf=st.one_of(st.none(), numbers))
def test_jwt_time_claims_never_give_5xx_nor_a_long_life(
    app: Flask, lines: Lines, exp: Any, iat: Any, nbf: Any
) -> None:
    token = es384().sign(exp=exp, iat=iat, nbf=nbf)
    response = app.test_client().get("/cds-services", headers=bearer(token))
    assert_no_5xx(response)
    if response.status_code == 200:
        for value in (exp, iat, *(() if nbf is None else (nbf,))):
            assert isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        assert exp - iat <= MAX_LIFETIME
    else:
        assert response.status_code == 401
    lines.assert_absent(token)


# ---------------------------------------------------------------- 5. access tokens


@ATTACK
@given(tail=st.text(min_size=1, max_size=40))
def test_any_access_token_is_answered_and_never_logged(app: Flask, lines: Lines, tail: str) -> None:
    token = f"SeCrEt{tail}"
    request = {**hook_request(), "fhirServer": refused_url(), "prefetch": {}}
    request["fhirAuthorization"] = {"access_token": token, "token_type": "Bearer", "subject": "x"}
    response = app.test_client().post(HOOK, json=request, headers={"X-D3K2-Today": "2026-11-24"})
    assert_no_5xx(response)
    assert response.status_code in (200, 400)
    assert token not in response.get_data(as_text=True)
    lines.assert_absent(token)


# ---------------------------------------------------------------- 5 and 9. feedback


offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(
    lambda minutes: ("-" if minutes < 0 else "+") + f"{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
)
stamps = st.one_of(
    st.text(max_size=40),
    st.builds(
        lambda day, offset: day + "T00:00:00" + offset, st.sampled_from(["0001-01-01", "9999-12-31"]), offsets
    ),
    st.builds(
        lambda day, offset: day + "T23:59:59.999999" + offset,
        st.sampled_from(["0001-01-01", "9999-12-31"]),
        offsets,
    ),
)


@ATTACK
@given(
    stamp=st.one_of(st.none(), stamps),
    comment_size=st.sampled_from([0, 10, 4000, 4001, 70_000]),
    items=st.integers(min_value=0, max_value=130),
    card=st.text(min_size=0, max_size=200),
)
@example(stamp="2026-11-24T19:11:44Z", comment_size=10, items=3, card="attack-card-1")  # acknowledged
@example(stamp=None, comment_size=4000, items=1, card="attack-card-2")
def test_feedback_is_bounded_and_never_5xx(
    app: Flask, lines: Lines, stamp: str | None, comment_size: int, items: int, card: str
) -> None:
    comment = ("PhIcOmMeNt" + "x" * comment_size)[: max(comment_size, 10)]
    item = {
        "card": card,
        "outcome": "overridden",
        "overrideReason": {"reason": {"code": "patient-refused"}, "userComment": comment},
        "outcomeTimestamp": stamp,
    }
    body = {"feedback": [item] * items}
    response = app.test_client().post(FEEDBACK, json=body)
    assert_no_5xx(response)
    assert response.status_code in (200, 400, 413)
    if items > 100:
        assert response.status_code == 413
    acknowledged = Ledger()  # zero acknowledged-but-lost feedback
    acknowledged.feedback_answer(response.status_code, body)
    assert not acknowledged.lost(app.extensions["d3k2.store"].engine).feedback
    lines.assert_absent("PhIcOmMeNt")


# ---------------------------------------------------------------- 9. methods


@ATTACK
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE"]),
    path=st.sampled_from(
        ["/cds-services", HOOK, FEEDBACK, "/healthz", "/readyz", "/openapi.json", "/metrics"]
    ),
)
def test_every_method_on_every_path_is_answered_and_405_says_allow(
    app: Flask, method: str, path: str
) -> None:
    response = app.test_client().open(path, method=method, headers={"X-D3K2-Today": "2026-11-24"})
    assert response.status_code < 500
    if response.status_code == 405:
        assert response.headers["Allow"]


# ---------------------------------------------------------------- 6. production's allow-list


def test_production_contacts_no_loopback_port(tmp_path: Path) -> None:
    env = {
        "D3K2_ENV": "production",
        "D3K2_TRUST_HOST_HEADER": "1",
        "D3K2_AUTH": "off",
        "D3K2_DATA_DIR": str(tmp_path),
        "D3K2_CARDS_DIR": str(CARDS),
    }
    production = create_app(from_env(env), ruleset())
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(8)
        listening.setblocking(False)
        port = listening.getsockname()[1]
        for base in (f"http://127.0.0.1:{port}/fhir", f"http://localhost:{port}", f"http://[::1]:{port}/r4"):
            request = {**hook_request(), "fhirServer": base, "prefetch": {}}
            request["fhirAuthorization"] = {"access_token": "SeCrEt-production", "token_type": "Bearer"}
            assert production.test_client().post(HOOK, json=request).status_code == 403
        with pytest.raises(BlockingIOError):
            listening.accept()  # the calls are answered: a connection made would be waiting here
    production.extensions["d3k2.store"].close()


# ---------------------------------------------------------------- 1 and 5 at the edge (gunicorn)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    with gunicorn(tmp_path_factory.mktemp("attack-edge"), workers=2) as running:
        yield running


# A size line that starts with a hex digit may be a valid size larger than the body sent: the server would
# rightly wait for the rest. Every other line is malformed.
malformed_sizes = st.one_of(
    st.sampled_from(["zz", "-1", "0x10", " 1", "+5", "1_0", "\u00bd"]),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12).filter(
        lambda size: size[0] not in "0123456789abcdefABCDEF"
    ),
)


@ATTACK
@given(size=malformed_sizes)
def test_any_chunk_size_line_is_answered_without_5xx(served: tuple[str, Path], size: str) -> None:
    base, _log = served
    head = (
        f"POST {FEEDBACK} HTTP/1.1\r\nHost: d3k2.test\r\nConnection: close\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    status, answer = raw(base, head.encode() + size.encode() + b'\r\n{"feedback": []}\r\n0\r\n\r\n')
    assert status == 400, answer[:300]


@ATTACK
@given(script=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=20))
def test_a_script_name_header_is_never_believed(served: tuple[str, Path], script: str) -> None:
    base, _log = served
    data = f"GET /healthz HTTP/1.1\r\nHost: d3k2.test\r\nConnection: close\r\nSCRIPT_NAME: {script}\r\n\r\n"
    status, answer = raw(base, data.encode())
    assert status == 200, answer[:300]


def test_gunicorn_logged_no_traceback(served: tuple[str, Path]) -> None:
    """Runs after the edge cases above (file order): none of them reached an unhandled error."""
    _base, log = served
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "unhandled error" not in text, text[-2000:]
