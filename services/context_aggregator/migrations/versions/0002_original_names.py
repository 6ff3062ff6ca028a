"""vm_contexts under the original appliance's names (vmware_vm_id, cpu_count, last_job_at), with the
inventory's vcenter_host, os_type and power_state; the scheduler's fields and vma_sync_type on jobs;
the base change id in cbt_history

Revision ID: context_aggregator_0002
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "context_aggregator_0002"
down_revision = "context_aggregator_0001"

Stamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=3), "mysql", "mariadb")
RENAMES = (("vm_id", "vmware_vm_id", sa.String(255), True), ("cpus", "cpu_count", sa.Integer(), True))
CONTEXT_COLUMNS = (("vcenter_host", 255), ("os_type", 128), ("power_state", 32))
JOB_COLUMNS = (("vma_sync_type", 16), ("schedule_execution_id", 255), ("vm_group_id", 255),
               ("scheduled_by", 255), ("existing_context_id", 255))


def upgrade() -> None:
    with op.batch_alter_table("vm_contexts") as batch:
        for old, new, type_, nullable in RENAMES:
            batch.alter_column(old, new_column_name=new, existing_type=type_, existing_nullable=nullable)
        # Was the newest event of any kind; now the newest job event (NULL until the VM has a job).
        batch.alter_column("last_event_at", new_column_name="last_job_at", existing_type=Stamp,
                           existing_nullable=False, nullable=True)
        for name, length in CONTEXT_COLUMNS:
            batch.add_column(sa.Column(name, sa.String(length), nullable=True))
    op.execute("UPDATE vm_contexts SET last_job_at = NULL WHERE current_job_id IS NULL")
    with op.batch_alter_table("context_jobs") as batch:
        for name, length in JOB_COLUMNS:
            batch.add_column(sa.Column(name, sa.String(length), nullable=True))
    with op.batch_alter_table("cbt_history") as batch:
        batch.add_column(sa.Column("previous_change_id", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("cbt_history") as batch:
        batch.drop_column("previous_change_id")
    with op.batch_alter_table("context_jobs") as batch:
        for name, _ in reversed(JOB_COLUMNS):
            batch.drop_column(name)
    op.execute("UPDATE vm_contexts SET last_job_at = updated_at WHERE last_job_at IS NULL")
    with op.batch_alter_table("vm_contexts") as batch:
        for name, _ in reversed(CONTEXT_COLUMNS):
            batch.drop_column(name)
        batch.alter_column("last_job_at", new_column_name="last_event_at", existing_type=Stamp,
                           existing_nullable=True, nullable=False)
        for old, new, type_, nullable in RENAMES:
            batch.alter_column(new, new_column_name=old, existing_type=type_, existing_nullable=nullable)
