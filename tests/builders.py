"""Shared test helpers: the repo's paths, the loaded rule set, fixtures and a fixed "today"."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from werkzeug.serving import make_server

from d3k2.config import Settings
from d3k2.core.loader import load_ruleset
from d3k2.core.ruleset import RuleSet
from d3k2.http.app import create_app
from d3k2.store.feedback import FeedbackStore

REPO = Path(__file__).resolve().parents[1]
CARDS = REPO / "cards"
FIXTURES = REPO / "fixtures"
SANDBOX = REPO / "tests" / "data" / "sandbox"  # vendored recordings of the real CDS Hooks sandbox
TODAY = date(2026, 11, 24)


@cache
def ruleset() -> RuleSet:
    return load_ruleset(CARDS)


@dataclass(frozen=True)
class Fixture:
    path: Path
    hook: str
    name: str
    request: dict[str, Any]
    expected: dict[str, Any]

    @property
    def id(self) -> str:
        return f"{self.hook}/{self.name}"


def fixtures() -> list[Fixture]:
    """Every golden fixture, its request off the network (``off_the_network``)."""
    found = []
    for request in sorted(FIXTURES.glob("*/*/request.json")):
        folder = request.parent
        found.append(
            Fixture(
                folder,
                folder.parent.name,
                folder.name,
                off_the_network(json.loads(request.read_text(encoding="utf-8"))),
                json.loads((folder / "expected.json").read_text(encoding="utf-8")),
            )
        )
    return found


def topics(response: dict[str, Any]) -> list[str]:
    return [card["source"]["topic"]["code"] for card in response.get("cards", [])]


def bundle_from_request(request: Path) -> dict[str, Any]:
    """A plain collection Bundle holding everything a recorded request prefetched."""
    payload = json.loads(request.read_text(encoding="utf-8"))
    entries = []
    for value in payload["prefetch"].values():
        if isinstance(value, dict) and value.get("resourceType") == "Bundle":
            entries.extend({"resource": e["resource"]} for e in value.get("entry", []))
        elif isinstance(value, dict):
            entries.append({"resource": value})
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


# How long a test waits for a server it started (gunicorn, sekmet, d3k2 serve, PostgreSQL) to answer. A
# passing run waits only as long as the start takes; 30 s was outlasted on a loaded 2-core machine (gunicorn's
# workers still loading the app after 30 s), which failed every test of the module.
STARTUP_SECONDS = 120.0


def stop(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Terminate a server started by a test; kill it if it does not go."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A bound, listening loopback socket nobody should connect to."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.settimeout(0.3)
        yield sock


def assert_no_connection(sock: socket.socket) -> None:
    """Proves a host was never contacted: nothing connects to its listener within the timeout."""
    try:
        connection, _ = sock.accept()
    except TimeoutError:
        return
    connection.close()
    pytest.fail("something connected to a host that must not be contacted")


def gunicorn_env(tmp_path: Path, port: int, workers: int) -> dict[str, str]:
    """The environment docker/gunicorn.conf.py runs d3k2 with in tests: SQLite and metrics under
    ``tmp_path``, no JWT, loopback only."""
    env = {
        **os.environ,
        "D3K2_ENV": "test",
        "D3K2_AUTH": "off",
        "D3K2_HOST": "127.0.0.1",
        "D3K2_PORT": str(port),
        "D3K2_DATA_DIR": str(tmp_path / "data"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        "GUNICORN_WORKERS": str(workers),
    }
    env.pop("D3K2_DATABASE_URL", None)
    return env


# ---------------------------------------------------------------- apps, stores and calls

T0 = datetime(2026, 11, 24, 19, 0, tzinfo=UTC)
SERVICE = "d3k2-patient-view"
HEADERS = {"X-D3K2-Today": TODAY.isoformat()}


def fixed_clock(at: datetime = T0):
    return lambda: at


def sandbox_feedback(name: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((SANDBOX / f"feedback-{name}.request.json").read_text())
    return body


def card(uuid: str, rule: str, indicator: str = "warning") -> dict[str, Any]:
    return {"uuid": uuid, "indicator": indicator, "source": {"topic": {"code": rule}}}


def rows(s: FeedbackStore, table: Any) -> list[dict[str, Any]]:
    with s.engine.connect() as connection:
        return [dict(r._mapping) for r in connection.execute(select(table).order_by(table.c.id))]


def settings(tmp_path: Path, **changes: Any) -> Settings:
    base = Settings(env="test", cards_dir=CARDS, data_dir=tmp_path / "data", auth="off", fhir_budget=1.0)
    return replace(base, **changes)


def hook_request() -> dict[str, Any]:
    """The sandbox's patient-view call, its fhirServer moved to a port where nothing listens."""
    return sandbox_request("patient-view.request.json")


def sandbox_request(name: str) -> dict[str, Any]:
    """A recorded sandbox call from tests/data/sandbox, off the network (``off_the_network``)."""
    return off_the_network(json.loads((SANDBOX / name).read_text(encoding="utf-8")))


def off_the_network(request: dict[str, Any]) -> dict[str, Any]:
    """A copy of a recorded request whose fhirServer, when it names one, is ``refused_url()``. The recordings
    name http://127.0.0.1:8090/fhir and the goldens record "could not be fetched: connection refused" for
    the keys they lack: true only while nothing on this machine listens there."""
    if request.get("fhirServer") is None:
        return request
    return {**copy.deepcopy(request), "fhirServer": refused_url()}


def post(client: Any, path: str, body: Any) -> Any:
    return client.post(path, data=json.dumps(body), content_type="application/json", headers=HEADERS)


def make_app(tmp_path: Path, url: str | None = None, at: datetime = T0) -> Flask:
    s = settings(tmp_path, database_url=url)
    return create_app(s, ruleset(), FeedbackStore(s.database, clock=fixed_clock(at)))


def close(app: Flask) -> None:
    app.extensions["d3k2.store"].close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict[Any, float], name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


_REFUSING: list[socket.socket] = []


def refused_port() -> int:
    """A loopback port that is bound by this process but never listens: every connection to it is refused,
    whatever else runs on the machine (no fixed port; a port merely free when picked may be another
    program's by the time it is called)."""
    if not _REFUSING:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        _REFUSING.append(sock)
    return int(_REFUSING[0].getsockname()[1])


def refused_url() -> str:
    """A FHIR base on ``refused_port()``."""
    return f"http://127.0.0.1:{refused_port()}/fhir"


def lab_observation(
    code: str, value: float, unit: str, *, oid: str = "o1", when: str = "2026-11-01", **extra: Any
) -> dict[str, Any]:
    """A final LOINC-coded lab Observation with a UCUM valueQuantity; `extra` adds or replaces fields."""
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": unit, "code": unit, "system": "http://unitsofmeasure.org"},
    }
    resource.update(extra)
    return resource


def edit_card_file(cards: Path, file: str, old: str, new: str) -> None:
    """Replace the first `old` in a copied rule-set file (`old` must be there)."""
    path = cards / file
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {file}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """A WSGI app served on a loopback port the OS picks, in a thread: its base URL; stopped on exit."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
