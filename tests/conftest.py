from collections.abc import Iterator
from pathlib import Path

import pytest

from builders import fixed_clock, listener  # noqa: F401 (listener is a fixture)
from d3k2.store.feedback import FeedbackStore
from fhir_server import fhir_server, fhir_server_auth  # noqa: F401
from postgres import postgres_server, postgres_url  # noqa: F401


@pytest.fixture(autouse=True)
def _stores_closed(monkeypatch: pytest.MonkeyPatch):
    """Every feedback store a test opens (often inside create_app) is closed after it: its writer is
    stopped and its connections closed. Left to the garbage collector, pooled sqlite3 connections raise
    ResourceWarning on Python 3.13, in whatever test runs then. The writer and the engine are kept, not
    the store, which a test may drop on purpose (neither refers to it)."""
    opened = []
    init = FeedbackStore.__init__

    def tracked(self: FeedbackStore, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        opened.append((self.served, self.engine))

    monkeypatch.setattr(FeedbackStore, "__init__", tracked)
    yield
    for served, engine in opened:
        served.close()
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'data' / 'd3k2.sqlite3'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def store(db_url: str) -> Iterator[FeedbackStore]:
    s = FeedbackStore(db_url, clock=fixed_clock())
    s.migrate()
    yield s
    s.close()
