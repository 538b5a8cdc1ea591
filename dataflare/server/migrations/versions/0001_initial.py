"""The store's first schema: workflows, revisions, runs, audit.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the tables."""
    op.create_table(
        "workflows",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("name", sa.String(400), nullable=True),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("scheduled_until", TS, nullable=True),
    )
    op.create_table(
        "revisions",
        sa.Column("workflow_id", sa.String(200), sa.ForeignKey("workflows.id"),
                  primary_key=True),
        sa.Column("number", sa.Integer, primary_key=True),
        sa.Column("yaml", sa.Text, nullable=False),
        sa.Column("author", sa.String(200), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("workflow_id", sa.String(200), sa.ForeignKey("workflows.id"),
                  nullable=False),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("trigger", sa.String(20), nullable=False),
        sa.Column("scheduled_for", TS, nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("not_before", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("ended_at", TS, nullable=True),
        sa.Column("worker", sa.String(200), nullable=True),
        sa.Column("lease_until", TS, nullable=True),
        sa.Column("stop_requested", sa.Boolean, nullable=False),
        sa.Column("summary", sa.Text, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("log", sa.Text, nullable=True),
        sa.Column("actions", sa.Text, nullable=True),
        sa.Column("parent_run", sa.String(32), nullable=True),
        sa.UniqueConstraint("workflow_id", "scheduled_for", name="one_run_per_instant"),
    )
    op.create_index("runs_by_status", "runs", ["status", "not_before"])
    op.create_index("runs_by_workflow", "runs", ["workflow_id", "created_at"])
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", TS, nullable=False),
        sa.Column("user", sa.String(200), nullable=False),
        sa.Column("action", sa.String(100), nullable=False),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("revision", sa.Integer, nullable=True),
        sa.Column("detail", sa.Text, nullable=True),
    )


def downgrade() -> None:
    """Drop the tables."""
    op.drop_table("audit")
    op.drop_table("runs")
    op.drop_table("revisions")
    op.drop_table("workflows")
