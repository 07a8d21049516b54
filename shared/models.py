"""SQLAlchemy 2 models: the PostgreSQL schema (migrations in ``shared/migrations``)."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    literal_column,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """Declarative base of every table."""


class Role(enum.StrEnum):
    """What a member may do in an account."""

    ADMIN = "admin"
    MEMBER = "member"


#: Order statuses, in the order the report's filter form lists them.
ORDER_STATUSES = ("pending", "paid", "fulfilled", "refunded", "canceled")
#: Sales channels, in the order the report's filter form lists them.
ORDER_CHANNELS = ("web", "pos", "marketplace", "phone")


#: The text the report's ``q`` filter searches: the three fields joined by a unit separator
#: (U+001F), which ``q`` may not contain, so a match never spans two fields. A pg_trgm GIN index
#: on exactly this expression (``orders_search_trgm_idx``) serves the ``LIKE '%q%'``
#: (docs/performance.md); bulk seeding builds it after the load (shared/seeding.py). Written as
#: PostgreSQL prints it back, so Alembic compares the index cleanly.
ORDER_SEARCH_DOCUMENT_SQL = (
    "lower((((number || chr(31)) || customer_name) || chr(31)) || customer_email)"
)
#: Name of the trigram index on the search document.
ORDER_SEARCH_INDEX = "orders_search_trgm_idx"
#: Statistics target of the search document (PostgreSQL's default is 100). The planner guesses
#: how many orders match ``LIKE '%q%'`` from the document's histogram: with 101 bounds, one
#: sampled match of a rare search (``q=a-0499``, 100 orders of 500k) reads as 1 order in 100,
#: and the planner walks a sort's index filtering every order instead of sorting the few the
#: trigram index finds (0.3-1.4 s instead of 2 ms, after about 1 ANALYZE in 30). With 1,001
#: bounds the same sample reads as 1 in 1,000, which keeps the trigram plan; ANALYZE then
#: samples 300,000 rows instead of 30,000 (docs/performance.md). Migration 0007 sets it; a
#: rebuilt index (shared.seeding.build_search_indexes) gets it again.
ORDER_SEARCH_STATISTICS = 1000
#: Trigram index on the lowercased order number alone: the part of a ``q`` search that the
#: distinct customers (:class:`OrderSearchTerm`) do not answer. Same statistics target.
ORDER_NUMBER_INDEX = "orders_number_trgm_idx"
#: B-tree indexes the report reads for the customers a search found (``= ANY(...)``).
ORDER_EMAIL_INDEX = "orders_account_customer_email_idx"
ORDER_NAME_INDEX = "orders_account_customer_name_idx"
#: Every index of orders that serves ``q`` (bulk seeding drops and rebuilds them all).
ORDER_SEARCH_INDEXES = (ORDER_SEARCH_INDEX, ORDER_NUMBER_INDEX, ORDER_EMAIL_INDEX, ORDER_NAME_INDEX)
#: The expression indexes that get :data:`ORDER_SEARCH_STATISTICS`.
ORDER_SEARCH_STATISTICS_INDEXES = (ORDER_SEARCH_INDEX, ORDER_NUMBER_INDEX)
#: What an :class:`OrderSearchTerm` holds: a customer name or a customer email.
SEARCH_TERM_KINDS = ("name", "email")


def _now() -> Mapped[dt.datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class Account(Base):
    """A customer of ours; everything else hangs off an account."""

    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    slug: Mapped[str] = mapped_column(String(63), nullable=False, unique=True)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    timezone: Mapped[str] = mapped_column(Text, nullable=False, server_default="UTC")
    created_at: Mapped[dt.datetime] = _now()

    __table_args__ = (CheckConstraint("slug ~ '^[a-z0-9][a-z0-9-]*$'", name="slug_format"),)


class User(Base):
    """A person who logs in; email is unique case-insensitively."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    email: Mapped[str] = mapped_column(Text, nullable=False)
    display_name: Mapped[str] = mapped_column(Text, nullable=False)
    password_hash: Mapped[str] = mapped_column(Text, nullable=False)
    is_active: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("true"))
    created_at: Mapped[dt.datetime] = _now()

    __table_args__ = (Index("users_email_key", func.lower(email), unique=True),)


