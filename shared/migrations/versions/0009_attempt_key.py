"""export_jobs.attempt_key: the object key the latest attempt writes, recorded at its claim

A worker killed after its upload and before its ready commit left a complete file that nothing
pointed to (customer data kept until the bucket's lifecycle rule, never on local storage). With
the key recorded when the attempt is claimed, housekeeping deletes exactly that file when it
rescues the job, and nothing a later attempt writes.
"""

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"


def upgrade() -> None:
    op.add_column("export_jobs", sa.Column("attempt_key", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("export_jobs", "attempt_key")
