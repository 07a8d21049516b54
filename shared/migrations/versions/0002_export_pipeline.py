"""export pipeline"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"

# The export state machine, enforced by the database: any UPDATE that changes state along an
# edge not listed here fails (SQLSTATE OE001), whatever code issued it. shared/lifecycle.py holds
# the same edges; tests/integration/test_job_states.py checks that the two agree.
TRANSITION_CHECK = """
CREATE FUNCTION export_jobs_transition_check() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.state <> 'queued' THEN
            RAISE EXCEPTION 'export % must start queued, not %', NEW.id, NEW.state
                USING ERRCODE = 'OE001';
        END IF;
    ELSIF NEW.state IS DISTINCT FROM OLD.state AND (OLD.state::text, NEW.state::text) NOT IN (
        ('queued', 'running'), ('queued', 'canceled'),
        ('running', 'ready'), ('running', 'failed'), ('running', 'canceled'), ('running', 'queued'),
        ('failed', 'queued'), ('canceled', 'queued'), ('expired', 'queued'),
        ('ready', 'expired')
    ) THEN
        RAISE EXCEPTION 'export % cannot go from % to %', NEW.id, OLD.state, NEW.state
            USING ERRCODE = 'OE001';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER export_jobs_transition_check BEFORE INSERT OR UPDATE OF state ON export_jobs
    FOR EACH ROW EXECUTE FUNCTION export_jobs_transition_check();
"""

# Every state change lands in export_transitions with the actor and detail that the writing
# transaction declared with SET LOCAL orders_export.actor / orders_export.detail.
TRANSITION_HISTORY = """
CREATE FUNCTION export_jobs_history() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.state IS DISTINCT FROM OLD.state THEN
        INSERT INTO export_transitions (export_id, from_state, to_state, actor, detail)
        VALUES (
            NEW.id,
            CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE OLD.state END,
            NEW.state,
            coalesce(nullif(current_setting('orders_export.actor', true), ''), current_user),
            nullif(current_setting('orders_export.detail', true), '')
        );
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER export_jobs_history AFTER INSERT OR UPDATE OF state ON export_jobs
    FOR EACH ROW EXECUTE FUNCTION export_jobs_history();
"""

# Wakes the outbox relay (LISTEN outbox) as soon as a transaction with new events commits.
OUTBOX_NOTIFY = """
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
"""


def upgrade() -> None:
    op.create_table(
        "download_attempts",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("export_id", sa.Uuid(), nullable=True),
        sa.Column("user_id", sa.BigInteger(), nullable=True),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("client_ip", sa.Text(), nullable=True),
        sa.Column(
            "at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        op.f("ix_download_attempts_export_id"), "download_attempts", ["export_id"], unique=False
    )
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "outbox_pending_idx",
        "outbox",
        ["id"],
        unique=False,
        postgresql_where=sa.text("published_at IS NULL"),
    )
    op.create_table(
        "export_jobs",
        sa.Column("id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("requested_by", sa.BigInteger(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "queued", "running", "ready", "failed", "canceled", "expired", name="export_state"
            ),
            nullable=False,
        ),
        sa.Column("filters", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("filters_digest", sa.String(length=64), nullable=False),
        sa.Column("column_set_version", sa.Integer(), nullable=False),
        sa.Column("timezone", sa.Text(), nullable=False),
        sa.Column("utf8_bom", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("rows_estimate", sa.BigInteger(), nullable=True),
        sa.Column("rows_written", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("row_count", sa.BigInteger(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.Text(), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error_code", sa.Text(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column(
            "error_class",
            sa.Enum("retryable", "user", "engineering", name="export_error_class"),
            nullable=True,
        ),
        sa.Column("storage_key", sa.Text(), nullable=True),
        sa.Column("file_name", sa.Text(), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.CheckConstraint("attempts >= 0 AND attempts <= max_attempts", name="attempts_bounded"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["requested_by"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "export_jobs_account_created_idx", "export_jobs", ["account_id", "created_at"], unique=False
    )
    op.create_index(
        "export_jobs_idempotency_key",
        "export_jobs",
        ["requested_by", "idempotency_key"],
        unique=True,
    )
    op.create_index(
        "export_jobs_inflight_key",
        "export_jobs",
        ["requested_by", "account_id", "filters_digest"],
        unique=True,
        postgresql_where=sa.text("state IN ('queued', 'running')"),
    )
    op.create_index("export_jobs_state_idx", "export_jobs", ["state", "created_at"], unique=False)
    op.create_table(
        "export_transitions",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("export_id", sa.Uuid(), nullable=False),
        sa.Column(
            "from_state",
            sa.Enum(
                "queued", "running", "ready", "failed", "canceled", "expired", name="export_state"
            ),
            nullable=True,
        ),
        sa.Column(
            "to_state",
            sa.Enum(
                "queued", "running", "ready", "failed", "canceled", "expired", name="export_state"
            ),
            nullable=False,
        ),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column(
            "at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.ForeignKeyConstraint(["export_id"], ["export_jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        op.f("ix_export_transitions_export_id"), "export_transitions", ["export_id"], unique=False
    )
    op.create_table(
        "notifications",
        sa.Column("export_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("recipient", sa.Text(), nullable=False),
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("kind IN ('ready', 'failed')", name="kind_known"),
        sa.ForeignKeyConstraint(["export_id"], ["export_jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("export_id", "kind"),
    )
    op.execute(TRANSITION_CHECK)
    op.execute(TRANSITION_HISTORY)
    op.execute(OUTBOX_NOTIFY)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS outbox_notify ON outbox")
    op.execute("DROP FUNCTION IF EXISTS outbox_notify()")
    op.execute("DROP TRIGGER IF EXISTS export_jobs_history ON export_jobs")
    op.execute("DROP FUNCTION IF EXISTS export_jobs_history()")
    op.execute("DROP TRIGGER IF EXISTS export_jobs_transition_check ON export_jobs")
    op.execute("DROP FUNCTION IF EXISTS export_jobs_transition_check()")
    op.drop_table("notifications")
    op.drop_index(op.f("ix_export_transitions_export_id"), table_name="export_transitions")
    op.drop_table("export_transitions")
    op.drop_index("export_jobs_state_idx", table_name="export_jobs")
    op.drop_index(
        "export_jobs_inflight_key",
        table_name="export_jobs",
        postgresql_where=sa.text("state IN ('queued', 'running')"),
    )
    op.drop_index("export_jobs_idempotency_key", table_name="export_jobs")
    op.drop_index("export_jobs_account_created_idx", table_name="export_jobs")
    op.drop_table("export_jobs")
    op.drop_index(
        "outbox_pending_idx", table_name="outbox", postgresql_where=sa.text("published_at IS NULL")
    )
    op.drop_table("outbox")
    op.drop_index(op.f("ix_download_attempts_export_id"), table_name="download_attempts")
    op.drop_table("download_attempts")
    sa.Enum(name="export_error_class").drop(op.get_bind())
    sa.Enum(name="export_state").drop(op.get_bind())