class Membership(Base):
    """A user's role in an account."""

    __tablename__ = "memberships"

    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    role: Mapped[Role] = mapped_column(
        Enum(Role, name="member_role", values_callable=lambda e: [m.value for m in e]),
        nullable=False,
    )
    created_at: Mapped[dt.datetime] = _now()


class ApiToken(Base):
    """A bearer token; only its SHA-256 digest is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True
    )
    token_sha256: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    created_at: Mapped[dt.datetime] = _now()
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    #: The token's first characters (``oex_`` + 8), to tell tokens apart in listings.
    prefix: Mapped[str | None] = mapped_column(Text)
    #: After this the token is refused (None: never expires).
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class WebSession(Base):
    """A browser session; the cookie carries a random id, only its SHA-256 is stored."""

    __tablename__ = "web_sessions"

    id_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True
    )
    created_at: Mapped[dt.datetime] = _now()
    last_seen_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now(), index=True
    )


class Order(Base):
    """One order of an account: the rows of the orders report."""

    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False
    )
    number: Mapped[str] = mapped_column(Text, nullable=False)
    placed_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    customer_name: Mapped[str] = mapped_column(Text, nullable=False)
    customer_email: Mapped[str] = mapped_column(Text, nullable=False)
    status: Mapped[str] = mapped_column(Text, nullable=False)
    channel: Mapped[str] = mapped_column(Text, nullable=False)
    items_count: Mapped[int] = mapped_column(Integer, nullable=False)
    subtotal: Mapped[Decimal] = mapped_column(Numeric(12, 2), nullable=False)
    tax: Mapped[Decimal] = mapped_column(Numeric(12, 2), nullable=False)
    shipping: Mapped[Decimal] = mapped_column(Numeric(12, 2), nullable=False)
    total: Mapped[Decimal] = mapped_column(Numeric(12, 2), nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)

    __table_args__ = (
        UniqueConstraint("account_id", "number", name="orders_account_number_key"),
        CheckConstraint(
            "status IN ('pending', 'paid', 'fulfilled', 'refunded', 'canceled')",
            name="status_known",
        ),
        CheckConstraint("channel IN ('web', 'pos', 'marketplace', 'phone')", name="channel_known"),
        CheckConstraint("currency ~ '^[A-Z]{3}$'", name="currency_iso"),
        # One index per report sort (keyset pagination walks them in either direction).
        Index("orders_account_placed_at_idx", "account_id", "placed_at", "id"),
        Index("orders_account_total_idx", "account_id", "total", "id"),
        # The number sort uses orders_account_number_key (numbers are unique per account).
        # The ``q`` search: trigrams of the search document (pg_trgm, migration 0005).
        Index(
            ORDER_SEARCH_INDEX,
            literal_column(ORDER_SEARCH_DOCUMENT_SQL).label("search_document"),
            postgresql_using="gin",
            postgresql_ops={"search_document": "gin_trgm_ops"},
        ),
        # A search's number part, and the orders of the customers it found (migration 0008).
        Index(
            ORDER_NUMBER_INDEX,
            literal_column("lower(number)").label("search_number"),
            postgresql_using="gin",
            postgresql_ops={"search_number": "gin_trgm_ops"},
        ),
        Index(ORDER_EMAIL_INDEX, "account_id", "customer_email"),
        Index(ORDER_NAME_INDEX, "account_id", "customer_name"),
    )


class OrderSearchTerm(Base):
    """A distinct customer name or email among an account's orders, for the report's ``q``.

    An account of millions of orders has tens of thousands of customers: a search looks for the
    matching names and emails here (trigram index) and then reads their orders through the
    B-tree indexes, instead of walking the posting lists of trigrams every order shares
    (``customer``, ``example.test``). A statement trigger on orders adds the names and emails
    of every INSERT and UPDATE in the same transaction (migration 0008); nothing removes them,
    so a term may name a customer with no orders left, which matches nothing.
    """

    __tablename__ = "order_search_terms"

    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    kind: Mapped[str] = mapped_column(Text, primary_key=True)
    value: Mapped[str] = mapped_column(Text, primary_key=True)

    __table_args__ = (
        CheckConstraint(
            "kind IN (" + ", ".join(f"'{kind}'" for kind in SEARCH_TERM_KINDS) + ")",
            name="kind_known",
        ),
        Index(
            "order_search_terms_trgm_idx",
            literal_column("lower(value)").label("search_value"),
            postgresql_using="gin",
            postgresql_ops={"search_value": "gin_trgm_ops"},
        ),
    )


class FeatureFlag(Base):
    """A rollout switch (``exports_enabled``, ``workers_paused``), changed with the CLI."""

    __tablename__ = "feature_flags"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False)
    updated_at: Mapped[dt.datetime] = _now()


class StrayObject(Base):
    """A stored object no export may ever point to (the file of an attempt whose worker died or
    whose export was canceled), recorded in the transaction that made it so; housekeeping
    deletes the object, then the row (``Maintenance.sweep``)."""

    __tablename__ = "stray_objects"

    key: Mapped[str] = mapped_column(Text, primary_key=True)
    export_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    recorded_at: Mapped[dt.datetime] = _now()


class LoginAttempt(Base):
    """A failed (or still running) login check, kept for throttling per email and per client."""

    __tablename__ = "login_failures"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    email: Mapped[str] = mapped_column(Text, nullable=False)
    attempted_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now(), index=True
    )
    #: The client address the attempt came from (see TRUSTED_PROXIES).
    client: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("login_failures_email_idx", func.lower(email), "attempted_at"),
        Index("login_failures_client_idx", "client", "attempted_at"),
    )


class ExportState(enum.StrEnum):
    """The states of an export job (edges in ``shared/lifecycle.py``, enforced by a trigger)."""

    QUEUED = "queued"
    RUNNING = "running"
    READY = "ready"
    FAILED = "failed"
    CANCELED = "canceled"
    EXPIRED = "expired"


class ErrorClass(enum.StrEnum):
    """Who can fix a failed export."""

    RETRYABLE = "retryable"  # the system retries; the user may retry too
    USER = "user"  # the user must change something (e.g. narrower filters)
    ENGINEERING = "engineering"  # a bug or misconfiguration; contact support


_export_state = Enum(
    ExportState, name="export_state", values_callable=lambda e: [m.value for m in e]
)


class ExportJob(Base):
    """One export: the filter snapshot, its state, progress, file and error."""

    __tablename__ = "export_jobs"

    id: Mapped[uuid.UUID] = mapped_column(
        Uuid, primary_key=True, server_default=text("gen_random_uuid()")
    )
    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False
    )
    requested_by: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    )
    state: Mapped[ExportState] = mapped_column(_export_state, nullable=False)
    #: The normalized filter snapshot (``OrderFilters.to_snapshot()``), and its digest for dedupe.
    filters: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    filters_digest: Mapped[str] = mapped_column(String(64), nullable=False)
    column_set_version: Mapped[int] = mapped_column(Integer, nullable=False)
    timezone: Mapped[str] = mapped_column(Text, nullable=False)
    utf8_bom: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))
    #: ``options.compression``: "none" or "gzip" (the stored file is gzip-compressed).
    compression: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'none'"))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))

    rows_estimate: Mapped[int | None] = mapped_column(BigInteger)
    rows_written: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    row_count: Mapped[int | None] = mapped_column(BigInteger)

    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(Integer, nullable=False)
    worker_id: Mapped[str | None] = mapped_column(Text)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    #: Last time a work message was sent for this job (the sweeper re-sends lost ones).
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    created_at: Mapped[dt.datetime] = _now()
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    error_code: Mapped[str | None] = mapped_column(Text)
    error_message: Mapped[str | None] = mapped_column(Text)
    error_class: Mapped[ErrorClass | None] = mapped_column(
        Enum(ErrorClass, name="export_error_class", values_callable=lambda e: [m.value for m in e])
    )

    #: The object key the latest attempt writes (set when it is claimed): the transaction that
    #: takes the export from that attempt (rescue, cancel) records it in ``stray_objects``.
    attempt_key: Mapped[str | None] = mapped_column(Text)
    storage_key: Mapped[str | None] = mapped_column(Text)
    file_name: Mapped[str | None] = mapped_column(Text)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    #: When and by whom (the name shown, as it was then) the file was deleted before its expiry.
    file_deleted_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    file_deleted_by: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("export_jobs_account_created_idx", "account_id", "created_at"),
        Index("export_jobs_state_idx", "state", "created_at"),
        # One in-flight export per user and filter set: duplicates get the existing one.
        Index(
            "export_jobs_inflight_key",
            "requested_by",
            "account_id",
            "filters_digest",
            unique=True,
            postgresql_where=text("state IN ('queued', 'running')"),
        ),
        Index("export_jobs_idempotency_key", "requested_by", "idempotency_key", unique=True),
        CheckConstraint("attempts >= 0 AND attempts <= max_attempts", name="attempts_bounded"),
        CheckConstraint("compression IN ('none', 'gzip')", name="compression_known"),
    )


class ExportTransition(Base):
    """History of every state change of an export (written by the database trigger)."""

    __tablename__ = "export_transitions"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    export_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("export_jobs.id", ondelete="CASCADE"), nullable=False, index=True
    )
    from_state: Mapped[ExportState | None] = mapped_column(_export_state)
    to_state: Mapped[ExportState] = mapped_column(_export_state, nullable=False)
    actor: Mapped[str] = mapped_column(Text, nullable=False)
    detail: Mapped[str | None] = mapped_column(Text)
    at: Mapped[dt.datetime] = _now()


class OutboxMessage(Base):
    """An event to publish to Kafka, written in the transaction that caused it."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    topic: Mapped[str] = mapped_column(Text, nullable=False)
    key: Mapped[str] = mapped_column(Text, nullable=False)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    created_at: Mapped[dt.datetime] = _now()
    published_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("outbox_pending_idx", "id", postgresql_where=text("published_at IS NULL")),
    )


