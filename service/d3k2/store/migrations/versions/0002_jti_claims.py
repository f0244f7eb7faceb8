"""Bearer-token ids (jti) seen, shared by every instance that uses this database.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # key: sha256 hex of "iss\njti" (d3k2.http.jti); expires: Unix seconds, after which the key is free.
    op.create_table(
        "jti_claims",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("expires", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_jti_claims_expires", "jti_claims", ["expires"])


def downgrade() -> None:
    op.drop_table("jti_claims")
