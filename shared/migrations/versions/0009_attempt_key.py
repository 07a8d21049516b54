"""export_jobs.attempt_key and stray_objects: the files of dead or canceled attempts are deleted

A worker killed after its upload and before its ready commit left a complete file that nothing
pointed to (customer data kept until the bucket's lifecycle rule, for ever on local storage).
The key an attempt writes is now recorded with its claim (``export_jobs.attempt_key``); the
transaction that takes the export from that attempt (a rescue, a cancel) records the key in
``stray_objects``, and housekeeping deletes those objects, retrying while storage is away.
"""

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"


def upgrade() -> None:
    op.add_column("export_jobs", sa.Column("attempt_key", sa.Text(), nullable=True))
    op.create_table(
        "stray_objects",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("export_id", sa.Uuid(), nullable=True),
        sa.Column(
            "recorded_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("key"),
    )


def downgrade() -> None:
    op.drop_table("stray_objects")
    op.drop_column("export_jobs", "attempt_key")
