"""Fallback FHIR client against a real sekmet server, and against tiny stdlib servers for transport faults."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from builders import assert_no_connection, refused_port
from d3k2.config import Settings
from d3k2.core.errors import FhirServerNotAllowed
from d3k2.fhir.client import FetchOutcome, FhirClient, build_url, is_allowed
from fhir_server import FhirServer

PATIENT = "fc-p1"
OTHER_PATIENT = "fc-p2"
VITD = "http://loinc.org|62292-8,http://loinc.org|1989-3"
VITD_QUERY = f"Observation?patient={PATIENT}&code={VITD}&_sort=-date&_count=5"
FAST = Settings(fhir_budget=5.0, fhir_timeout=4.0)


def _patient(pid: str) -> dict[str, Any]:
    return {
        "fullUrl": f"urn:uuid:{pid}",
        "resource": {"resourceType": "Patient", "id": pid, "name": [{"family": "Client", "given": [pid]}]},
        "request": {"method": "PUT", "url": f"Patient/{pid}"},
    }


def _observation(oid: str, pid: str, code: str, day: str, value: float) -> dict[str, Any]:
    return {
        "resource": {
            "resourceType": "Observation",
            "id": oid,
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
            "subject": {"reference": f"Patient/{pid}"},
            "effectiveDateTime": day,
            "valueQuantity": {"value": value, "unit": "ng/mL", "system": "http://unitsofmeasure.org"},
        },
        "request": {"method": "PUT", "url": f"Observation/{oid}"},
    }


def _transaction() -> dict[str, Any]:
    """12 vitamin D results for fc-p1 on Jan 1..12 (both LOINC codes), plus two that must not match."""
    entries = [_patient(PATIENT), _patient(OTHER_PATIENT)]
    for day in range(1, 13):
        code = "62292-8" if day % 2 else "1989-3"
        entries.append(_observation(f"fc-vitd-{day:02d}", PATIENT, code, f"2024-01-{day:02d}", 20.0 + day))
    entries.append(_observation("fc-egfr-1", PATIENT, "33914-3", "2024-02-01", 70.0))
    entries.append(_observation("fc-vitd-other", OTHER_PATIENT, "1989-3", "2024-03-01", 40.0))
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


@pytest.fixture(scope="module")
def sekmet(fhir_server: FhirServer) -> FhirServer:
    fhir_server.load(_transaction())
    return fhir_server


@pytest.fixture(scope="module")
def sekmet_auth(fhir_server_auth: FhirServer) -> FhirServer:
    fhir_server_auth.load({"resourceType": "Bundle", "type": "transaction", "entry": [_patient(PATIENT)]})
    return fhir_server_auth


def fetch(
    settings: Settings, base_url: str, queries: dict[str, str], token: str | None = None
) -> dict[str, FetchOutcome]:
    with FhirClient(settings) as client:
        return client.fetch_many(base_url, queries, token)


def _ids(bundle: dict[str, Any] | None) -> list[str]:
    assert bundle is not None
    return [entry["resource"]["id"] for entry in bundle["entry"]]


# ---------------------------------------------------------------- allow-list and URL building


@pytest.mark.parametrize(
    ("url", "patterns", "allowed"),
    [
        ("http://127.0.0.1:8090/fhir", ("http://127.0.0.1:*",), True),
        ("http://LOCALHOST:8090/fhir/", ("http://localhost:*",), True),
        ("http://[::1]:8090/fhir", ("http://[::1]:*",), True),
        ("http://1:8090/fhir", ("http://[::1]:*",), False),
        ("https://ehr.example.org/fhir", ("https://*.example.org:443",), True),
        ("https://ehr.example.org:8443/fhir", ("https://*.example.org:443",), False),
        ("http://ehr.example.org/fhir", ("https://*.example.org:443",), False),
        ("https://example.org.evil.test/fhir", ("https://*.example.org:443",), False),
        ("http://127.0.0.1.evil.test:80/fhir", ("http://127.0.0.1:*",), False),
        ("http://user:pw@127.0.0.1:8090/fhir", ("http://127.0.0.1:*",), False),
        ("http://@127.0.0.1:8090/fhir", ("http://127.0.0.1:*",), False),
        ("ftp://127.0.0.1:21/fhir", ("ftp://127.0.0.1:*",), False),
        ("file:///etc/passwd", ("*",), False),
        ("http://127.0.0.1:8090/fhir?x=1", ("http://127.0.0.1:*",), False),
        ("http://127.0.0.1:8090/fhir#frag", ("http://127.0.0.1:*",), False),
        ("http://127.0.0.1:99999/fhir", ("http://127.0.0.1:*",), False),
        ("http://127.0.0.1:0/fhir", ("http://127.0.0.1:*",), False),
        ("http://127.0.0.1 :8090/fhir", ("http://127.0.0.1*",), False),
        ("http://127.0.0.1\\@evil.test/fhir", ("http://127.0.0.1*",), False),
        ("not a url", ("*",), False),
        ("http://127.0.0.1:8090/fhir", (), False),
    ],
)
def test_is_allowed_compares_the_origin(url: str, patterns: tuple[str, ...], allowed: bool) -> None:
    assert is_allowed(url, patterns) is allowed


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("Patient/p1", "http://h:1/fhir/Patient/p1"),
        (
            f"Observation?patient=p1&code={VITD}&_sort=-date&_count=5",
            "http://h:1/fhir/Observation?patient=p1&code=http://loinc.org%7C62292-8,http://loinc.org%7C1989-3"
            "&_sort=-date&_count=5",
        ),
        (
            "Observation?code=http://loinc.org%7C1989-3",
            "http://h:1/fhir/Observation?code=http://loinc.org%7C1989-3",
        ),
        (
            "Observation?date=ge2024-01-01T00:00:00+01:00",
            "http://h:1/fhir/Observation?date=ge2024-01-01T00:00:00%2B01:00",
        ),
        ("Patient?name=a b", "http://h:1/fhir/Patient?name=a%20b"),
        ("http://evil.test/Patient", "http://h:1/fhir/http://evil.test/Patient"),
    ],
)
def test_build_url_keeps_the_query_and_encodes_what_servers_misread(query: str, expected: str) -> None:
    assert build_url("http://h:1/fhir/", query) == expected


# ---------------------------------------------------------------- against a real FHIR server


def test_reads_a_patient(sekmet: FhirServer) -> None:
    outcome = fetch(FAST, sekmet.base_url, {"patient": f"Patient/{PATIENT}"}, None)["patient"]
    assert outcome.error is None
    assert outcome.resource is not None
    assert (outcome.resource["resourceType"], outcome.resource["id"]) == ("Patient", PATIENT)
    assert (outcome.pages, outcome.truncated) == (1, False)


def test_search_or_of_codes_newest_first(sekmet: FhirServer) -> None:
    query = f"Observation?patient={PATIENT}&code={VITD}&_sort=-date&_count=50"
    outcome = fetch(FAST, sekmet.base_url, {"vitd": query})["vitd"]
    assert outcome.error is None
    assert outcome.resource is not None
    assert (outcome.resource["resourceType"], outcome.resource["type"]) == ("Bundle", "searchset")
    assert _ids(outcome.resource) == [f"fc-vitd-{day:02d}" for day in range(12, 0, -1)]


def test_pages_are_merged_into_one_bundle(sekmet: FhirServer) -> None:
    outcome = fetch(FAST, sekmet.base_url, {"vitd": VITD_QUERY})["vitd"]
    assert outcome.error is None
    assert (outcome.pages, outcome.truncated) == (3, False)
    assert _ids(outcome.resource) == [f"fc-vitd-{day:02d}" for day in range(12, 0, -1)]
    assert outcome.resource is not None
    assert [link["relation"] for link in outcome.resource["link"]] == ["self"]


def test_page_bound_keeps_what_was_read_and_says_so(sekmet: FhirServer) -> None:
    settings = Settings(fhir_budget=5.0, fhir_timeout=4.0, fhir_max_pages=2)
    outcome = fetch(settings, sekmet.base_url, {"vitd": VITD_QUERY})["vitd"]
    assert outcome.error is None
    assert (outcome.pages, outcome.truncated) == (2, True)
    assert _ids(outcome.resource) == [f"fc-vitd-{day:02d}" for day in range(12, 2, -1)]


def test_many_keys_in_one_call_fail_one_by_one(sekmet: FhirServer) -> None:
    queries = {
        "patient": f"Patient/{PATIENT}",
        "vitd": VITD_QUERY,
        "egfr": f"Observation?patient={PATIENT}&code=http://loinc.org|98979-8,http://loinc.org|33914-3",
        "medstatements": f"MedicationStatement?patient={PATIENT}",
        "missing": "Patient/fc-nobody",
        "bad": "Observation?_count=many",
    }
    outcomes = fetch(FAST, sekmet.base_url, queries)
    assert list(outcomes) == list(queries)
    assert _ids(outcomes["egfr"].resource) == ["fc-egfr-1"]
    assert outcomes["medstatements"].error is None
    assert outcomes["medstatements"].resource is not None
    assert outcomes["medstatements"].resource.get("entry", []) == []
    assert (outcomes["missing"].error, outcomes["missing"].resource) == ("HTTP 404", None)
    assert outcomes["bad"].error == "HTTP 400"
    assert outcomes["patient"].error is None
    assert outcomes["vitd"].pages == 3


def test_bearer_token_is_sent(sekmet_auth: FhirServer) -> None:
    queries = {"patient": f"Patient/{PATIENT}"}
    refused = fetch(FAST, sekmet_auth.base_url, queries, None)["patient"]
    assert refused.error is not None
    assert "401" in refused.error
    wrong = fetch(FAST, sekmet_auth.base_url, queries, "not-the-token")["patient"]
    assert wrong.error == "HTTP 401"
    granted = fetch(FAST, sekmet_auth.base_url, queries, sekmet_auth.token)["patient"]
    assert granted.error is None
    assert granted.resource is not None
    assert granted.resource["id"] == PATIENT


# ---------------------------------------------------------------- transport faults, with stdlib servers


@dataclass
class Reply:
    status: int = 200
    body: bytes = b'{"resourceType":"Patient","id":"stub"}'
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    chunked: bool = False


class StubServer(ThreadingHTTPServer):
    """Answers each path from ``routes`` (default: a Patient), recording requests and peak concurrency."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _StubHandler)
        self.routes: dict[str, Reply] = {}
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.active = 0
        self.peak = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/fhir"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up closes its socket mid-reply: expected here, not worth a traceback."""


