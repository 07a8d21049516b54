"""Notification emails: one "ready" or "failed" email per export, whatever Kafka redelivers.

The notifier consumes ``exports.lifecycle``. For ``ExportReady`` it emails the requester a
signed download link; for a final ``ExportFailed`` it emails the safe error and a link to the
export's page (where Retry lives). Everything in the email is read from PostgreSQL (the source
of truth), not from the event.

Exactly-once per (export, kind) is kept by the ``notifications`` table, whose primary key is
(export_id, kind). In one transaction the notifier inserts the row (``ON CONFLICT DO NOTHING``),
locks it (``SELECT ... FOR UPDATE``; a second notifier waits here), and sends only if ``sent_at``
is still NULL, setting ``sent_at`` before committing. A row is finished when either

- ``sent_at`` is set (sent), or
- ``sent_at`` is NULL and ``last_error`` starts with ``"skipped: "`` (deliberately not sent, e.g.
  the requester is no longer an active admin of the account), or
- ``sent_at`` is NULL and ``last_error`` starts with ``"failed: "`` (permanently undeliverable:
  a 5xx reply to RCPT, MAIL or DATA, an address the server cannot take without SMTPUTF8, a
  message that could not be composed, or transient failures for longer than
  CONSUMER_MAX_RETRY_SECONDS). Counted once as ``outcome="failed"``; never retried.

Any other row with ``sent_at`` NULL has ``attempts`` transient failures behind it (connection
errors, 4xx replies) and is retried when the event comes again (the consumer loop redelivers it
with backoff, for at most CONSUMER_MAX_RETRY_SECONDS, then dead-letters it and calls
:meth:`Notifier.give_up`).

Once the server answered 250 to DATA the email is sent: a failing QUIT (or its reply lost)
afterwards is logged, not retried. Remaining at-least-once window: if the process dies (or the
database commit fails) after that 250 but before the transaction setting ``sent_at`` committed,
the redelivered event sends the email a second time. The deterministic ``Message-ID`` lets mail
clients and servers recognize that duplicate.
"""

from __future__ import annotations

import collections
import datetime as dt
import email.policy
import logging
import smtplib
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import format_datetime, formataddr, parseaddr
from urllib.parse import parse_qs, unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker

from shared import metrics
from shared.db import transaction
from shared.errors import ConfigurationError, OrdersExportError
from shared.events import TOPIC_LIFECYCLE, Event, ExportFailed, ExportReady
from shared.export_options import job_options, options_text
from shared.failures import advice_text
from shared.filters import from_snapshot
from shared.kafka import ConsumerLoop
from shared.models import (
    Account,
    ErrorClass,
    ExportJob,
    ExportState,
    Membership,
    Notification,
    Role,
    User,
)
from shared.settings import Settings
from shared.signing import SigningKeys, download_path

log = logging.getLogger(__name__)

#: Kafka consumer group of the notifier.
CONSUMER_GROUP = "orders-export-notifier"
#: Notification kinds (the ``kind`` column).
KIND_READY = "ready"
KIND_FAILED = "failed"
#: What became of a notification (label values of ``orders_export_notifications_total``).
OUTCOMES = ("sent", "duplicate", "skipped", "failed")
#: Timeout of every SMTP connect and command (seconds).
SMTP_TIMEOUT_SECONDS = 10.0
#: Ports used when SMTP_URL names none.
DEFAULT_SMTP_PORT = 25
DEFAULT_SMTPS_PORT = 465
#: Longest ``last_error`` stored (characters).
LAST_ERROR_MAX_CHARS = 200
#: ``last_error`` prefix of a notification that is deliberately never sent.
SKIPPED_PREFIX = "skipped: "
#: ``last_error`` prefix of a notification that can never be delivered (given up for good).
FAILED_PREFIX = "failed: "
#: Longest user-controlled text in an email (characters): filter summary, names. RFC 5322
#: allows 998 octets per line; with these caps every line stays far below that.
MAX_SUMMARY_CHARS = 200
MAX_NAME_CHARS = 100
#: Domain of Message-IDs when SMTP_FROM has none.
FALLBACK_MESSAGE_ID_DOMAIN = "orders-export.invalid"
#: Size units of :func:`human_size` (powers of 1000, as in "12.3 MB").
SIZE_UNITS = ("kB", "MB", "GB", "TB", "PB")
#: Bytes per :data:`SIZE_UNITS` step.
SIZE_STEP = 1000

