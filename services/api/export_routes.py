"""Export endpoints: request, list, detail, retry, cancel, and the signed download."""

from __future__ import annotations

import base64
import functools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse

from services.api import byteranges, exportviews
from services.api.auth import Caller, authenticated, check_csrf, login_redirect, require_caller
from services.api.clients import client_address
from services.api.errors import error_body, wants_html
from services.api.exportviews import export_json
from services.api.state import api_state
from shared import downloads, exports, wire
from shared.errors import (
    BadSignature,
    FileExpired,
    LinkExpired,
    OrdersExportError,
    Unauthenticated,
    ValidationError,
)
from shared.models import Account, ExportJob
from shared.signing import SigningKeys

log = logging.getLogger(__name__)

#: Responses that carry signed download links are never stored by caches.
NO_STORE = {"Cache-Control": "no-store"}


async def _json_body(request: Request) -> object:
    raw = await request.body()
    if not raw:
        return {}
    try:
        # Decimal keeps a number's exact text (1e-20000 must not quietly become 0.0).
        return json.loads(raw, parse_float=Decimal)
    except (ValueError, UnicodeDecodeError):
        raise ValidationError("body", "invalid JSON") from None
    except RecursionError:
        raise ValidationError("body", "JSON nested too deeply") from None


#: The HTTP status of each export request disposition.
STATUSES = {
    exports.Disposition.IN_FLIGHT: 200,
    exports.Disposition.MADE: 201,
    exports.Disposition.QUEUED: 202,
}


def create(
    request: Request,
    caller: Caller,
    body: object,
    idempotency_key: str | None,
    *,
    submitted_csrf: str | None = None,
) -> exports.Created:
    """Record an export request (and make a small one right away); used by the API and the form
    (its HTTP status: ``STATUSES[created.disposition]``).

    ``caller`` was identified before the body was read; a cookie's write is CSRF-checked here."""
    check_csrf(request, caller, submitted_csrf)
    state = api_state(request)
    record = functools.partial(
        exports.request_export,
        settings=state.settings,
        flags=state.flags,
        user=caller.user,
        slug=request.path_params["slug"],
        body=body,
        idempotency_key=idempotency_key,
    )
    return exports.create_export(state.sessions, state.runner, record)


def _create(
    request: Request, caller: Caller, body: object, idempotency_key: str | None
) -> tuple[dict[str, Any], int]:
    created = create(request, caller, body, idempotency_key)
    export = export_json(request, created.job, created.account, caller)
    return {"export": export}, STATUSES[created.disposition]


async def create_export(request: Request) -> Response:
    caller = await run_in_threadpool(authenticated, request)  # before reading the body
    if caller is None:
        raise Unauthenticated("log in or send a bearer token")
    body = await _json_body(request)
    idempotency_key = request.headers.get("idempotency-key")
    payload, status = await run_in_threadpool(_create, request, caller, body, idempotency_key)
    return JSONResponse(payload, status, headers=NO_STORE)


def _list(request: Request) -> dict[str, Any]:
    with api_state(request).sessions() as session:
        caller = require_caller(request, session)
        account, found = exports.list_for_account(session, request.path_params["slug"], caller.user)
        return {"exports": [export_json(request, job, account, caller) for job in found]}


async def list_exports(request: Request) -> Response:
    return JSONResponse(await run_in_threadpool(_list, request), headers=NO_STORE)


def _detail(request: Request) -> dict[str, Any]:
    with api_state(request).sessions() as session:
        caller = require_caller(request, session)
        job, account = exports.get_for_admin(session, request.path_params["export_id"], caller.user)
        return {"export": export_json(request, job, account, caller)}


async def get_export(request: Request) -> Response:
    return JSONResponse(await run_in_threadpool(_detail, request), headers=NO_STORE)


def act(
    request: Request,
    action: str,
    *,
    caller: Caller | None = None,
    submitted_csrf: str | None = None,
) -> tuple[ExportJob, Account, Caller]:
    """Retry, cancel or delete the file of the export of the path; used by the API and forms
    (these pass the ``caller`` they identified before reading the form)."""
    state = api_state(request)
    with state.sessions() as session, session.begin():
        if caller is None:
            caller = require_caller(request, session, submitted_csrf=submitted_csrf)
        else:
            check_csrf(request, caller, submitted_csrf)
        export_id = request.path_params["export_id"]
        if action == "delete_file":
            found, _ = exports.get_for_management(session, export_id, caller.user)
            job = exports.delete_file(
                session,
                state.storage,
                job=found,
                actor=f"user:{caller.user.id}",
                deleted_by=caller.user.id,
            )
        elif action == "retry":
            job = exports.retry(
                session,
                settings=state.settings,
                flags=state.flags,
                export_id=export_id,
                user=caller.user,
            )
        else:
            job = exports.cancel(session, export_id=export_id, user=caller.user)
        return job, session.get_one(Account, job.account_id), caller


def _act(request: Request, action: str) -> dict[str, Any]:
    job, account, caller = act(request, action)
    return {"export": export_json(request, job, account, caller)}


async def retry_export(request: Request) -> Response:
    return JSONResponse(await run_in_threadpool(_act, request, "retry"), 202, headers=NO_STORE)


async def cancel_export(request: Request) -> Response:
    return JSONResponse(await run_in_threadpool(_act, request, "cancel"), 202, headers=NO_STORE)


#: Content types of the stored files, by ``options.compression``.
CONTENT_TYPES = {"none": "text/csv; charset=utf-8", "gzip": "application/gzip"}