class _StubHandler(BaseHTTPRequestHandler):
    server: StubServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        stub = self.server
        with stub.lock:
            stub.seen.append((self.path, dict(self.headers)))
            stub.active += 1
            stub.peak = max(stub.peak, stub.active)
        try:
            reply = stub.routes.get(self.path.partition("?")[0], Reply())
            stub.stopping.wait(reply.delay)
            self.send_response(reply.status)
            for name, value in {"Content-Type": "application/fhir+json", **reply.headers}.items():
                self.send_header(name, value)
            if reply.chunked:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for start in range(0, len(reply.body), 100):
                    piece = reply.body[start : start + 100]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
            else:
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)
        finally:
            with stub.lock:
                stub.active -= 1

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: pytest shows stderr of failing tests only, and this would drown it."""


@pytest.fixture
def stub() -> Iterator[StubServer]:
    server = StubServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join()


def test_not_allowed_server_raises_before_connecting(listener: socket.socket) -> None:
    settings = Settings(fhir_allowed=("https://*.example.org:443",))
    base_url = f"http://127.0.0.1:{listener.getsockname()[1]}/fhir"
    with FhirClient(settings) as client, pytest.raises(FhirServerNotAllowed) as raised:
        client.fetch_many(base_url, {"patient": "Patient/p1"}, "secret-token")
    assert raised.value.body()["origin"] == f"http://127.0.0.1:{listener.getsockname()[1]}"
    assert "secret-token" not in str(raised.value.body())
    assert_no_connection(listener)


def test_connection_refused_is_an_outcome() -> None:
    base_url = f"http://127.0.0.1:{refused_port()}/fhir"
    started = time.monotonic()
    outcome = fetch(FAST, base_url, {"patient": "Patient/p1"})["patient"]
    assert (outcome.error, outcome.resource, outcome.pages) == ("connection refused", None, 0)
    assert time.monotonic() - started < FAST.fhir_budget


def test_budget_returns_what_finished(stub: StubServer) -> None:
    stub.routes["/fhir/Patient/slow"] = Reply(delay=30.0)
    settings = Settings(fhir_budget=0.5, fhir_timeout=2.0)
    started = time.monotonic()
    outcomes = fetch(settings, stub.base_url, {"slow": "Patient/slow", "fast": "Patient/fast"})
    assert time.monotonic() - started < settings.fhir_budget + 1.0
    assert outcomes["fast"].error is None
    assert outcomes["slow"].error == "timed out after 0.5 s budget"
    assert outcomes["slow"].resource is None


def test_per_request_timeout_below_the_budget(stub: StubServer) -> None:
    stub.routes["/fhir/Patient/slow"] = Reply(delay=30.0)
    outcome = fetch(Settings(fhir_budget=3.0, fhir_timeout=0.3), stub.base_url, {"slow": "Patient/slow"})[
        "slow"
    ]
    assert outcome.error == "timed out after 0.3 s"


def test_queries_run_in_parallel(stub: StubServer) -> None:
    stub.routes["/fhir/Patient/slow"] = Reply(delay=0.5)
    outcomes = fetch(Settings(fhir_budget=3.0), stub.base_url, dict.fromkeys("abcd", "Patient/slow"))
    assert [outcome.error for outcome in outcomes.values()] == [None] * 4
    assert stub.peak >= 2


def test_redirect_is_not_followed(stub: StubServer, listener: socket.socket) -> None:
    elsewhere = f"http://127.0.0.1:{listener.getsockname()[1]}/fhir/Patient/p1"
    stub.routes["/fhir/Patient/p1"] = Reply(status=302, body=b"", headers={"Location": elsewhere})
    outcome = fetch(FAST, stub.base_url, {"patient": "Patient/p1"}, "secret-token")["patient"]
    assert outcome.error == "redirect not followed (HTTP 302)"
    assert_no_connection(listener)


def test_next_link_to_another_origin_is_not_followed(stub: StubServer, listener: socket.socket) -> None:
    elsewhere = f"http://127.0.0.1:{listener.getsockname()[1]}/fhir/Observation?page=2"
    page = (
        b'{"resourceType":"Bundle","type":"searchset","entry":[],'
        b'"link":[{"relation":"next","url":"' + elsewhere.encode() + b'"}]}'
    )
    stub.routes["/fhir/Observation"] = Reply(body=page)
    outcome = fetch(FAST, stub.base_url, {"obs": "Observation?patient=p1"}, "secret-token")["obs"]
    assert outcome.error == "next link to another origin not followed"
    assert outcome.pages == 1
    assert_no_connection(listener)


def test_headers_sent(stub: StubServer) -> None:
    fetch(FAST, stub.base_url, {"with": "Patient/a"}, "secret-token")
    fetch(FAST, stub.base_url, {"without": "Patient/b"}, None)
    (path_a, headers_a), (path_b, headers_b) = stub.seen
    assert (path_a, path_b) == ("/fhir/Patient/a", "/fhir/Patient/b")
    assert headers_a["Accept"] == headers_b["Accept"] == "application/fhir+json"
    assert headers_a["Authorization"] == "Bearer secret-token"
    assert "Authorization" not in headers_b


def test_query_reaches_the_server_encoded(stub: StubServer) -> None:
    fetch(FAST, stub.base_url, {"vitd": VITD_QUERY})
    assert stub.seen[0][0] == (
        f"/fhir/Observation?patient={PATIENT}&code=http://loinc.org%7C62292-8,http://loinc.org%7C1989-3"
        "&_sort=-date&_count=5"
    )


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (Reply(body=b"x" * 2000), "response larger than 1000 bytes"),
        (Reply(body=b"x" * 2000, chunked=True), "response larger than 1000 bytes"),
        (
            Reply(body=b"<html>busy</html>", headers={"Content-Type": "text/html"}),
            "response is not JSON (HTTP 200)",
        ),
        (Reply(body=b"[1, 2]"), "response is not a FHIR resource (HTTP 200)"),
        (Reply(body=b'{"resourceType":"OperationOutcome","issue":[]}'), "OperationOutcome (HTTP 200)"),
        (Reply(status=500, body=b'{"resourceType":"OperationOutcome","issue":[]}'), "HTTP 500"),
        (Reply(status=403, body=b"Forbidden for patient fc-p1"), "HTTP 403"),
    ],
)
def test_bad_responses_are_outcomes(stub: StubServer, reply: Reply, error: str) -> None:
    stub.routes["/fhir/Patient/p1"] = reply
    settings = Settings(fhir_budget=5.0, fhir_max_bytes=1000)
    outcome = fetch(settings, stub.base_url, {"patient": "Patient/p1"})["patient"]
    assert (outcome.error, outcome.resource) == (error, None)


# ---------------------------------------------------------------- a slow-drip server


class DripServer(ThreadingHTTPServer):
    """Sends one byte every ``every`` seconds, forever: in the status line (path /status) or in a body
    announced as large (any other path). Each read of a client finishes well within its timeout."""

    daemon_threads = True

    def __init__(self, every: float) -> None:
        super().__init__(("127.0.0.1", 0), _DripHandler)
        self.every = every
        self.stopping = threading.Event()
        self.cut = 0  # connections the client closed while the server was dripping
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/fhir"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet."""


