"""Rollout switches stored in PostgreSQL, read with a short cache so changes apply in seconds."""

from __future__ import annotations

import threading
import time

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import ValidationError
from shared.models import FeatureFlag
from shared.settings import parse_flag

#: Known switches and their value when no row exists.
DEFAULTS: dict[str, bool] = {"exports_enabled": True, "workers_paused": False}
#: How long a process trusts its cached view of the switches (seconds).
CACHE_SECONDS = 2.0


def parse_bool(text: str) -> bool:
    """A switch's new value, in the settings' true/false vocabulary."""
    flag = parse_flag(text)
    if flag is None:
        raise ValidationError("value", "expected true or false")
    return flag


def set_flag(session: Session, name: str, enabled: bool) -> None:
    if name not in DEFAULTS:
        raise ValidationError("name", f"unknown flag; known: {', '.join(DEFAULTS)}")
    session.execute(
        insert(FeatureFlag)
        .values(name=name, enabled=enabled)
        .on_conflict_do_update(
            index_elements=["name"], set_={"enabled": enabled, "updated_at": func.now()}
        )
    )


def read_flags(session: Session) -> dict[str, bool]:
    values = dict(DEFAULTS)
    for name, enabled in session.execute(select(FeatureFlag.name, FeatureFlag.enabled)):
        if name in values:
            values[name] = enabled
    return values


class FlagCache:
    """Thread-safe cached view of the switches for a long-running process."""

    def __init__(self, factory: sessionmaker[Session], *, max_age: float = CACHE_SECONDS) -> None:
        self._factory = factory
        self._max_age = max_age
        self._lock = threading.Lock()
        self._values: dict[str, bool] = {}
        self._loaded_at = float("-inf")

    def get(self, name: str) -> bool:
        with self._lock:
            if time.monotonic() - self._loaded_at > self._max_age:
                with self._factory() as session:
                    self._values = read_flags(session)
                self._loaded_at = time.monotonic()
            return self._values[name]

    def forget(self) -> None:
        """Read the switches again at the next ``get`` (a change made by this process)."""
        with self._lock:
            self._loaded_at = float("-inf")