_SMTP_URL_PROBLEM = (
    "invalid setting SMTP_URL: expected smtp://[user:password@]host[:port][?starttls=true] "
    "or smtps://[user:password@]host[:port]"
)
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off", "")


class NotificationFailed(OrdersExportError):
    """An email could not be handed to the SMTP server; the event is retried later."""

    code = "notification_failed"


@dataclass(frozen=True, kw_only=True)
class SmtpTarget:
    """Where and how to deliver mail, parsed from SMTP_URL."""

    host: str
    port: int
    use_ssl: bool = False
    starttls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_smtp_url(url: str) -> SmtpTarget:
    """Parse ``smtp://[user:pass@]host[:port][?starttls=true]`` or ``smtps://...``.

    The error message never repeats the URL (it may carry a password).
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ConfigurationError(_SMTP_URL_PROBLEM) from None
    if (
        parts.scheme not in ("smtp", "smtps")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.fragment
    ):
        raise ConfigurationError(_SMTP_URL_PROBLEM)
    query = parse_qs(parts.query, keep_blank_values=True)
    starttls_values = query.pop("starttls", ["false"])
    if query or len(starttls_values) != 1:
        raise ConfigurationError(_SMTP_URL_PROBLEM)
    flag = starttls_values[0].lower()
    if flag not in _TRUE + _FALSE:
        raise ConfigurationError(_SMTP_URL_PROBLEM)
    use_ssl = parts.scheme == "smtps"
    starttls = flag in _TRUE
    if use_ssl and starttls:
        raise ConfigurationError(
            "invalid setting SMTP_URL: smtps:// and starttls exclude each other"
        )
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if password is not None and username is None:
        raise ConfigurationError(_SMTP_URL_PROBLEM)
    return SmtpTarget(
        host=parts.hostname,
        port=port or (DEFAULT_SMTPS_PORT if use_ssl else DEFAULT_SMTP_PORT),
        use_ssl=use_ssl,
        starttls=starttls,
        username=username,
        password=password,
    )


def send_message(
    target: SmtpTarget, message: EmailMessage, *, timeout: float = SMTP_TIMEOUT_SECONDS
) -> None:
    """Hand ``message`` to the SMTP server (raises ``OSError``/``smtplib.SMTPException``)."""
    context = ssl.create_default_context()
    client: smtplib.SMTP
    if target.use_ssl:
        client = smtplib.SMTP_SSL(target.host, target.port, timeout=timeout, context=context)
    else:
        client = smtplib.SMTP(target.host, target.port, timeout=timeout)
    try:
        if target.starttls:
            client.starttls(context=context)
        if target.username:
            client.login(target.username, target.password or "")
        client.ehlo_or_helo_if_needed()
        options: list[str] = []
        if _has_8bit_parts(message):
            if client.has_extn("8bitmime"):
                options.append("BODY=8BITMIME")
            else:
                _to_quoted_printable(message)
        client.send_message(message, mail_options=options)
    finally:
        _quit_quietly(client)


def _quit_quietly(client: smtplib.SMTP) -> None:
    """QUIT and close. Once ``send_message`` returned, the server has the email: a failing
    QUIT (an error reply, a lost reply, a dropped connection) must not make it a failure."""
    try:
        client.quit()
    except (OSError, smtplib.SMTPException) as exc:
        log.info(
            "notifier: QUIT failed (%s); the message was already handed over", type(exc).__name__
        )
    finally:
        client.close()


def _has_8bit_parts(message: EmailMessage) -> bool:
    return any(part.get("Content-Transfer-Encoding") == "8bit" for part in message.walk())


def _to_quoted_printable(message: EmailMessage) -> None:
    """Re-encode 8bit text parts for a server without 8BITMIME (rare nowadays)."""
    for part in message.walk():
        if isinstance(part, EmailMessage) and part.get("Content-Transfer-Encoding") == "8bit":
            text = part.get_content()
            del part["Content-Transfer-Encoding"]
            part.set_content(text, subtype=part.get_content_subtype(), cte="quoted-printable")


def human_size(size_bytes: int) -> str:
    """``999 B``, ``1.0 kB``, ``12.3 MB``, ... (decimal units)."""
    if size_bytes < SIZE_STEP:
        return f"{size_bytes} B"
    value = float(size_bytes)
    for unit in SIZE_UNITS:
        value /= SIZE_STEP
        if round(value, 1) < SIZE_STEP or unit == SIZE_UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def format_moment(moment: dt.datetime, timezone: str) -> str:
    """``2025-06-08 12:00 UTC (2025-06-08 14:00 Europe/Berlin)``; the zone part only if not UTC."""
    text = moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    if timezone in ("UTC", "Etc/UTC"):
        return text
    try:
        local = moment.astimezone(ZoneInfo(timezone))
    except (ZoneInfoNotFoundError, ValueError):
        return text
    return f"{text} ({local:%Y-%m-%d %H:%M} {timezone})"


def _short(text: str) -> str:
    return text if len(text) <= LAST_ERROR_MAX_CHARS else text[: LAST_ERROR_MAX_CHARS - 1] + "…"


def _header_safe(text: str) -> str:
    """Drop control characters (a display name must not break a header)."""
    return "".join(ch if ch.isprintable() else " " for ch in text).strip()


def _capped(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def permanent_reason(exc: Exception) -> str | None:
    """A safe reason when retrying ``exc`` cannot help (a 5xx reply, no SMTPUTF8), else None
    (connection errors, 4xx replies and authentication problems are transient)."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        if codes and all(code >= 500 for code in codes):
            return f"the mail server refused the recipient ({codes[0]})"
        return None
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return "the mail server cannot take this address (it does not support SMTPUTF8)"
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return None  # our configuration: every email fails alike, the bound applies
    if isinstance(exc, smtplib.SMTPResponseException) and 500 <= exc.smtp_code < 600:
        return f"the mail server refused the message ({exc.smtp_code})"
    if isinstance(exc, OSError | smtplib.SMTPException):
        return None
    return f"the email could not be sent ({type(exc).__name__})"


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, kw_only=True)
class _Facts:
    """What an email says, read from the database."""

    job: ExportJob
    account: Account
    user: User


