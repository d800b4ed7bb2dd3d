"""Revision 0002 (2026-12-07): federated fine-tuning rounds.

A cycle's round plan and state (``plan_json``, ``round``, ``round_model_version``,
``round_deadline``, ``round_versions_json``) and the edges' updates (``round_updates``).
Cycles made before it read as one-shot cycles (no plan, round 0).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from fedinspect.service import UTCDateTime

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "round_updates",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("cycle_id", sa.Integer(), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("edge_id", sa.String(length=32), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("norm", sa.Float(), nullable=False),
        sa.Column("received_at", UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["cycle_id"],
            ["cycles.id"],
        ),
        sa.ForeignKeyConstraint(
            ["edge_id"],
            ["edges.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("cycle_id", "round", "edge_id", name="one_update_per_edge_and_round"),
    )
    with op.batch_alter_table("round_updates", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_round_updates_cycle_id"), ["cycle_id"], unique=False)

    with op.batch_alter_table("cycles", schema=None) as batch_op:
        batch_op.add_column(sa.Column("plan_json", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("round", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("round_model_version", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("round_deadline", UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("round_versions_json", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("cycles", schema=None) as batch_op:
        batch_op.drop_column("round_versions_json")
        batch_op.drop_column("round_deadline")
        batch_op.drop_column("round_model_version")
        batch_op.drop_column("round")
        batch_op.drop_column("plan_json")

    with op.batch_alter_table("round_updates", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_round_updates_cycle_id"))

    op.drop_table("round_updates")
