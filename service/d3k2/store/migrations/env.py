"""Alembic environment for d3k2's feedback store.

Migrations run through ``d3k2.store.schema.upgrade`` (``FeedbackStore.migrate``), which hands its
connection over in ``config.attributes["connection"]``: no alembic.ini and no second way to spell the
database URL.
"""

from __future__ import annotations

from alembic import context

VERSION_TABLE = "d3k2_alembic_version"

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run d3k2 migrations with `d3k2 feedback migrate` (or create_app), not the alembic CLI"
    )

context.configure(
    connection=connection,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
    transaction_per_migration=True,
)
with context.begin_transaction():
    context.run_migrations()
