"""Settings come from the environment in one place and fail naming what is missing."""

from __future__ import annotations

import pytest

from shared.errors import ConfigurationError
from shared.settings import DEFAULT_ASYNC_THRESHOLD_ROWS, load_settings


def test_missing_required_settings_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("SECRET_KEY", raising=False)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert "DATABASE_URL" in caught.value.message
    assert "SECRET_KEY" in caught.value.message


def test_values_and_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@127.0.0.1:5432/db")
    monkeypatch.setenv("SECRET_KEY", "k" * 32)
    monkeypatch.setenv("EXPORT_MAX_ROWS", "42")
    settings = load_settings()
    assert settings.export_max_rows == 42
    assert settings.export_async_threshold_rows == DEFAULT_ASYNC_THRESHOLD_ROWS
    with pytest.raises(ConfigurationError, match="REDIS_URL"):
        settings.require("redis_url")


def test_malformed_values_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "mysql://nope")
    monkeypatch.setenv("SECRET_KEY", "k" * 32)
    monkeypatch.setenv("EXPORT_MAX_ROWS", "many")
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert "invalid setting DATABASE_URL" in caught.value.message
    assert "invalid setting EXPORT_MAX_ROWS" in caught.value.message
