"""The deployment's secret for card uuids (d3k2.core.cards.card_uuid), kept in the feedback database.

Every instance that shares the database derives the same uuid for the same card, so the key must be
shared too: ``D3K2_CARD_KEY`` (from the environment: a Kubernetes Secret, a vault) when it is set, else
one random key created in the database's ``deployment_keys`` table by the first instance that needs it
(an insert that a concurrent instance's insert cannot override: both read back the one stored).
"""

from __future__ import annotations

import secrets

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from d3k2.core.errors import D3K2Error
from d3k2.store.schema import deployment_keys

CARD_UUID_KEY = "card-uuid"
KEY_BYTES = 32


def card_key(connection: Connection) -> bytes:
    """The stored key, created (random, 32 bytes) when there is none yet."""
    stored = _read(connection)
    if stored is None:
        row = {"name": CARD_UUID_KEY, "value": secrets.token_hex(KEY_BYTES)}
        if connection.dialect.name == "postgresql":
            connection.execute(postgresql.insert(deployment_keys).on_conflict_do_nothing(), row)
        elif connection.dialect.name == "sqlite":
            connection.execute(sqlite.insert(deployment_keys).on_conflict_do_nothing(), row)
        else:
            raise D3K2Error(f"unsupported database {connection.dialect.name!r}: use SQLite or PostgreSQL")
        stored = _read(connection)
    assert stored is not None  # inserted now, or by another instance a moment ago
    return bytes.fromhex(stored)


def _read(connection: Connection) -> str | None:
    query = select(deployment_keys.c.value).where(deployment_keys.c.name == CARD_UUID_KEY)
    value: str | None = connection.execute(query).scalar_one_or_none()
    return value
