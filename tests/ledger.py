"""What a running d3k2 acknowledged, to be checked against its database afterwards: nothing acknowledged may
be lost. Feedback: every item of a POST answered 2xx (stored synchronously before the answer). Cards served:
every card of a hook answer answered 200 (written after the answer by the cards-served writer, whose queue a
graceful stop writes out). Items are recorded by card uuid, so each must be unique within a test.

Used by tests/integration/test_feedback_durable.py (the attack: database stopped and frozen, workers killed),
tests/integration/test_two_instances.py and tests/http/test_attack.py.
"""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, text

from d3k2.store.schema import database_url, open_engine


def send(
    base: str, path: str, body: Any, headers: Mapping[str, str] | None = None, timeout: float = 30.0
) -> tuple[int, Any]:
    """POST ``body`` as JSON: the status and the JSON answer; (0, None) when no answer came (connection
    refused or reset, as when the worker answering it is killed)."""
    request = urllib.request.Request(
        f"{base}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        with error:
            return int(error.code), None
    except (OSError, ValueError, http.client.HTTPException):  # URLError, reset, timeout; a body cut short
        return 0, None


@dataclass(frozen=True)
class Lost:
    feedback: list[tuple[str, str]]  # (card uuid, outcome) acknowledged but not in the feedback table
    served: list[str]  # card uuids answered but not in cards_served

    def __bool__(self) -> bool:
        return bool(self.feedback or self.served)


@dataclass
class Ledger:
    """Thread-safe: senders may run in threads."""

    feedback: list[tuple[str, str]] = field(default_factory=list)
    served: list[str] = field(default_factory=list)
    refused: int = 0  # feedback POSTs answered otherwise (503 while the database is down) or not at all
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def feedback_answer(self, status: int, body: Mapping[str, Any]) -> None:
        """One feedback POST's answer: its items count as acknowledged when the status is 2xx."""
        with self._lock:
            if 200 <= status < 300:
                self.feedback += [(item["card"], item["outcome"]) for item in body["feedback"]]
            else:
                self.refused += 1

    def hook_answer(self, status: int, answer: Any) -> None:
        if status == 200:
            with self._lock:
                self.served += [card["uuid"] for card in answer["cards"]]

    def acknowledged(self) -> int:
        with self._lock:
            return len(self.feedback)

    def lost(self, database: str | Engine) -> Lost:
        """What was acknowledged and is not in ``database`` (a URL or an engine)."""
        engine = open_engine(database_url(database)) if isinstance(database, str) else database
        try:
            with engine.connect() as connection:
                rows = connection.execute(text("SELECT card_uuid, outcome FROM feedback")).all()
                stored = {(row[0], row[1]) for row in rows}
                served = {row[0] for row in connection.execute(text("SELECT card_uuid FROM cards_served"))}
        finally:
            if isinstance(database, str):
                engine.dispose()
        with self._lock:
            return Lost(
                feedback=[item for item in self.feedback if item not in stored],
                served=[uuid for uuid in self.served if uuid not in served],
            )
