"""How exports look in the web pages: the Exports panel, the export's page, and their wording.

The templates render the API's ``<Export>`` objects (``shared.exports.to_json``); the panel is
drawn on the server only. While work is in flight ``static/exports.js`` polls the panel's HTML
fragment (:func:`account_items`, :func:`export_items`) and swaps the items that changed; the few
words it says itself are handed to it as JSON (:attr:`ExportUi.config`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import Response

from services.api.auth import Caller, csrf_token
from services.api.clients import public_origin
from services.api.errors import status_for
from services.api.state import api_state
from shared import downloads, export_options, exports, failures, support
from shared.errors import NotFound, OrdersExportError
from shared.filters import DEFAULT_SORT, SORT_LABELS, OrderFilters, from_snapshot
from shared.formatting import duration, file_size, local_time
from shared.models import Account, ExportJob, Role

#: Exports listed in the report page's panel, newest first (count).
PANEL_SIZE = 8
#: How often the script polls while an export is queued or running (milliseconds).
ACTIVE_POLL_MS = 1000
#: How often it polls otherwise, to show exports started elsewhere (milliseconds).
IDLE_POLL_MS = 10_000
#: Session key of the one-shot message shown after a form redirects back.
FLASH_KEY = "flash"

#: The name of each state: a state is never told by colour alone.
STATE_LABELS = {
    "queued": "Queued",
    "running": "Running",
    "ready": "Ready",
    "failed": "Failed",
    "canceled": "Canceled",
    "expired": "Expired",
}
#: What the user is told after asking for an export, by the request's HTTP status.
REQUESTED = {
    200: "An identical export of yours is already in progress; it is shown in the Exports panel.",
    201: "Your export is ready: download it from the Exports panel.",
    202: "Export requested. It runs in the background: follow it in the Exports panel; "
    "we also email you when it is ready.",
}
#: What Delete file warns of before it deletes (the confirmation step and dialog).
DELETE_WARNING = (
    "It holds customer data; every link to it stops working for everyone. This cannot be undone."
)
#: What the buttons say (and what the script says while it waits).
MESSAGES = {
    "requesting": "Requesting the export…",
    "working": "Working…",
    "canceled": "Export canceled.",
    "retried": "Export queued again.",
    "deleted": "File deleted.",
    "confirm_delete": "Delete this export's file now? " + DELETE_WARNING,
    "session_ended": "Your session has ended. Reload the page to log in again.",
    "offline": "Could not reach the server; the list will update when it is back.",
}
#: Why exports cannot be requested right now (the ``exports_enabled`` switch is off).
DISABLED = "Exports are switched off for now. Files that are already made stay downloadable."
#: The notice on the export's page when a download link could not be used, by error code.
LANDING = {
    "link_expired": "This download link has expired.",
    "file_expired": "This export's file has expired and was deleted.",
    "bad_signature": "This download link is not valid for you: it was made for someone else "
    "or has been changed.",
}
#: How the notice goes on, by the export's state now.
LANDING_NEXT = {
    "ready": "Use the fresh download link below; it is made for you.",
    "expired": "Export the same filters again for a fresh file.",
}

#: Download attempts listed on the export's page, newest first (count).
PAGE_DOWNLOADS = 10
#: How the export's page words each download outcome.
DOWNLOAD_OUTCOMES = {
    "ok": "Downloaded",
    "unauthenticated": "Refused: not logged in",
    "forbidden": "Refused: not an admin",
    "not_found": "Refused: no such export",
    "bad_signature": "Refused: link not valid for this user",
    "link_expired": "Refused: link expired",
    "file_expired": "Refused: file expired or deleted",
}


@dataclass(frozen=True)
class ExportUi:
    """Formatting and wording for the export templates, and the script's configuration."""

    csrf: str
    timezone: str
    #: Where the no-JavaScript forms come back to.
    next: str
    enabled: bool
    #: JSON endpoint the script polls (the account's list, or one export).
    poll_url: str
    extra: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=lambda: dict(STATE_LABELS))
    #: The support verdict (``shared.support.diagnose``) in the account admin's words.
    verdicts: dict[str, str] = field(
        default_factory=lambda: {v.value: words for v, words in support.USER_WORDS.items()}
    )

    def local_time(self, iso: str | None) -> str:
        if not iso:
            return ""
        return local_time(dt.datetime.fromisoformat(iso), self.timezone)

    def waited(self, iso: str | None) -> str:
        if not iso:
            return ""
        return duration((dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(iso)).total_seconds())

    def number(self, value: int | None) -> str:
        return "?" if value is None else f"{value:,}"

    def size(self, value: int | None) -> str:
        return file_size(value)

    def summary(self, snapshot: dict[str, Any]) -> str:
        return from_snapshot(snapshot).summary()

    def sort(self, snapshot: dict[str, Any]) -> str:
        return SORT_LABELS.get(snapshot.get("sort") or DEFAULT_SORT, "")

    def narrower(self, export: dict[str, Any]) -> bool:
        """True when the user fixes the failure by asking for fewer rows."""
        error = export.get("error") or {}
        advice = failures.advice_for(error.get("code"), retryable=bool(error.get("retryable")))
        return advice is failures.Advice.NARROW

    def hint(self, export: dict[str, Any]) -> str:
        """What to do about a failed export: retry, narrow the filters, or contact support."""
        error = export.get("error") or {}
        return failures.advice_text(
            error.get("code"), retryable=bool(error.get("retryable")), export_id=export["id"]
        )

    def announce(self, export: dict[str, Any]) -> str:
        """What the page says when the export reaches its present state (the script)."""
        summary = self.summary(export["filters"])
        if export["state"] == "ready":
            rows = self.number(export["row_count"])
            return f"Export ready: {rows} rows ({summary}). Download it below."
        if export["state"] == "failed" and export.get("error"):
            return f"Export failed: {export['error']['message']}"
        return f"Export {self.labels[export['state']].lower()}: {summary}."

    def key(self, export: dict[str, Any]) -> str:
        """Changes when an item must be drawn anew (the script compares it)."""
        error = export.get("error") or {}
        link = 1 if export.get("download_url") else 0
        return (
            f"{export['state']}|{error.get('code', '')}|{export['attempts']}|"
            f"{export['verdict']}|{link}"
        )

    def options(self, export: dict[str, Any]) -> str:
        """The options the export used, in words ("" when none)."""
        return export_options.options_text(export.get("options") or {})

    def deleted(self, export: dict[str, Any]) -> str:
        """``deleted by <name> at <time>`` when an admin deleted the file ("" otherwise)."""
        deleted = export.get("deleted")
        if not deleted:
            return ""
        return f"deleted by {deleted['by']} at {self.local_time(deleted['at'])}"

    def download_outcome(self, attempt: dict[str, Any]) -> str:
        outcome = str(attempt["outcome"])
        text = DOWNLOAD_OUTCOMES.get(outcome, outcome)
        if attempt.get("bytes"):
            text += f" (bytes {attempt['bytes']})"
        if attempt.get("redirect"):
            text += " (sent to storage)"
        return text

    def report_url(self, export: dict[str, Any]) -> str:
        """The report with the export's filters, to look at them again or change them."""
        return report_url(export["account"], from_snapshot(export["filters"]))

    @property
    def config(self) -> dict[str, Any]:
        return {
            "csrf": self.csrf,
            "next": self.next,
            "enabled": self.enabled,
            "poll_url": self.poll_url,
            "active_poll_ms": ACTIVE_POLL_MS,
            "idle_poll_ms": IDLE_POLL_MS,
            "requested": {str(k): v for k, v in REQUESTED.items()},
            "messages": MESSAGES,
            "disabled": DISABLED,
            "delete_warning": DELETE_WARNING,
            **self.extra,
        }


