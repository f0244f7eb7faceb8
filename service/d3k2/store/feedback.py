"""Feedback storage (SQLAlchemy 2): what clinicians did with the cards, and the store that holds it.

``FeedbackStore`` is the one object the app holds: it records feedback synchronously (a POST is answered
only once its items are stored), queues the cards of each answer for the background writer
(d3k2.store.served), answers readiness pings and the governance report (d3k2.store.report). Every
connection is bounded in time (d3k2.store.schema): a database that is down or frozen gives a feedback
POST a 503 within seconds. Feedback names only a card uuid; ``record_feedback`` first has this
process's queued cards written, so feedback that follows an answer of the same process by a
millisecond still finds its card's rule. Feedback on a card served by another worker whose batch is
not written yet is stored without a rule; the report takes the rule from ``cards_served`` then.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from d3k2.core.errors import BadRequest, D3K2Error
from d3k2.core.hooks import FeedbackItem
from d3k2.store.keys import card_key
from d3k2.store.report import Names, Report, query_report
from d3k2.store.schema import (
    MAX_CARD_UUID,
    StoreUnavailable,
    cards_served,
    database_url,
    feedback,
    open_engine,
    transaction,
    upgrade,
    utcnow,
)
from d3k2.store.served import ServedWriter, served_rows

log = logging.getLogger("d3k2.store")


def _parse_time(raw: str | None) -> datetime | None:
    if not raw:
        return None
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def feedback_row(service_id: str, item: FeedbackItem, received_at: datetime) -> dict[str, Any]:
    """One feedback item as a row; ``dedup_key`` hashes everything that makes two items different."""
    if len(item.card) > MAX_CARD_UUID:
        raise BadRequest(f"feedback card must be at most {MAX_CARD_UUID} characters")
    reason = item.overrideReason.reason if item.overrideReason else None
    comment = _text(item.overrideReason.userComment) if item.overrideReason else None
    outcome_at = _parse_time(item.outcomeTimestamp)
    accepted = sorted({suggestion.id for suggestion in item.acceptedSuggestions})
    row = {
        "service_id": service_id,
        "card_uuid": item.card,
        "rule_id": None,
        "outcome": item.outcome,
        "accepted_suggestions": accepted,
        "override_reason_system": _text(reason.system) if reason else None,
        "override_reason_code": _text(reason.code) if reason else None,
        "override_reason_display": _text(reason.display) if reason else None,
        "override_comment": comment,
        "outcome_at": outcome_at,
        "received_at": received_at,
    }
    identity = [
        service_id,
        item.card,
        item.outcome,
        outcome_at.isoformat() if outcome_at else item.outcomeTimestamp,
        accepted,
        row["override_reason_system"],
        row["override_reason_code"],
        comment,
    ]
    row["dedup_key"] = hashlib.sha256(orjson.dumps(identity)).hexdigest()
    return row


@dataclass(frozen=True)
class Stored:
    new: tuple[bool, ...]  # per item: stored now (True) or a duplicate of one stored before (False)

    @property
    def received(self) -> int:
        return len(self.new)

    @property
    def stored(self) -> int:
        return sum(self.new)

    @property
    def duplicates(self) -> int:
        return self.received - self.stored


class FeedbackStore:
    """Thread-safe; one per application. Database failures become StoreUnavailable (HTTP 503).

    ``served_options`` go to the cards-served writer (``ServedWriter``: batch_rows, interval, capacity,
    max_attempts, backoff, ...); ``flush_timeout`` bounds how long feedback and the report wait for a
    batch that the writer is writing. ``card_key`` (D3K2_CARD_KEY) keys the card uuids; None: the key
    stored in the database (d3k2.store.keys), read when the schema is migrated."""

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], datetime] = utcnow,
        pause_after_failure: float = 10.0,
        flush_timeout: float = 2.0,
        served_options: Mapping[str, Any] | None = None,
        card_key: bytes | None = None,
    ) -> None:
        self.url = database_url(url)
        self._card_key = card_key
        self._stand_in_key: bytes | None = None
        self.engine = open_engine(self.url)
        self._clock = clock
        self._pause_after_failure = pause_after_failure
        self._cards_paused_until = 0.0
        self._schema_ready = False
        self._lock = threading.Lock()
        self._flush_timeout = flush_timeout
        self.served = ServedWriter(self.engine, self.ensure_schema, **(served_options or {}))

    @property
    def display_url(self) -> str:
        return self.url.render_as_string(hide_password=True)

    @property
    def sqlite_path(self) -> Path | None:
        if self.url.get_backend_name() != "sqlite" or not self.url.database:
            return None
        return Path(self.url.database)

    @property
    def card_key(self) -> bytes:
        """The deployment's key for card uuids (a hook answer's path: never a database call). Until the
        database has been reached, a random key of this process's own: its cards' uuids then differ from
        other instances' (the report counts such a card once per process), and it says so once."""
        key = self._card_key
        if key is not None:
            return key
        if self._stand_in_key is None:
            self._stand_in_key = secrets.token_bytes(32)
            log.warning("card uuid key not read from the feedback database yet: this process uses its own")
        return self._stand_in_key

    def close(self) -> None:
        """Write the cards served still queued, stop the writer, close the connections."""
        self.served.close()
        self.engine.dispose()

    def flush(self) -> bool:
        """Have this process's queued cards served written now; True when all of them are in the database."""
        return self.served.flush(self._flush_timeout)

    def migrate(self) -> None:
        """Upgrade the schema to the newest migration (a no-op when it is there already)."""
        with self._lock, transaction(self.engine) as connection:
            upgrade(connection)
            if self._card_key is None:
                self._card_key = card_key(connection)
            self._schema_ready = True

    def ensure_schema(self) -> None:
        """Migrate once; a database that was down at startup is migrated when it comes back."""
        if not self._schema_ready:
            self.migrate()

    def ping(self) -> None:
        self.ensure_schema()
        with transaction(self.engine) as connection:
            connection.execute(select(func.count()).select_from(cards_served).where(cards_served.c.id < 0))

    def enqueue_cards(
        self, service_id: str, cards: Sequence[Mapping[str, Any]], served_at: datetime | None = None
    ) -> int:
        """Queue the cards of one answer for the background writer (the hook answer's path): never
        touches the database, never raises for it. The number of rows queued (0: none, or dropped)."""
        rows = served_rows(service_id, cards, served_at or self._clock())
        return len(rows) if rows and self.served.enqueue(rows) else 0

    def record_cards(
        self, service_id: str, cards: Sequence[Mapping[str, Any]], served_at: datetime | None = None
    ) -> int:
        """Insert now, synchronously (tools and tests; answers use ``enqueue_cards``). After a
        failure, recording pauses briefly so that a database that hangs cannot add its connect timeout
        to every call."""
        rows = served_rows(service_id, cards, served_at or self._clock())
        if not rows:
            return 0
        if time.monotonic() < self._cards_paused_until:
            raise StoreUnavailable("card recording is paused after a database failure")
        try:
            self.ensure_schema()
            with transaction(self.engine) as connection:
                connection.execute(insert(cards_served), rows)
        except StoreUnavailable:
            self._cards_paused_until = time.monotonic() + self._pause_after_failure
            raise
        return len(rows)

    def record_feedback(
        self, service_id: str, items: Sequence[FeedbackItem], received_at: datetime | None = None
    ) -> Stored:
        """Store each item once: an item already stored (same card, outcome, time, suggestions, reason)
        is a duplicate and is skipped."""
        now = received_at or self._clock()
        rows = [feedback_row(service_id, item, now) for item in items]
        self.ensure_schema()
        # The card may have been served a moment ago by this process: its row must be there to look up.
        self.flush()
        new: list[bool] = []
        with transaction(self.engine) as connection:
            cards = {row["card_uuid"] for row in rows}
            rules = dict(
                connection.execute(
                    select(cards_served.c.card_uuid, cards_served.c.rule_id)
                    .where(cards_served.c.card_uuid.in_(cards))
                    .distinct()
                ).all()
            )
            statement = self._insert_ignoring_duplicates(connection)
            for row in rows:
                row["rule_id"] = rules.get(row["card_uuid"])
                new.append(connection.execute(statement, row).first() is not None)
        return Stored(tuple(new))

    def _insert_ignoring_duplicates(self, connection: Connection) -> Any:
        # RETURNING tells a stored row from a skipped duplicate on both backends (rowcount does not).
        if connection.dialect.name == "postgresql":
            on_pg = postgresql.insert(feedback).on_conflict_do_nothing(index_elements=["dedup_key"])
            return on_pg.returning(feedback.c.id)
        if connection.dialect.name == "sqlite":
            on_sqlite = sqlite.insert(feedback).on_conflict_do_nothing(index_elements=["dedup_key"])
            return on_sqlite.returning(feedback.c.id)
        raise D3K2Error(f"unsupported database {connection.dialect.name!r}: use SQLite or PostgreSQL")

    def report(self, since: datetime | None = None, names: Names | None = None) -> Report:
        """The governance report (d3k2.store.report.query_report), with this process's queue written."""
        self.ensure_schema()
        self.flush()
        with transaction(self.engine) as connection:
            return query_report(connection, since, names)
