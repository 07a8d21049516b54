"""Who is calling: bearer tokens or the session cookie, CSRF for cookie-authenticated writes."""

from __future__ import annotations

import datetime as dt
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from services.api.state import api_state
from shared.db import transaction
from shared.errors import CsrfFailed, Unauthenticated
from shared.identity import (
    end_web_session,
    needs_touch,
    token_and_user,
    touch_token,
    touch_web_session,
    web_session,
)
from shared.models import User

#: Name of the session cookie (signed; holds the server-side session's random id and the CSRF
#: token).
SESSION_COOKIE = "oex_session"

#: Form field and header that carry the CSRF token.
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
#: Methods that never change state (no CSRF check).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Caller:
    """An authenticated user and how they proved it."""

    user: User
    via_session: bool


#: Key of the server-side session's random id in the (signed) session cookie.
SESSION_ID_KEY = "sid"


def start_session(request: Request, sid: str) -> None:
    """Put a new server-side session (see :func:`shared.identity.start_web_session`) in the
    cookie: a fresh cookie state, so nothing from before the login carries over (fixation)."""
    request.session.clear()
    request.session.update({SESSION_ID_KEY: sid, "csrf": secrets.token_urlsafe(32)})


def csrf_token(request: Request) -> str:
    """The session's CSRF token (created for anonymous sessions too, e.g. the login form)."""
    token = request.session.get("csrf")
    if not token:
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return str(token)


def bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _in_own_transaction(request: Request, work: Callable[[Session], None]) -> None:
    """Usage stamps and ended sessions are written apart from the request's own (often
    read-only, never committed) session."""
    with transaction(api_state(request).sessions) as writer:
        work(writer)


def _session_user(request: Request, session: Session) -> User | None:
    """The user of the cookie's server-side session while it is valid; an expired session or
    one of a deactivated user is deleted."""
    sid = request.session.get(SESSION_ID_KEY)
    if not isinstance(sid, str):
        return None
    row = web_session(session, sid)
    if row is None:
        return None
    settings = api_state(request).settings
    now = dt.datetime.now(dt.UTC)
    user = session.get(User, row.user_id)
    if (
        user is None
        or not user.is_active
        or now - row.last_seen_at >= dt.timedelta(seconds=settings.session_idle_seconds)
        or now - row.created_at >= dt.timedelta(seconds=settings.session_lifetime_seconds)
    ):
        _in_own_transaction(request, lambda writer: end_web_session(writer, sid))
        return None
    if needs_touch(row.last_seen_at):
        _in_own_transaction(request, lambda writer: touch_web_session(writer, sid))
    return user


def identify(request: Request, session: Session) -> Caller | None:
    """The caller, from ``Authorization: Bearer`` first, then the session cookie."""
    token = bearer_token(request)
    if token is not None:
        found = token_and_user(session, token)  # one query for the token and its user
        if found is None:
            raise Unauthenticated("invalid, expired or revoked token")
        api_token, owner = found
        if needs_touch(api_token.last_used_at):
            token_id = api_token.id
            _in_own_transaction(request, lambda writer: touch_token(writer, token_id))
        return Caller(owner, via_session=False)
    user = _session_user(request, session)
    return None if user is None else Caller(user, via_session=True)


def require_caller(
    request: Request, session: Session, *, submitted_csrf: str | None = None
) -> Caller:
    """The authenticated caller; cookie-authenticated writes must carry the CSRF token."""
    caller = identify(request, session)
    if caller is None:
        raise Unauthenticated("log in or send a bearer token")
    check_csrf(request, caller, submitted_csrf)
    return caller


def check_csrf(request: Request, caller: Caller, submitted_csrf: str | None = None) -> None:
    """A cookie-authenticated write must carry the session's CSRF token (form field or
    header); bearer tokens and safe methods need none."""
    if caller.via_session and request.method not in SAFE_METHODS:
        sent = submitted_csrf or request.headers.get(CSRF_HEADER, "")
        expected = str(request.session.get("csrf", ""))
        if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
            raise CsrfFailed("missing or invalid CSRF token")


def authenticated(request: Request) -> Caller | None:
    """The caller, looked up before a request body is read (anonymous bodies stay unread); the
    handler hands it on, so the request is identified once (CSRF: :func:`check_csrf`)."""
    with api_state(request).sessions() as session:
        return identify(request, session)


def for_caller(request: Request, page: Callable[[Session, Caller], Response]) -> Response:
    """A browser page drawn for its caller, identified in the page's own session (one session
    per request); no caller: the login form, then back here."""
    with api_state(request).sessions() as session:
        caller = identify(request, session)
        if caller is None:
            return login_redirect(request)
        return page(session, caller)


def login_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)


def safe_next(target: str | None) -> str:
    """Only same-site relative paths are followed after login (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