async def delete_file(request: Request) -> Response:
    """``DELETE /api/v1/order-exports/{id}/file``: the file goes now, the export is expired."""
    return JSONResponse(
        await run_in_threadpool(_act, request, "delete_file"), 200, headers=NO_STORE
    )


def _downloads(request: Request) -> dict[str, Any]:
    with api_state(request).sessions() as session:
        caller = require_caller(request, session)
        export_id = request.path_params["export_id"]
        job, _ = exports.get_for_management(session, export_id, caller.user)
        return wire.DownloadList.model_validate(
            {"downloads": downloads.recent(session, job.id)}
        ).to_json()


async def list_downloads(request: Request) -> Response:
    """``GET /api/v1/order-exports/{id}/downloads``: the audit trail, for account admins."""
    return JSONResponse(await run_in_threadpool(_downloads, request), headers=NO_STORE)


@dataclass(frozen=True)
class _File:
    key: str
    name: str
    size: int
    sha256: str | None
    content_type: str
    #: The one range to send (None: the whole file); ``unsatisfiable`` answers 416.
    range: byteranges.ByteRange | None = None
    unsatisfiable: bool = False
    #: A presigned storage URL to send the caller to instead of streaming (redirect mode).
    redirect_url: str | None = None

    @property
    def etag(self) -> str | None:
        return f'"{self.sha256}"' if self.sha256 else None


def _file_of(request: Request, job: ExportJob) -> _File:
    """What this request gets of the export's file: all of it, a range, 416, or a redirect."""
    assert job.storage_key is not None and job.file_name is not None
    state = api_state(request)
    storage = state.storage
    size = job.size_bytes if job.size_bytes is not None else storage.size(job.storage_key)
    file = _File(
        job.storage_key,
        job.file_name,
        size,
        job.sha256,
        CONTENT_TYPES.get(job.compression, CONTENT_TYPES["none"]),
    )
    try:
        wanted = byteranges.requested_range(
            request.headers.get("range"),
            request.headers.get("if-range"),
            size=size,
            etag=file.etag,
        )
    except byteranges.RangeNotSatisfiable:
        file = replace(file, unsatisfiable=True)
    else:
        file = replace(file, range=wanted)
    seconds = state.settings.export_download_redirect_seconds
    if seconds:
        url = storage.presigned_get(
            file.key, expires_seconds=seconds, filename=file.name, content_type=file.content_type
        )
        if url is not None:  # storage serves the bytes (ranges too); we only point there
            file = replace(file, redirect_url=url, unsatisfiable=False)
    return file


#: Refusals of a download link that a browser sees on the export's page, with a fresh link.
LANDED = (LinkExpired, FileExpired, BadSignature)


def _authorize_download(request: Request) -> _File | Response:
    """Check the link and the caller, and append the attempt to the audit trail either way; a
    browser with a link it cannot use gets the export's page instead (same session)."""
    state = api_state(request)
    export_id = request.path_params["export_id"]
    client_ip = client_address(request) if request.client else None
    caller: Caller | None = None

    def audit(
        session: Session, outcome: downloads.DownloadOutcome, file: _File | None = None
    ) -> None:
        downloads.record(
            session,
            export_id=export_id,
            user_id=caller.user.id if caller else None,
            outcome=outcome,
            client_ip=client_ip,
            byte_range=file.range.spec if file and file.range else None,
            redirect=file is not None and file.redirect_url is not None,
        )
        session.commit()

    with state.sessions() as session:
        try:
            caller = require_caller(request, session)
            job, _ = downloads.authorize(
                session,
                keys=SigningKeys.from_settings(state.settings),
                export_id=export_id,
                user=caller.user,
                expires=request.query_params.get("expires", ""),
                signature=request.query_params.get("signature", ""),
            )
        except OrdersExportError as exc:
            audit(session, downloads.outcome_of(exc))
            if isinstance(exc, LANDED) and caller is not None and wants_html(request):
                return exportviews.landing(request, session, caller, exc)
            raise
        try:
            file = _file_of(request, job)
        except OrdersExportError:  # storage unreachable: authorized, audited, then a 503
            audit(session, downloads.DownloadOutcome.OK)
            raise
        audit(session, downloads.DownloadOutcome.OK, file)
        return file


async def download(request: Request) -> Response:
    try:
        file = await run_in_threadpool(_authorize_download, request)
    except Unauthenticated:
        if wants_html(request):
            return login_redirect(request)
        raise
    if isinstance(file, Response):
        return file
    headers = {
        "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
    }
    if file.redirect_url is not None:
        return RedirectResponse(file.redirect_url, 302, headers=headers)
    headers["Accept-Ranges"] = "bytes"
    if file.sha256:
        headers["ETag"] = f'"{file.sha256}"'
        digest = base64.b64encode(bytes.fromhex(file.sha256)).decode()
        headers["Repr-Digest"] = f"sha-256=:{digest}:"
    if file.unsatisfiable:
        headers["Content-Range"] = f"bytes */{file.size}"
        body = error_body("range_not_satisfiable", "the requested range is not in the file")
        return JSONResponse(body, 416, headers=headers)
    headers["Content-Disposition"] = f'attachment; filename="{file.name}"'
    offset, length, status = 0, None, 200
    if file.range is not None:
        offset, length, status = file.range.start, file.range.length, 206
        headers["Content-Range"] = file.range.content_range
    headers["Content-Length"] = str(file.size if length is None else length)
    chunks: Iterator[bytes] = await run_in_threadpool(
        functools.partial(api_state(request).storage.open, file.key, offset=offset, length=length)
    )
    return StreamingResponse(chunks, status, media_type=file.content_type, headers=headers)
