"""Run the Alembic migrations programmatically (``orders-export migrate``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url)
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the schema to ``revision``. Concurrent runs queue on an advisory lock (env.py);
    each migration and its version-table update commit in one transaction."""
    command.upgrade(alembic_config(database_url), revision)
