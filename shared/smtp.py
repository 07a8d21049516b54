"""Sending email: SMTP_URL parsing, the :class:`MailSender` interface, SMTP and a fake.

The notifier depends on :class:`MailSender` only. :class:`SmtpSender` hands messages to a real
SMTP server; :class:`RecordingSender` keeps them in memory (unit tests). Which SMTP failures are
worth retrying is told by :func:`permanent_reason`.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from shared.errors import ConfigurationError
from shared.settings import parse_flag

log = logging.getLogger(__name__)

#: Timeout of every SMTP connect and command (seconds).
SMTP_TIMEOUT_SECONDS = 10.0
#: Ports used when SMTP_URL names none.
DEFAULT_SMTP_PORT = 25
DEFAULT_SMTPS_PORT = 465

_SMTP_URL_PROBLEM = (
    "invalid setting SMTP_URL: expected smtp://[user:password@]host[:port][?starttls=true] "
    "or smtps://[user:password@]host[:port]"
)


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
    starttls = parse_flag(starttls_values[0])
    if starttls is None:
        raise ConfigurationError(_SMTP_URL_PROBLEM)
    use_ssl = parts.scheme == "smtps"
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


class MailSender(Protocol):
    """Hands one message over for delivery, or raises (``OSError``, ``smtplib`` errors)."""

    def send(self, message: EmailMessage) -> None: ...


class SmtpSender:
    """Delivers to an SMTP server, one connection per message."""

    def __init__(self, target: SmtpTarget, *, timeout: float = SMTP_TIMEOUT_SECONDS) -> None:
        self.target = target
        self.timeout = timeout

    def send(self, message: EmailMessage) -> None:
        target, context = self.target, ssl.create_default_context()
        client: smtplib.SMTP
        if target.use_ssl:
            client = smtplib.SMTP_SSL(
                target.host, target.port, timeout=self.timeout, context=context
            )
        else:
            client = smtplib.SMTP(target.host, target.port, timeout=self.timeout)
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


@dataclass
class RecordingSender:
    """A fake :class:`MailSender`: keeps what it is given; raises ``fail_with`` if set."""

    sent: list[EmailMessage] = field(default_factory=list)
    fail_with: Exception | None = None

    def send(self, message: EmailMessage) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.sent.append(message)


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
