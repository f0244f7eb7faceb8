"""The deployment's card-uuid key, shared by every instance that uses this database.

Revision ID: 0003_card_uuid_key
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_card_uuid_key"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # name: what the secret is for ("card-uuid"); value: hex. Written once by d3k2.store.keys.
    op.create_table(
        "deployment_keys",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(128), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("deployment_keys")