class Notifier:
    """Turns lifecycle events into (at most) one email per export and kind."""

    def __init__(
        self,
        *,
        settings: Settings,
        sessions: sessionmaker[Session],
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.clock = clock
        self.smtp = parse_smtp_url(settings.require("smtp_url"))
        self.public_url = settings.require("public_url").rstrip("/")
        self.signing_keys = SigningKeys.from_settings(settings)
        domain = parseaddr(settings.smtp_from)[1].rpartition("@")[2]
        self.message_id_domain = domain or FALLBACK_MESSAGE_ID_DOMAIN
        #: (kind, outcome) -> count; outcome is sent, duplicate, skipped or failed. Exported as
        #: ``orders_export_notifications_total{kind, outcome}``.
        self.outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
        metrics.declare(
            metrics.NOTIFICATIONS, *((k, o) for k in (KIND_READY, KIND_FAILED) for o in OUTCOMES)
        )

    def _count(self, kind: str, outcome: str) -> None:
        self.outcomes[(kind, outcome)] += 1
        metrics.NOTIFICATIONS.labels(kind, outcome).inc()

    def consumer_loop(self) -> ConsumerLoop:
        """The Kafka consumer loop that feeds :meth:`handle`."""
        return ConsumerLoop(
            settings=self.settings,
            group_id=CONSUMER_GROUP,
            topics=[TOPIC_LIFECYCLE],
            handle=self.handle,
            name="notifier",
            give_up=self.give_up,
        )

    def handle(self, event: Event) -> None:
        """Send the email ``event`` calls for, unless already sent or skipped.

        Raises :class:`NotificationFailed` when the SMTP server could not be reached or
        refused for now (after recording the attempt), so that the event is retried. A
        permanent failure is recorded as final and counted ``failed``; it does not raise.
        """
        if isinstance(event, ExportReady):
            if not event.notify:  # made inside the request: the user already has the file
                return
            kind, expected = KIND_READY, ExportState.READY
        elif isinstance(event, ExportFailed) and event.final:
            if not event.notify:  # made inside the request: the response told the user
                return
            kind, expected = KIND_FAILED, ExportState.FAILED
        else:
            return
        try:
            export_id = uuid.UUID(event.export_id)
        except ValueError:
            log.warning("notifier: %s with a malformed export id ignored", type(event).__name__)
            return
        failure: str | None = None
        with transaction(self.sessions) as session:
            facts = self._load(session, export_id, expected)
            if facts is None:
                return
            failure = self._notify(session, facts, kind=kind, event_id=event.event_id)
        if failure is not None:  # transient: the consumer loop retries (bounded), see give_up
            raise NotificationFailed(failure)

    def _load(self, session: Session, export_id: uuid.UUID, expected: ExportState) -> _Facts | None:
        job = session.get(ExportJob, export_id)
        if job is None:
            log.info("notifier: export %s no longer exists; nothing to send", export_id)
            return None
        if job.state != expected:
            # E.g. expired already, or retried by the user since it failed: the email would be
            # stale. A later final event of the same kind creates the notification then.
            log.info(
                "notifier: export %s is %s, not %s; nothing to send", job.id, job.state, expected
            )
            return None
        account = session.get(Account, job.account_id)
        user = session.get(User, job.requested_by)
        if account is None or user is None:  # foreign keys cascade, so this is a race at most
            return None
        return _Facts(job=job, account=account, user=user)

    def _notify(self, session: Session, facts: _Facts, *, kind: str, event_id: str) -> str | None:
        """Within the caller's transaction; returns a failure text when delivery failed."""
        job, user = facts.job, facts.user
        session.execute(
            insert(Notification)
            .values(export_id=job.id, kind=kind, recipient=user.email, event_id=event_id)
            .on_conflict_do_nothing(index_elements=["export_id", "kind"])
        )
        row = session.scalars(
            select(Notification)
            .where(Notification.export_id == job.id, Notification.kind == kind)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).one()
        if row.sent_at is not None or (row.last_error or "").startswith(
            (SKIPPED_PREFIX, FAILED_PREFIX)
        ):
            self._count(kind, "duplicate")
            log.info("notifier: %s email for export %s already handled", kind, job.id)
            return None
        skip_reason = self._skip_reason(session, facts, kind=kind)
        if skip_reason is not None:
            row.last_error = SKIPPED_PREFIX + skip_reason
            self._count(kind, "skipped")
            log.info("notifier: %s email for export %s skipped: %s", kind, job.id, skip_reason)
            return None
        row.recipient = user.email
        try:
            message = self.compose(facts, kind=kind)
        except Exception as exc:  # a bug or odd data: retrying cannot help
            log.exception("notifier: %s email for export %s could not be composed", kind, job.id)
            self._fail_for_good(
                row, kind, f"the email could not be composed ({type(exc).__name__})"
            )
            return None
        try:
            send_message(self.smtp, message)
        except Exception as exc:
            row.attempts += 1
            permanent = permanent_reason(exc)
            if permanent is not None:
                self._fail_for_good(row, kind, permanent)
                return None
            code = getattr(exc, "smtp_code", None)
            row.last_error = _short(
                f"SMTP delivery failed: {type(exc).__name__}" + (f" ({code})" if code else "")
            )
            log.warning(
                "notifier: %s email for export %s not delivered (%s), attempt %d",
                kind,
                job.id,
                type(exc).__name__,
                row.attempts,
            )
            return row.last_error
        # The SMTP server has the message; committing sent_at now closes the window in which
        # a crash would make a redelivered event send it again (see the module docstring).
        row.sent_at = self.clock()
        row.last_error = None
        self._count(kind, "sent")
        log.info("notifier: %s email for export %s sent", kind, job.id)
        return None

    def _fail_for_good(self, row: Notification, kind: str, reason: str) -> None:
        row.last_error = _short(FAILED_PREFIX + reason)
        self._count(kind, "failed")
        log.warning(
            "notifier: %s email for export %s undeliverable: %s", kind, row.export_id, reason
        )

    def give_up(self, event: Event, reason: str) -> None:
        """The consumer loop stops retrying ``event`` (CONSUMER_MAX_RETRY_SECONDS passed): its
        notification is failed for good (counted once as ``outcome="failed"``)."""
        if isinstance(event, ExportReady):
            kind = KIND_READY
        elif isinstance(event, ExportFailed):
            kind = KIND_FAILED
        else:
            return
        try:
            export_id = uuid.UUID(event.export_id)
        except ValueError:
            return
        with transaction(self.sessions) as session:
            row = session.scalars(
                select(Notification)
                .where(Notification.export_id == export_id, Notification.kind == kind)
                .with_for_update()
            ).one_or_none()
            if row is None or row.sent_at is not None:
                return
            if (row.last_error or "").startswith((SKIPPED_PREFIX, FAILED_PREFIX)):
                return
            self._fail_for_good(
                row, kind, f"gave up after {row.attempts} attempts ({_short(reason)})"
            )

    def _skip_reason(self, session: Session, facts: _Facts, *, kind: str) -> str | None:
        """Why this email must not go out at all, or None."""
        job, account, user = facts.job, facts.account, facts.user
        role = session.scalar(
            select(Membership.role).where(
                Membership.account_id == account.id, Membership.user_id == user.id
            )
        )
        if not user.is_active or role != Role.ADMIN:
            return "recipient no longer an admin"
        if kind == KIND_READY and job.expires_at is not None and job.expires_at <= self.clock():
            return "file already expired"
        return None

    def compose(self, facts: _Facts, *, kind: str) -> EmailMessage:
        """The email for ``kind`` (plain text)."""
        job, account, user = facts.job, facts.account, facts.user
        try:
            summary = _capped(from_snapshot(job.filters).summary(), MAX_SUMMARY_CHARS)
        except OrdersExportError:  # a snapshot from an older format: still send the email
            summary = "(see the export's page)"
        display_name = _capped(_header_safe(user.display_name), MAX_NAME_CHARS)
        account_name = _capped(_header_safe(account.name), MAX_NAME_CHARS)
        greeting = f"Hello {display_name or user.email},"
        if kind == KIND_READY:
            rows = job.row_count or 0
            noun = "row" if rows == 1 else "rows"
            subject = f"Your orders export is ready ({account.slug}, {rows:,} {noun})"
            now = self.clock()
            link_expiry = now + dt.timedelta(seconds=self.settings.export_link_ttl_seconds)
            if job.expires_at is not None:
                link_expiry = min(link_expiry, job.expires_at)
            link = self.public_url + download_path(
                self.signing_keys,
                export_id=str(job.id),
                user_id=job.requested_by,
                expires_at=link_expiry,
            )
            lines = [
                greeting,
                "",
                f"Your orders export of {account_name} ({account.slug}) is ready.",
                "",
                f"Filters:   {summary}",
                f"Options:   {options_text(job_options(job)) or 'none'}",
                f"Rows:      {rows:,}",
                f"Size:      {human_size(job.size_bytes or 0)}",
            ]
            if job.expires_at is not None:
                lines.append(f"Available until: {format_moment(job.expires_at, account.timezone)}")
            lines += [
                "",
                "Download it here (the link works only for you, while you are an admin of the",
                f"account, until {format_moment(link_expiry, account.timezone)}):",
                "",
                link,
            ]
        else:
            subject = f"Your orders export failed ({account.slug})"
            reason = job.error_message or "The export could not be completed."
            advice = advice_text(
                job.error_code,
                retryable=job.error_class is ErrorClass.RETRYABLE,
                export_id=str(job.id),
            )
            lines = [
                greeting,
                "",
                f"Your orders export of {account_name} ({account.slug}) failed.",
                "",
                f"Filters:   {summary}",
                f"Reason:    {reason}",
                "",
                advice,
                "",
                "The export's page (retry it, or change the filters and export again):",
                f"{self.public_url}/exports/{job.id}",
            ]
        # An internationalized address needs raw UTF-8 headers (RFC 6531, SMTPUTF8).
        message = EmailMessage(policy=email.policy.SMTPUTF8 if not user.email.isascii() else None)
        message["From"] = self.settings.smtp_from
        if user.email.isascii():
            message["To"] = formataddr((display_name, user.email))
        else:  # internationalized: the bare address; smtplib then needs the server's SMTPUTF8
            message["To"] = user.email  # (SMTPNotSupportedError without it: permanent)
        message["Subject"] = subject
        message["Date"] = format_datetime(self.clock())
        message["Message-ID"] = f"<orders-export.{job.id}.{kind}@{self.message_id_domain}>"
        message["Auto-Submitted"] = "auto-generated"
        text = "\n".join(lines) + "\n"
        # Unencoded bodies keep the link on one line in the stored message (quoted-printable
        # would wrap it); user-controlled text is capped, so lines stay far below 998 octets.
        message.set_content(text, cte="7bit" if text.isascii() else "8bit")
        return message
