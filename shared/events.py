"""Domain events (past tense) and their JSON wire format on Kafka.

Every event carries ``event_id``, ``type``, ``version``, ``occurred_at``, ``export_id`` and
``account`` (the account slug); the Kafka message key is the export id.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

from shared.errors import UndecodableEvent

#: Topic of export requests (API -> worker), written through the outbox.
TOPIC_REQUESTED = "exports.requested"
#: Topic of state changes (worker/API -> notifier and anyone else).
TOPIC_LIFECYCLE = "exports.lifecycle"
#: Where consumers put messages they cannot decode, untouched, then carry on.
TOPIC_DEAD_LETTER = "exports.dead-letter"
#: Wire format version of every event below.
EVENT_VERSION = 1


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _event_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True, kw_only=True)
class Event:
    """Base of every event; subclasses add their own fields."""

    topic: ClassVar[str] = TOPIC_LIFECYCLE

    export_id: str
    account: str
    event_id: str = field(default_factory=_event_id)
    occurred_at: str = field(default_factory=_now)

    @property
    def key(self) -> str:
        return self.export_id

    def to_json(self) -> dict[str, Any]:
        body = dataclasses.asdict(self)
        return {"type": type(self).__name__, "version": EVENT_VERSION, **body}

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode()


@dataclass(frozen=True, kw_only=True)
class ExportRequested(Event):
    """A background export was accepted and is waiting for a worker."""

    topic: ClassVar[str] = TOPIC_REQUESTED
    #: The worker lane it goes to: "fast" (small, shared/lanes.py) or "normal".
    lane: str = "normal"


@dataclass(frozen=True, kw_only=True)
class ExportStarted(Event):
    """A worker claimed the export (``attempt`` counts from 1)."""

    attempt: int


@dataclass(frozen=True, kw_only=True)
class ExportReady(Event):
    """The file is stored and downloadable until ``expires_at``."""

    requested_by: int
    row_count: int
    size_bytes: int
    expires_at: str
    #: False for small exports made inside the request: the user already has the file.
    notify: bool = True


@dataclass(frozen=True, kw_only=True)
class ExportFailed(Event):
    """The export failed; ``final`` is false when the system will retry by itself."""

    requested_by: int
    code: str
    message: str
    retryable: bool
    final: bool
    #: False for exports made inside the request: the user saw the error in the response.
    notify: bool = True


@dataclass(frozen=True, kw_only=True)
class ExportCanceled(Event):
    """The export was canceled by a user."""


@dataclass(frozen=True, kw_only=True)
class ExportExpired(Event):
    """The file is gone: it passed its expiry, or an admin deleted it (``reason``)."""

    #: "expired" (housekeeping, past ``expires_at``) or "deleted" (by ``deleted_by``).
    reason: str = "expired"
    #: The user (or None for support staff / the system) who deleted the file early.
    deleted_by: int | None = None


EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (
        ExportRequested,
        ExportStarted,
        ExportReady,
        ExportFailed,
        ExportCanceled,
        ExportExpired,
    )
}


def decode(raw: bytes | None) -> Event:
    """Parse a message value; anything malformed raises :class:`UndecodableEvent`."""
    try:
        body = json.loads(raw or b"")
        cls = EVENT_TYPES[body.pop("type")]
        if body.pop("version") != EVENT_VERSION:
            raise ValueError("unsupported version")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in body.items() if k in names})
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise UndecodableEvent(f"undecodable event: {type(exc).__name__}") from None
