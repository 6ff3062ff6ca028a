"""schedules: cron, window, jitter (interval optional); protection_groups: vm_filter, defaults

Revision ID: scheduler_0002
"""
import sqlalchemy as sa
from alembic import op

revision = "scheduler_0002"
down_revision = "scheduler_0001"


def upgrade() -> None:
    with op.batch_alter_table("schedules") as t:
        t.alter_column("interval_seconds", existing_type=sa.Integer, nullable=True)
        t.add_column(sa.Column("cron", sa.String(255), nullable=True))
        t.add_column(sa.Column("window_start", sa.String(5), nullable=True))
        t.add_column(sa.Column("window_end", sa.String(5), nullable=True))
        t.add_column(sa.Column("jitter_seconds", sa.Integer, nullable=False, server_default="0"))
    with op.batch_alter_table("protection_groups") as t:
        t.add_column(sa.Column("vm_filter", sa.Text, nullable=True))
        t.add_column(sa.Column("defaults", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("protection_groups") as t:
        t.drop_column("defaults")
        t.drop_column("vm_filter")
    with op.batch_alter_table("schedules") as t:
        for c in ("jitter_seconds", "window_end", "window_start", "cron"):
            t.drop_column(c)
        t.alter_column("interval_seconds", existing_type=sa.Integer, nullable=False)