class NotificationStatus(enum.StrEnum):
    """What became of one email (the ``notifications.status`` column)."""

    PENDING = "pending"  # not sent yet: new, or transient failures behind it (retried)
    SENT = "sent"
    SKIPPED = "skipped"  # deliberately not sent (e.g. the requester is no longer an admin)
    FAILED = "failed"  # can never be delivered; given up for good


class Notification(Base):
    """One email per export and kind; the unique key makes redelivered events harmless."""

    __tablename__ = "notifications"

    export_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("export_jobs.id", ondelete="CASCADE"), primary_key=True
    )
    kind: Mapped[str] = mapped_column(Text, primary_key=True)
    recipient: Mapped[str] = mapped_column(Text, nullable=False)
    event_id: Mapped[str] = mapped_column(Text, nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    #: A :class:`NotificationStatus`: pending until sent, skipped or failed for good.
    status: Mapped[str] = mapped_column(
        Text, nullable=False, server_default=text(f"'{NotificationStatus.PENDING}'")
    )
    #: Why it is not sent: the last delivery error (pending, failed) or the skip reason.
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = _now()
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint("kind IN ('ready', 'failed')", name="kind_known"),
        CheckConstraint("status IN ('pending', 'sent', 'skipped', 'failed')", name="status_known"),
    )


class DownloadAttempt(Base):
    """Audit trail: every download attempt and its outcome."""

    __tablename__ = "download_attempts"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    export_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, index=True)
    user_id: Mapped[int | None] = mapped_column(BigInteger)
    outcome: Mapped[str] = mapped_column(Text, nullable=False)
    client_ip: Mapped[str | None] = mapped_column(Text)
    #: The range served, ``A-B`` (inclusive byte offsets), when the request was ranged.
    byte_range: Mapped[str | None] = mapped_column(Text)
    #: True when the API answered with a redirect to storage (it carried no bytes itself).
    redirect: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))
    at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now(), index=True
    )
