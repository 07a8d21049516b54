"""SQLAlchemy 2 models: the PostgreSQL schema (migrations in ``shared/migrations``)."""

from __future__ import annotations

import datetime as dt
import enum
from decimal import Decimal

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
    func,
    text,
)
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
#: (U+001F), which ``q`` may not contain, so a match never spans two fields. No trigram index
#: backs it: keeping one up to date made bulk inserts 3x slower (docs/architecture.md).
ORDER_SEARCH_DOCUMENT_SQL = "lower(number || chr(31) || customer_name || chr(31) || customer_email)"


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
    )


class FeatureFlag(Base):
    """A rollout switch (``exports_enabled``, ``workers_paused``), changed with the CLI."""

    __tablename__ = "feature_flags"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False)
    updated_at: Mapped[dt.datetime] = _now()


class LoginAttempt(Base):
    """A failed login, kept for throttling brute force per email."""

    __tablename__ = "login_failures"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    email: Mapped[str] = mapped_column(Text, nullable=False)
    attempted_at: Mapped[dt.datetime] = _now()

    __table_args__ = (Index("login_failures_email_idx", func.lower(email), "attempted_at"),)