def report_url(slug: str, filters: OrderFilters) -> str:
    """The report page showing ``filters`` (a link that can be shared and reloaded)."""
    query = urlencode(filters.to_query())
    return f"/accounts/{slug}/orders" + (f"?{query}" if query else "")


def flash(request: Request, text: str, *, kind: str = "info") -> None:
    """Keep a message for the next page this browser shows (after a form's redirect)."""
    request.session[FLASH_KEY] = {"kind": kind, "text": text}


def take_flash(request: Request) -> dict[str, str] | None:
    value = request.session.pop(FLASH_KEY, None)
    return value if isinstance(value, dict) else None


def panel_url(path: str, next_path: str) -> str:
    """The HTML fragment the script polls; ``next`` is where the items' forms come back to."""
    return f"{path}?{urlencode({'next': next_path})}"


def _next_within(request: Request, prefix: str) -> str:
    """The ``next`` the script passed, if it is a page under ``prefix`` (else ``prefix``)."""
    wanted = request.query_params.get("next", "")
    return wanted if wanted.startswith(prefix) and not wanted.startswith("//") else prefix


def account_items(request: Request, session: Session, caller: Caller, slug: str) -> Response:
    """The list items of the account's Exports panel, as HTML: what the script swaps in. Only
    admins of the account see them (404 / 403 otherwise)."""
    account, found = exports.list_for_account(session, slug, caller.user, limit=PANEL_SIZE)
    items = [export_json(request, job, account, caller) for job in found]
    return _items(request, account, items, back=f"/accounts/{account.slug}/orders")


