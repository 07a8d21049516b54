"""Settings, read from the environment in exactly one place (:func:`load_settings`).

Everything else receives a :class:`Settings` instance; tests build one directly.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import ConfigurationError

_T = TypeVar("_T")

if TYPE_CHECKING:
    from shared.smtp import SmtpTarget
    from shared.storage import Storage

#: Above this many rows an export runs as a background job (rows).
DEFAULT_ASYNC_THRESHOLD_ROWS = 10_000
#: Hard cap on the rows of one export (rows).
DEFAULT_MAX_ROWS = 10_000_000
#: Lifetime of an export file after it became ready (seconds, 7 days).
DEFAULT_FILE_TTL_SECONDS = 7 * 24 * 3600
#: Lifetime of a signed download link (seconds, 7 days).
DEFAULT_LINK_TTL_SECONDS = 7 * 24 * 3600
#: Longest one export statement may run (seconds, 30 minutes).
DEFAULT_STATEMENT_TIMEOUT_SECONDS = 1800
#: Upper bound of EXPORT_STATEMENT_TIMEOUT_SECONDS (seconds, 4 hours).
MAX_STATEMENT_TIMEOUT_SECONDS = 4 * 3600
#: Upper bound of WORKER_SHUTDOWN_GRACE_SECONDS (seconds): leaves time to hand exports back.
MAX_SHUTDOWN_GRACE_SECONDS = 20
#: Queued + running exports one user may have at once.
DEFAULT_MAX_ACTIVE_PER_USER = 5


#: The one true/false vocabulary: settings, rollout switches, SMTP_URL's and STORAGE_URL's flags.
TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off"})
#: What is said of any other word.
FLAG_PROBLEM = "expected true or false (or yes/no, on/off, 1/0)"


def parse_flag(text: str) -> bool | None:
    """True or False for a word of the vocabulary (any case, spaces around), else None."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    return None


