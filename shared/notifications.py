"""Notification emails: one "ready" or "failed" email per export, whatever Kafka redelivers.

The notifier consumes ``exports.lifecycle``. For ``ExportReady`` it emails the requester a
signed download link; for a final ``ExportFailed`` it emails the safe error and a link to the
export's page (where Retry lives). Everything in the email is read from PostgreSQL (the source
of truth), not from the event.

Exactly-once per (export, kind) is kept by the ``notifications`` table, whose primary key is
(export_id, kind). In one transaction the notifier inserts the row (``ON CONFLICT DO NOTHING``),
locks it (``SELECT ... FOR UPDATE``; a second notifier waits here), and sends only if its
``status`` is still ``pending``, setting ``sent`` (and ``sent_at``) before committing. A row is
finished when its status is

- ``sent``, or
- ``skipped`` (deliberately not sent, e.g. the requester is no longer an active admin of the
  account; ``last_error`` says why), or
- ``failed`` (permanently undeliverable: a 5xx reply to RCPT, MAIL or DATA, an address the
  server cannot take without SMTPUTF8, a message that could not be composed, or transient
  failures for longer than CONSUMER_MAX_RETRY_SECONDS). Counted once as ``outcome="failed"``;
  never retried.

The wording is in ``shared/emails.py`` (templates), the delivery behind ``shared/smtp.py``.

A ``pending`` row has ``attempts`` transient failures behind it (connection
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
import logging
import uuid
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker

from shared import metrics
from shared.db import transaction
from shared.emails import KIND_FAILED, KIND_READY, KINDS, EmailComposer, EmailFacts
from shared.errors import OrdersExportError
from shared.events import TOPIC_LIFECYCLE, Event, ExportFailed, ExportReady
from shared.kafka import ConsumerLoop
from shared.models import (
    Account,
    ExportJob,
    ExportState,
    Membership,
    Notification,
    NotificationStatus,
    Role,
    User,
)
from shared.settings import Settings
from shared.signing import SigningKeys
from shared.smtp import MailSender, SmtpSender, parse_smtp_url, permanent_reason

log = logging.getLogger(__name__)

#: Kafka consumer group of the notifier.
CONSUMER_GROUP = "orders-export-notifier"
#: What became of a notification (label values of ``orders_export_notifications_total``).
OUTCOMES = ("sent", "duplicate", "skipped", "failed")
#: Longest ``last_error`` stored (characters).
LAST_ERROR_MAX_CHARS = 200
#: Statuses after which a notification is never looked at again.
FINISHED = frozenset(
    {NotificationStatus.SENT, NotificationStatus.SKIPPED, NotificationStatus.FAILED}
)


class NotificationFailed(OrdersExportError):
    """An email could not be handed to the SMTP server; the event is retried later."""

    code = "notification_failed"


def _short(text: str) -> str:
    return text if len(text) <= LAST_ERROR_MAX_CHARS else text[: LAST_ERROR_MAX_CHARS - 1] + "…"


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Notifier:
    """Turns lifecycle events into (at most) one email per export and kind."""

    def __init__(
        self,
        *,
        settings: Settings,
        sessions: sessionmaker[Session],
        clock: Callable[[], dt.datetime] = _utcnow,
        sender: MailSender | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.clock = clock
        #: Where emails go: SMTP_URL's server unless a sender is given (a fake in unit tests).
        self.sender = sender or SmtpSender(parse_smtp_url(settings.require("smtp_url")))
        self.composer = EmailComposer(
            public_url=settings.require("public_url"),
            sender=settings.smtp_from,
            signing_keys=SigningKeys.from_settings(settings),
            link_ttl_seconds=settings.export_link_ttl_seconds,
        )
        #: (kind, outcome) -> count; outcome is sent, duplicate, skipped or failed. Exported as
        #: ``orders_export_notifications_total{kind, outcome}``.
        self.outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
        metrics.declare(metrics.NOTIFICATIONS, *((k, o) for k in KINDS for o in OUTCOMES))

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

    def _load(
        self, session: Session, export_id: uuid.UUID, expected: ExportState
    ) -> EmailFacts | None:
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
        return EmailFacts(job=job, account=account, user=user)

    def _notify(
        self, session: Session, facts: EmailFacts, *, kind: str, event_id: str
    ) -> str | None:
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
        if row.status in FINISHED:
            self._count(kind, "duplicate")
            log.info("notifier: %s email for export %s already handled", kind, job.id)
            return None
        skip_reason = self._skip_reason(session, facts, kind=kind)
        if skip_reason is not None:
            row.status, row.last_error = NotificationStatus.SKIPPED, skip_reason
            self._count(kind, "skipped")
            log.info("notifier: %s email for export %s skipped: %s", kind, job.id, skip_reason)
            return None
        row.recipient = user.email
        try:
            message = self.composer.compose(facts, kind=kind, now=self.clock())
        except Exception as exc:  # a bug or odd data: retrying cannot help
            log.exception("notifier: %s email for export %s could not be composed", kind, job.id)
            self._fail_for_good(
                row, kind, f"the email could not be composed ({type(exc).__name__})"
            )
            return None
        try:
            self.sender.send(message)
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
        row.status, row.sent_at, row.last_error = NotificationStatus.SENT, self.clock(), None
        self._count(kind, "sent")
        log.info("notifier: %s email for export %s sent", kind, job.id)
        return None

    def _fail_for_good(self, row: Notification, kind: str, reason: str) -> None:
        row.status, row.last_error = NotificationStatus.FAILED, _short(reason)
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
            if row is None or row.status in FINISHED:
                return
            self._fail_for_good(
                row, kind, f"gave up after {row.attempts} attempts ({_short(reason)})"
            )

    def _skip_reason(self, session: Session, facts: EmailFacts, *, kind: str) -> str | None:
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
