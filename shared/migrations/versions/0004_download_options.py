"""downloads: compression option, who deleted a file, ranged and redirected attempts"""

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"


def upgrade() -> None:
    op.add_column(
        "export_jobs",
        sa.Column("compression", sa.Text(), server_default=sa.text("'none'"), nullable=False),
    )
    op.create_check_constraint(
        "compression_known", "export_jobs", "compression IN ('none', 'gzip')"
    )
    op.add_column(
        "export_jobs", sa.Column("file_deleted_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("export_jobs", sa.Column("file_deleted_by", sa.Text(), nullable=True))
    op.add_column("download_attempts", sa.Column("byte_range", sa.Text(), nullable=True))
    op.add_column(
        "download_attempts",
        sa.Column("redirect", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )


def downgrade() -> None:
    op.drop_column("download_attempts", "redirect")
    op.drop_column("download_attempts", "byte_range")
    op.drop_column("export_jobs", "file_deleted_by")
    op.drop_column("export_jobs", "file_deleted_at")
    op.drop_constraint("compression_known", "export_jobs", type_="check")
    op.drop_column("export_jobs", "compression")