def _flag(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    flag = parse_flag(value) if isinstance(value, str) else None
    if flag is None:
        raise ValueError(FLAG_PROBLEM)
    return flag


#: A true/false setting, in :data:`TRUE_WORDS` / :data:`FALSE_WORDS`.
Flag = Annotated[bool, BeforeValidator(_flag)]


class Settings(BaseSettings):
    """Every knob of every service. Field names map to upper-case environment variables."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    database_url: str
    secret_key: str = Field(min_length=16)
    redis_url: str | None = None
    kafka_bootstrap_servers: str | None = None
    storage_url: str | None = None
    smtp_url: str | None = None
    public_url: str | None = None
    export_database_url: str | None = None

    #: Longest a request (or task) waits for a free pooled database connection before it gives
    #: up (seconds): the API then answers 503 ``database_unavailable`` with ``Retry-After``.
    database_pool_timeout_seconds: float = Field(30.0, gt=0, le=300)

    export_async_threshold_rows: int = Field(DEFAULT_ASYNC_THRESHOLD_ROWS, ge=0)
    export_max_rows: int = Field(DEFAULT_MAX_ROWS, ge=1)
    export_file_ttl_seconds: int = Field(DEFAULT_FILE_TTL_SECONDS, ge=1)
    export_link_ttl_seconds: int = Field(DEFAULT_LINK_TTL_SECONDS, ge=1)
    export_max_active_per_user: int = Field(DEFAULT_MAX_ACTIVE_PER_USER, ge=1)

    #: Failed attempts of one export before it stays failed (attempt = one worker run).
    export_max_attempts: int = Field(3, ge=1, le=20)
    #: First automatic retry delay (seconds); doubles with every attempt.
    export_retry_backoff_seconds: float = Field(5.0, ge=0)
    #: A running job whose worker has not renewed its lease for this long is rescued (seconds).
    export_lease_seconds: int = Field(30, ge=3)
    #: Longest a single export query may run before it fails as user-fixable (seconds). Bounded
    #: (4 hours): the actor's time limit is derived from it, so the database timeout fires first.
    export_statement_timeout_seconds: int = Field(
        DEFAULT_STATEMENT_TIMEOUT_SECONDS, ge=1, le=MAX_STATEMENT_TIMEOUT_SECONDS
    )
    #: On SIGTERM, how long running exports may go on before they are handed back to the queue
    #: (seconds; the whole stop must fit docker-compose's ``stop_grace_period`` of 35 s).
    worker_shutdown_grace_seconds: int = Field(15, ge=0, le=MAX_SHUTDOWN_GRACE_SECONDS)
    #: Longest a Kafka consumer retries one failing message before it is dead-lettered (seconds):
    #: no single message holds up its partition for longer.
    consumer_max_retry_seconds: int = Field(600, ge=1, le=86_400)
    #: Threads of the worker pool that serves the ``exports`` queue.
    export_worker_threads: int = Field(2, ge=1, le=32)
    #: Background exports of at most this many rows (counted at the request, which counts up to
    #: the larger of this and EXPORT_ASYNC_THRESHOLD_ROWS) go to the fast lane, served by
    #: threads of their own (shared/lanes.py; 0 = no fast lane).
    export_fast_lane_max_rows: int = Field(50_000, ge=0, le=100_000)
    #: Threads of each worker process that serve only the fast lane (``exports.fast`` queue).
    export_fast_lane_threads: int = Field(1, ge=1, le=8)
    #: A queued job whose work message is older than this is sent again (seconds).
    export_requeue_after_seconds: int = Field(120, ge=10)
    #: Cap on how fast one export streams rows out of PostgreSQL (bytes/s; 0 = no cap). A brake
    #: for a primary under pressure; prefer EXPORT_DATABASE_URL (a replica) where there is one.
    export_max_bytes_per_second: int = Field(0, ge=0)
    #: With S3 storage, answer a download with a 302 to a presigned URL valid this long instead
    #: of streaming the file through the API (seconds; 0 = the API streams).
    export_download_redirect_seconds: int = Field(0, ge=0, le=7 * 24 * 3600)
    #: Multipart part size of S3 uploads (MiB; S3 allows 5..5120).
    storage_part_size_mib: int = Field(8, ge=5, le=5120)
    #: Download link keys, ``kid:secret[,kid:secret...]``; the first signs, all verify.
    #: Unset: one key derived from SECRET_KEY (kid ``k0``).
    download_signing_keys: str | None = None
    #: While DOWNLOAD_SIGNING_KEYS is set, still accept links signed by the key derived from
    #: SECRET_KEY (kid ``k0``, verify-only); turn off once those links have expired.
    download_signing_keep_derived: Flag = True
    #: Days the download audit trail (``download_attempts``) is kept.
    audit_retention_days: int = Field(400, ge=1)
    #: Kafka consumer session timeout (ms); lower it locally so restarts rejoin quickly.
    kafka_session_timeout_ms: int = Field(45_000, ge=1000)
    #: Sender of notification emails.
    smtp_from: str = "Orders export <no-reply@orders-export.invalid>"

    #: Port of the Prometheus endpoint of the relay, worker and notifier (0 = none; the API
    #: serves ``/metrics`` on its own port). Each process needs its own.
    metrics_port: int = Field(0, ge=0, le=65535)
    #: Address that endpoint binds to (``0.0.0.0`` inside a container).
    metrics_host: str = "127.0.0.1"
    #: prometheus_client's multiprocess directory: one per service, empty when it starts. It is
    #: read by prometheus_client itself when first imported, so it must be in the environment
    #: before the process starts (unset: metrics live in the process, as in tests).
    prometheus_multiproc_dir: str | None = None

    #: Send the session cookie only over HTTPS (turn on behind TLS).
    session_cookie_secure: Flag = False
    #: A browser session unused for this long ends (seconds, 8 hours).
    session_idle_seconds: int = Field(28_800, ge=60)
    #: Every browser session ends this long after login, however active (seconds, 14 days).
    session_lifetime_seconds: int = Field(14 * 24 * 3600, ge=60)
    #: Failed logins per email within ``login_throttle_window_seconds`` before refusing.
    login_max_failures: int = Field(5, ge=1)
    login_throttle_window_seconds: int = Field(300, ge=1)
    #: Failed logins per client address within the same window, whatever the emails.
    login_max_failures_per_client: int = Field(20, ge=1)
    #: Password checks (argon2: ~0.2 s CPU, 64 MiB each) one API process runs at once; more
    #: logins at that moment get ``503`` with ``Retry-After``.
    login_max_concurrent_checks: int = Field(4, ge=1, le=64)
    #: Proxies whose ``X-Forwarded-For`` is believed (comma-separated IPs or CIDRs; unset: the
    #: header is ignored and the TCP peer is the client).
    trusted_proxies: str | None = None
    #: Largest request body the API reads (bytes); beyond it ``413 body_too_large``.
    max_request_body_bytes: int = Field(65536, ge=1024)
    #: Exports made inside the request (small ones) one user may start per minute.
    export_max_inline_per_minute: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _signing_keys(self) -> Settings:
        from shared.signing import SigningKeys

        _parsed_or_invalid(SigningKeys.from_settings, self)
        return self

    @field_validator("smtp_url")
    @classmethod
    def _smtp_target(cls, value: str | None) -> str | None:
        from shared.smtp import parse_smtp_url

        if value:
            _parsed_or_invalid(parse_smtp_url, value)
        return value

    @field_validator("storage_url")
    @classmethod
    def _storage_target(cls, value: str | None) -> str | None:
        from shared.storage import storage_from_url

        if value:
            _parsed_or_invalid(storage_from_url, value)  # builds the adapter: nothing is contacted
        return value

    @property
    def smtp_target(self) -> SmtpTarget | None:
        """SMTP_URL, parsed (validated when the settings were loaded)."""
        from shared.smtp import parse_smtp_url

        return parse_smtp_url(self.smtp_url) if self.smtp_url else None

    @property
    def storage_target(self) -> Storage | None:
        """The storage adapter STORAGE_URL names (validated when the settings were loaded)."""
        from shared.storage import lifecycle_days, storage_from_url

        if not self.storage_url:
            return None
        return storage_from_url(
            self.storage_url,
            part_size_mib=self.storage_part_size_mib,
            expire_days=lifecycle_days(self.export_file_ttl_seconds),
        )

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: str | None) -> str | None:
        if value:
            for item in value.split(","):
                ipaddress.ip_network(item.strip(), strict=False)  # ValueError names the entry
        return value

    @field_validator("database_url", "export_database_url")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        return value

    def require(self, name: str) -> str:
        """Return the optional setting ``name`` or fail naming its environment variable."""
        value = getattr(self, name)
        if not value:
            raise ConfigurationError(f"missing required setting {name.upper()}")
        return str(value)


def _parsed_or_invalid(parse: Callable[[_T], object], value: _T) -> None:
    """Run our own parser of a setting; its ConfigurationError (which names the variable)
    becomes the ValueError pydantic reports."""
    try:
        parse(value)
    except ConfigurationError as exc:
        raise ValueError(exc.message) from None


def load_settings() -> Settings:
    """Read :class:`Settings` from the environment, turning pydantic's report into one line."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"]).upper()
            cause = (error.get("ctx") or {}).get("error")
            if error["type"] == "missing":
                problems.append(f"missing required setting {name}")
            elif isinstance(cause, ValueError) and str(cause).startswith("invalid setting "):
                problems.append(str(cause))  # our own parser's words, naming the variable
            else:
                problems.append(f"invalid setting {name}: {error['msg']}")
        raise ConfigurationError("; ".join(problems)) from None
