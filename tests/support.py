"""Shared test helpers: the repo's paths, the loaded rule set, fixtures and a fixed "today"."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from d3k2.ruleset import RuleSet, load_ruleset

REPO = Path(__file__).resolve().parents[1]
CARDS = REPO / "cards"
FIXTURES = REPO / "fixtures"
SANDBOX = REPO.parent / "shared" / "sandbox"
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
    found = []
    for request in sorted(FIXTURES.glob("*/*/request.json")):
        folder = request.parent
        found.append(
            Fixture(
                folder,
                folder.parent.name,
                folder.name,
                json.loads(request.read_text(encoding="utf-8")),
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
