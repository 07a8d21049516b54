"""The notification emails' wording: Jinja2 templates (``email_templates/``) turned into messages.

Each email is ``multipart/alternative``: a plain-text part and an HTML part with a button, no
remote images and inline styles only (what common mail clients render). Moments are in the
account's time zone with its name, as on the web pages. User-controlled text is capped, so every
line stays far below the 998 octets RFC 5322 allows.
"""

from __future__ import annotations

import datetime as dt
import email.policy
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import format_datetime, formataddr, parseaddr
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from shared.errors import OrdersExportError
from shared.export_options import job_options, options_text
from shared.failures import advice_text
from shared.filters import from_snapshot
from shared.formatting import file_size, zoned_time
from shared.models import Account, ErrorClass, ExportJob, User
from shared.signing import SigningKeys, download_path

#: Notification kinds (the ``kind`` column), each with its two templates.
KIND_READY = "ready"
KIND_FAILED = "failed"
KINDS = (KIND_READY, KIND_FAILED)
#: Where the templates are.
TEMPLATES = Path(__file__).with_name("email_templates")
#: Longest user-controlled text in an email (characters): filter summary, names.
MAX_SUMMARY_CHARS = 200
MAX_NAME_CHARS = 100
#: Domain of Message-IDs when SMTP_FROM has none.
FALLBACK_MESSAGE_ID_DOMAIN = "orders-export.invalid"

_environment = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


@dataclass(frozen=True, kw_only=True)
class EmailFacts:
    """What an email says, read from the database."""

    job: ExportJob
    account: Account
    user: User


def _header_safe(text: str) -> str:
    """Drop control characters (a display name must not break a header)."""
    return "".join(ch if ch.isprintable() else " " for ch in text).strip()


def _capped(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class EmailComposer:
    """Builds the ready and failed emails of one deployment (its links, keys and sender)."""

    def __init__(
        self, *, public_url: str, sender: str, signing_keys: SigningKeys, link_ttl_seconds: int
    ) -> None:
        self.public_url = public_url.rstrip("/")
        self.sender = sender
        self.signing_keys = signing_keys
        self.link_ttl_seconds = link_ttl_seconds
        self.message_id_domain = (
            parseaddr(sender)[1].rpartition("@")[2] or FALLBACK_MESSAGE_ID_DOMAIN
        )

    def compose(self, facts: EmailFacts, *, kind: str, now: dt.datetime) -> EmailMessage:
        """The email of ``kind`` about ``facts`` as of ``now``."""
        job, account, user = facts.job, facts.account, facts.user
        display_name = _capped(_header_safe(user.display_name), MAX_NAME_CHARS)
        context: dict[str, Any] = {
            "greeting": display_name or user.email,
            "account_name": _capped(_header_safe(account.name), MAX_NAME_CHARS),
            "slug": account.slug,
            "summary": self._summary(job),
        }
        if kind == KIND_READY:
            subject, more = self._ready(job, account, now=now)
        else:
            subject, more = self._failed(job, account)
        context.update(more, subject=subject)
        text = _environment.get_template(f"{kind}.txt").render(context)
        html = _environment.get_template(f"{kind}.html").render(context)
        # An internationalized address needs raw UTF-8 headers (RFC 6531, SMTPUTF8).
        message = EmailMessage(policy=email.policy.SMTPUTF8 if not user.email.isascii() else None)
        message["From"] = self.sender
        if user.email.isascii():
            message["To"] = formataddr((display_name, user.email))
        else:  # internationalized: the bare address; smtplib then needs the server's SMTPUTF8
            message["To"] = user.email  # (SMTPNotSupportedError without it: permanent)
        message["Subject"] = subject
        message["Date"] = format_datetime(now)
        message["Message-ID"] = f"<orders-export.{job.id}.{kind}@{self.message_id_domain}>"
        message["Auto-Submitted"] = "auto-generated"
        # Unencoded bodies keep the link on one line in the stored message (quoted-printable
        # would wrap it).
        message.set_content(text, cte="7bit" if text.isascii() else "8bit")
        message.add_alternative(html, subtype="html", cte="7bit" if html.isascii() else "8bit")
        return message

    @staticmethod
    def _summary(job: ExportJob) -> str:
        try:
            return _capped(from_snapshot(job.filters).summary(), MAX_SUMMARY_CHARS)
        except OrdersExportError:  # a snapshot from an older format: still send the email
            return "(see the export's page)"

    def _ready(
        self, job: ExportJob, account: Account, *, now: dt.datetime
    ) -> tuple[str, dict[str, Any]]:
        rows = job.row_count or 0
        noun = "row" if rows == 1 else "rows"
        link_expiry = now + dt.timedelta(seconds=self.link_ttl_seconds)
        if job.expires_at is not None:
            link_expiry = min(link_expiry, job.expires_at)
        link = self.public_url + download_path(
            self.signing_keys,
            export_id=str(job.id),
            user_id=job.requested_by,
            expires_at=link_expiry,
        )
        return f"Your orders export is ready ({account.slug}, {rows:,} {noun})", {
            "options": options_text(job_options(job)),
            "rows": f"{rows:,}",
            "size": file_size(job.size_bytes or 0),
            "available_until": (
                zoned_time(job.expires_at, account.timezone) if job.expires_at else None
            ),
            "link_expires": zoned_time(link_expiry, account.timezone),
            "link": link,
        }

    def _failed(self, job: ExportJob, account: Account) -> tuple[str, dict[str, Any]]:
        return f"Your orders export failed ({account.slug})", {
            "reason": job.error_message or "The export could not be completed.",
            "advice": advice_text(
                job.error_code,
                retryable=job.error_class is ErrorClass.RETRYABLE,
                export_id=str(job.id),
            ),
            "page_url": f"{self.public_url}/exports/{job.id}",
        }
