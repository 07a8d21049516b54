"""security hardening: server-side sessions, token expiry, per-client login throttle, pruning"""

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"


def upgrade() -> None:
    op.create_table(
        "web_sessions",
        sa.Column("id_sha256", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "last_seen_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id_sha256"),
    )
    op.create_index(op.f("ix_web_sessions_user_id"), "web_sessions", ["user_id"], unique=False)
    op.create_index(
        op.f("ix_web_sessions_last_seen_at"), "web_sessions", ["last_seen_at"], unique=False
    )
    op.add_column("api_tokens", sa.Column("prefix", sa.Text(), nullable=True))
    op.add_column("api_tokens", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("login_failures", sa.Column("client", sa.Text(), nullable=True))
    op.create_index(
        "login_failures_client_idx", "login_failures", ["client", "attempted_at"], unique=False
    )
    op.create_index(
        op.f("ix_login_failures_attempted_at"), "login_failures", ["attempted_at"], unique=False
    )
    op.create_index(op.f("ix_download_attempts_at"), "download_attempts", ["at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_download_attempts_at"), table_name="download_attempts")
    op.drop_index(op.f("ix_login_failures_attempted_at"), table_name="login_failures")
    op.drop_index("login_failures_client_idx", table_name="login_failures")
    op.drop_column("login_failures", "client")
    op.drop_column("api_tokens", "expires_at")
    op.drop_column("api_tokens", "prefix")
    op.drop_index(op.f("ix_web_sessions_last_seen_at"), table_name="web_sessions")
    op.drop_index(op.f("ix_web_sessions_user_id"), table_name="web_sessions")
    op.drop_table("web_sessions")
