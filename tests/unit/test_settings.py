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


@pytest.fixture
def base_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@127.0.0.1:5432/db")
    monkeypatch.setenv("SECRET_KEY", "k" * 32)
    return monkeypatch


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SMTP_URL", "smtp://mailer:hunter2-secret@mail.example.test?tls=maybe"),
        ("STORAGE_URL", "s3://KEY:hunter2-secret@127.0.0.1:9000/Not_A_Bucket"),
        ("STORAGE_URL", "ftp://hunter2-secret@example.test/x"),
        ("DOWNLOAD_SIGNING_KEYS", "k1"),
    ],
)
def test_bad_targets_and_keys_fail_at_load_naming_the_variable(
    base_env: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    base_env.setenv(variable, value)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert caught.value.message.startswith(f"invalid setting {variable}: ")
    assert "hunter2" not in caught.value.message  # URLs may carry credentials
    assert "Value error" not in caught.value.message


def test_targets_are_parsed_at_load(base_env: pytest.MonkeyPatch) -> None:
    base_env.setenv("SMTP_URL", "smtps://mailer:p%40ss@mail.example.test")
    base_env.setenv("STORAGE_URL", "file:///var/lib/orders-export")
    settings = load_settings()
    assert settings.smtp_target is not None and settings.smtp_target.port == 465
    assert settings.smtp_target.password == "p@ss"
    assert settings.storage_target is not None


@pytest.mark.parametrize(
    ("word", "value"),
    [
        *[("true", True), ("Yes", True), ("1", True), ("on", True)],
        *[("false", False), ("NO", False), ("0", False), ("off", False)],
    ],
)
def test_one_vocabulary_for_true_and_false(
    base_env: pytest.MonkeyPatch, word: str, value: bool
) -> None:
    from shared.flags import parse_bool
    from shared.smtp import parse_smtp_url

    base_env.setenv("SESSION_COOKIE_SECURE", word)
    assert load_settings().session_cookie_secure is value
    assert parse_bool(word) is value
    assert parse_smtp_url(f"smtp://h?starttls={word}").starttls is value


@pytest.mark.parametrize("word", ["t", "y", "n", "f", "maybe"])
def test_other_words_are_refused_everywhere(base_env: pytest.MonkeyPatch, word: str) -> None:
    base_env.setenv("SESSION_COOKIE_SECURE", word)
    with pytest.raises(ConfigurationError, match="SESSION_COOKIE_SECURE"):
        load_settings()