def export_items(request: Request, session: Session, caller: Caller, export_id: str) -> Response:
    """The export's item on its own page, as HTML (404 unless the caller is an admin of its
    account)."""
    job, account = exports.get_for_admin(session, export_id, caller.user)
    items = [export_json(request, job, account, caller)]
    return _items(request, account, items, back=f"/exports/{job.id}")


def _items(
    request: Request, account: Account, items: list[dict[str, Any]], *, back: str
) -> Response:
    state = api_state(request)
    ui = ExportUi(
        csrf=csrf_token(request),
        timezone=account.timezone,
        next=_next_within(request, back),
        enabled=state.flags.get("exports_enabled"),
        poll_url=str(request.url),
    )
    return state.templates.TemplateResponse(
        request,
        "_export_items.html",
        {"exports": items, "ui": ui},
        headers={"Cache-Control": "no-store"},  # signed links
    )


def current_path(request: Request) -> str:
    return request.url.path + (f"?{request.url.query}" if request.url.query else "")


def export_json(
    request: Request, job: ExportJob, account: Account, caller: Caller
) -> dict[str, Any]:
    """The API's ``<Export>`` of ``job`` as ``caller`` sees it (links signed for them)."""
    return exports.to_json(
        job,
        account=account,
        settings=api_state(request).settings,
        viewer=caller.user,
        base_url=public_origin(request),
    )


def panel_context(
    request: Request,
    session: Session,
    caller: Caller,
    account: Account,
    role: Role,
    filters: OrderFilters,
) -> dict[str, Any]:
    """What the report page needs for its export button and Exports panel.

    ``filters`` are the APPLIED filters (what the table shows): the button exports those.
    """
    enabled = api_state(request).flags.get("exports_enabled")
    items: list[dict[str, Any]] = []
    if role is Role.ADMIN:
        _, found = exports.list_for_account(session, account.slug, caller.user, limit=PANEL_SIZE)
        items = [export_json(request, job, account, caller) for job in found]
    ui = ExportUi(
        csrf=csrf_token(request),
        timezone=account.timezone,
        next=current_path(request),
        enabled=enabled,
        poll_url=panel_url(f"/accounts/{account.slug}/exports/panel", current_path(request)),
        extra={
            "create_url": f"/api/v1/accounts/{account.slug}/order-exports",
            "filters": filters.to_snapshot(),
        },
    )
    return {
        "ui": ui,
        "exports": items,
        "exports_enabled": enabled,
        "can_export": role is Role.ADMIN,
        "flash": take_flash(request),
    }


def export_page(
    request: Request,
    session: Session,
    caller: Caller,
    export_id: str,
    *,
    notice: str | None = None,
    status_code: int = 200,
    confirm_delete: bool = False,
) -> Response:
    """The export's own page (404 unless the caller is an admin of its account right now).

    ``confirm_delete`` shows the confirmation step of Delete file (the no-JavaScript way).
    """
    state = api_state(request)
    job, account = exports.get_for_admin(session, export_id, caller.user)
    export = export_json(request, job, account, caller)
    recent = downloads.recent(session, job.id, limit=PAGE_DOWNLOADS)
    ui = ExportUi(
        csrf=csrf_token(request),
        timezone=account.timezone,
        next=f"/exports/{export['id']}",
        enabled=state.flags.get("exports_enabled"),
        poll_url=panel_url(f"/exports/{export['id']}/panel", f"/exports/{export['id']}"),
    )
    if notice is not None and export["state"] in LANDING_NEXT:
        notice = f"{notice} {LANDING_NEXT[export['state']]}"
    context = {
        "user": caller.user,
        "account": account,
        "export": export,
        "exports": [export],
        "ui": ui,
        "notice": notice,
        "flash": take_flash(request),
        "csrf": ui.csrf,
        "downloads": recent,
        "confirm_delete": confirm_delete and export["state"] == "ready",
    }
    return state.templates.TemplateResponse(
        request,
        "export.html",
        context,
        status_code=status_code,
        headers={"Cache-Control": "no-store"},  # it holds a signed link
    )


def landing(request: Request, session: Session, caller: Caller, exc: OrdersExportError) -> Response:
    """Where a browser lands with a download link it cannot use: the export's page, explained."""
    try:
        return export_page(
            request,
            session,
            caller,
            request.path_params["export_id"],
            notice=LANDING.get(exc.code, exc.message),
            status_code=status_for(exc),
        )
    except NotFound:
        raise exc from None
