"""SMTP_URL parsing, which delivery failures are permanent, and the fake sender."""

from __future__ import annotations

import smtplib
from email.message import EmailMessage

import pytest

from shared.errors import ConfigurationError
from shared.smtp import MailSender, RecordingSender, parse_smtp_url, permanent_reason


def test_smtp_url_parsing() -> None:
    plain = parse_smtp_url("smtp://127.0.0.1:2525")
    assert (plain.host, plain.port, plain.use_ssl, plain.starttls) == (
        "127.0.0.1",
        2525,
        False,
        False,
    )
    secure = parse_smtp_url("smtps://mailer:p%40ss@mail.example.test")
    assert (secure.port, secure.use_ssl, secure.username, secure.password) == (
        465,
        True,
        "mailer",
        "p@ss",
    )
    assert "p@ss" not in repr(secure)
    assert parse_smtp_url("smtp://mail.example.test").port == 25
    assert parse_smtp_url("smtp://mail.example.test:587?starttls=true").starttls
    assert not parse_smtp_url("smtp://mail.example.test:587?starttls=off").starttls


@pytest.mark.parametrize(
    "bad",
    [
        "http://x",
        "smtp://",
        "smtp://h:99999",
        "smtp://h?tls=1",
        "smtps://h?starttls=1",
        "smtp://h/path",
        "smtp://h?starttls=maybe",
        "smtp://:secret@h",
    ],
)
def test_bad_smtp_urls_name_the_setting_but_not_the_url(bad: str) -> None:
    with pytest.raises(ConfigurationError, match="SMTP_URL") as caught:
        parse_smtp_url(bad)
    assert "99999" not in str(caught.value) and "secret" not in str(caught.value)


@pytest.mark.parametrize(
    ("exc", "permanent"),
    [
        (smtplib.SMTPRecipientsRefused({"a@x.test": (550, b"no such user")}), True),
        (smtplib.SMTPRecipientsRefused({"a@x.test": (450, b"try later")}), False),
        (smtplib.SMTPDataError(554, b"rejected"), True),
        (smtplib.SMTPDataError(451, b"later"), False),
        (smtplib.SMTPNotSupportedError("SMTPUTF8"), True),
        (smtplib.SMTPAuthenticationError(535, b"bad credentials"), False),
        (ConnectionRefusedError(), False),
        (ValueError("odd data"), True),
    ],
)
def test_only_failures_that_retrying_cannot_fix_are_permanent(
    exc: Exception, permanent: bool
) -> None:
    assert (permanent_reason(exc) is not None) is permanent


def test_the_fake_sender_keeps_messages_or_fails_as_told() -> None:
    sender: MailSender = RecordingSender()
    message = EmailMessage()
    message["Subject"] = "hi"
    sender.send(message)
    assert isinstance(sender, RecordingSender) and sender.sent == [message]
    sender.fail_with = ConnectionRefusedError()
    with pytest.raises(ConnectionRefusedError):
        sender.send(message)
    assert sender.sent == [message]