class _DripHandler(BaseHTTPRequestHandler):
    server: DripServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.startswith("/fhir/status"):
            head = b""
        else:
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 100000\r\n\r\n"
        try:
            self.wfile.write(head)
            self.wfile.flush()
            payload = b"HTTP/1.1 200 OK\r\n" if not head else b'{"resourceType":"Patient"' + b" " * 99_000
            for byte in payload:
                if self.server.stopping.wait(self.server.every):
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
        except OSError:
            with self.server.lock:
                self.server.cut += 1
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def drip() -> Iterator[DripServer]:
    server = DripServer(every=0.3)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_slow_drip_server_is_cut_at_the_budget_and_frees_the_fetch_threads(
    drip: DripServer, stub: StubServer
) -> None:
    """Reads of 0.3 s each never reach the 1 s timeout: the budget (1.5 s) must end them. Before, the
    threads stayed blocked for as long as the server dripped, and the next calls found none free."""
    settings = Settings(fhir_budget=1.5, fhir_timeout=1.0, fhir_workers=2)
    with FhirClient(settings) as client:
        dripped = client.fetch_many(drip.base_url, {"head": "status", "body": "Patient/p1"}, None)
        assert {key: outcome.error for key, outcome in dripped.items()} == {
            "head": "timed out after 1.5 s budget",
            "body": "timed out after 1.5 s budget",
        }
        for _ in range(2):  # both workers are free again, call after call
            healthy = client.fetch_many(stub.base_url, {"a": "Patient/a", "b": "Patient/b"}, None)
            assert {key: outcome.error for key, outcome in healthy.items()} == {"a": None, "b": None}
            assert all(outcome.resource for outcome in healthy.values())
    # The client closed both dripping connections (the server's next byte found them gone).
    deadline = time.monotonic() + 30  # the server notices at its next bytes: ample on a loaded machine
    while drip.cut < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert drip.cut == 2
