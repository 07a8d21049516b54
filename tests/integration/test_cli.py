"""The orders-export command line against a real database, run as a separate process."""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg
import pytest

from shared.db import libpq_url
from shared.seeding import CUSTOMER_NAMES
from shared.settings import Settings


def cli(
    settings: Settings, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "SECRET_KEY": settings.secret_key,
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def query(settings: Settings, sql: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(libpq_url(settings.database_url)) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


#: The orders of one account (by slug), every column, in number order.
ORDERS_OF = (
    "SELECT number, placed_at, customer_name, customer_email, status, channel, items_count,"
    " subtotal, tax, shipping, total, currency"
    " FROM orders o JOIN accounts a ON a.id = o.account_id WHERE a.slug = %s ORDER BY number"
)
#: A user's roles, by email (case-insensitive).
ROLES_OF = (
    "SELECT role::text FROM memberships m JOIN users u ON u.id = m.user_id"
    " WHERE lower(u.email) = lower(%s)"
)


def test_help_lists_every_command(settings: Settings) -> None:
    result = cli(settings, "--help")
    assert result.returncode == 0
    for command in ("dev", "migrate", "seed", "users", "tokens", "flags"):
        assert command in result.stdout


def test_missing_setting_fails_naming_it(settings: Settings) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SECRET_KEY")}
    result = subprocess.run(
        [sys.executable, "-m", "shared.cli", "flags", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "missing required setting DATABASE_URL" in result.stderr


def test_migrate_is_idempotent(settings: Settings) -> None:
    assert cli(settings, "migrate").returncode == 0
    assert cli(settings, "migrate").returncode == 0


def test_seed_is_deterministic_and_has_the_awkward_values(settings: Settings) -> None:
    for slug in ("seed-a", "seed-b"):
        result = cli(
            settings,
            "seed",
            "--account",
            slug,
            "--orders",
            "3000",
            "--seed",
            "42",
            "--timezone",
            "Asia/Tokyo",
        )
        assert result.returncode == 0, result.stderr
    rows_a = query(settings, ORDERS_OF, "seed-a")
    rows_b = query(settings, ORDERS_OF, "seed-b")
    assert len(rows_a) == 3000 and rows_a == rows_b
    other = cli(settings, "seed", "--account", "seed-c", "--orders", "3000", "--seed", "43")
    assert other.returncode == 0
    rows_c = query(settings, ORDERS_OF, "seed-c")
    assert rows_c != rows_a
    names = {row[2] for row in rows_a}
    assert names == set(CUSTOMER_NAMES)
    assert (
        any("," in n for n in names)
        and any('"' in n for n in names)
        and any("\n" in n for n in names)
    )
    assert {n[0] for n in names} >= {"=", "+", "-", "@"}
    assert {row[4] for row in rows_a} == {"pending", "paid", "fulfilled", "refunded", "canceled"}
    assert {row[5] for row in rows_a} == {"web", "pos", "marketplace", "phone"}
    assert all(
        row[10] == row[7] + row[8] + row[9] for row in rows_a
    )  # total = subtotal+tax+shipping
    assert query(settings, "SELECT timezone FROM accounts WHERE slug = 'seed-a'") == [
        ("Asia/Tokyo",)
    ]


def test_seed_appends_with_fresh_numbers(settings: Settings) -> None:
    assert cli(settings, "seed", "--account", "grow", "--orders", "10").returncode == 0
    assert cli(settings, "seed", "--account", "grow", "--orders", "5").returncode == 0
    numbers = [r[0] for r in query(settings, ORDERS_OF, "grow")]
    assert numbers == [f"A-{n:06d}" for n in range(1, 16)]


def test_seed_refuses_bad_timezone(settings: Settings) -> None:
    result = cli(settings, "seed", "--account", "tz", "--orders", "1", "--timezone", "Mars/Olympus")
    assert result.returncode == 2 and "unknown IANA timezone" in result.stderr


def test_users_tokens_and_memberships(settings: Settings) -> None:
    created = cli(
        settings,
        "users",
        "create",
        "--email",
        "Ops@Example.test",
        "--password",
        "long-enough-pw",
        "--account",
        "ops",
        "--role",
        "admin",
    )
    assert created.returncode == 0, created.stderr
    token = cli(settings, "tokens", "create", "--email", "ops@example.test")
    assert token.returncode == 0
    assert (
        token.stdout.strip().startswith("oex_") and token.stdout.count("\n") == 1
    )  # the token, nothing else
    stored = query(settings, "SELECT token_sha256 FROM api_tokens")
    assert all(token.stdout.strip() not in str(row) for row in stored)  # only the digest is kept
    assert query(settings, ROLES_OF, "Ops@Example.test") == [("admin",)]
    assert (
        cli(
            settings,
            "users",
            "create",
            "--email",
            "ops@example.test",
            "--password",
            "long-enough-pw",
            "--account",
            "ops",
            "--role",
            "member",
        ).returncode
        == 0
    )
    assert query(settings, ROLES_OF, "ops@example.test") == [("member",)]
    removed = cli(settings, "users", "remove", "--email", "ops@example.test", "--account", "ops")
    assert removed.returncode == 0
    again = cli(settings, "users", "remove", "--email", "ops@example.test", "--account", "ops")
    assert again.returncode == 3 and "not a member" in again.stderr
    assert cli(settings, "tokens", "create", "--email", "nobody@example.test").returncode == 3


def test_users_create_refuses_short_passwords(settings: Settings) -> None:
    result = cli(
        settings,
        "users",
        "create",
        "--email",
        "x@example.test",
        "--password",
        "short",
        "--account",
        "ops",
        "--role",
        "admin",
    )
    assert result.returncode == 2 and "password" in result.stderr


@pytest.mark.parametrize(
    ("name", "value"), [("exports_enabled", "false"), ("workers_paused", "true")]
)
def test_flags_set_and_list(settings: Settings, name: str, value: str) -> None:
    assert cli(settings, "flags", "set", name, value).returncode == 0
    listing = cli(settings, "flags", "list").stdout
    assert f"{name}\t{value}" in listing.splitlines()


def test_flags_refuse_unknown_names_and_values(settings: Settings) -> None:
    assert cli(settings, "flags", "set", "make_it_fast", "true").returncode == 2
    assert cli(settings, "flags", "set", "exports_enabled", "maybe").returncode == 2
