"""Alembic environment: migrations run against the URL handed in by ``shared.migrate``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, text

from shared.db import sqlalchemy_url
from shared.models import Base

config = context.config
url = config.get_main_option("sqlalchemy.url")
assert url, "shared.migrate passes sqlalchemy.url"


engine = create_engine(sqlalchemy_url(url))
#: pg_advisory_lock key that serialises concurrent ``migrate`` runs (any fixed number).
MIGRATION_LOCK_KEY = 7_310_311

with engine.connect() as connection:
    connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    connection.commit()
    context.configure(connection=connection, target_metadata=Base.metadata)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
