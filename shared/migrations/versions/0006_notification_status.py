"""notifications: a status column (pending, sent, skipped, failed) instead of last_error prefixes"""

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"

#: The prefixes of ``last_error`` that stood for a status before this revision.
SKIPPED_PREFIX = "skipped: "
FAILED_PREFIX = "failed: "


def upgrade() -> None:
    op.add_column(
        "notifications",
        sa.Column("status", sa.Text(), server_default=sa.text("'pending'"), nullable=False),
    )
    op.create_check_constraint(
        "status_known", "notifications", "status IN ('pending', 'sent', 'skipped', 'failed')"
    )
    op.execute("UPDATE notifications SET status = 'sent' WHERE sent_at IS NOT NULL")
    for status, prefix in (("skipped", SKIPPED_PREFIX), ("failed", FAILED_PREFIX)):
        op.execute(
            sa.text(
                "UPDATE notifications SET status = :status,"
                " last_error = substr(last_error, :after)"
                " WHERE sent_at IS NULL AND starts_with(last_error, :prefix)"
            ).bindparams(status=status, prefix=prefix, after=len(prefix) + 1)
        )


def downgrade() -> None:
    for status, prefix in (("skipped", SKIPPED_PREFIX), ("failed", FAILED_PREFIX)):
        op.execute(
            sa.text(
                "UPDATE notifications SET last_error = :prefix || coalesce(last_error, '')"
                " WHERE status = :status"
            ).bindparams(status=status, prefix=prefix)
        )
    op.drop_constraint("status_known", "notifications", type_="check")
    op.drop_column("notifications", "status")
