"""Who is calling: bearer tokens or the session cookie, CSRF for cookie-authenticated writes."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import quote

from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import RedirectResponse

from shared.errors import CsrfFailed, Unauthenticated
from shared.identity import user_for_token
from shared.models import User

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


def credential_fingerprint(user: User) -> str:
    """Changes when the password changes, which ends every session of the user."""
    return hashlib.sha256(user.password_hash.encode()).hexdigest()[:16]


def start_session(request: Request, user: User) -> None:
    request.session.clear()
    request.session.update(
        {
            "user_id": user.id,
            "fingerprint": credential_fingerprint(user),
            "csrf": secrets.token_urlsafe(32),
        }
    )


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


def identify(request: Request, session: Session) -> Caller | None:
    """The caller, from ``Authorization: Bearer`` first, then the session cookie."""
    token = bearer_token(request)
    if token is not None:
        user = user_for_token(session, token)
        if user is None:
            raise Unauthenticated("invalid or revoked token")
        return Caller(user, via_session=False)
    user_id = request.session.get("user_id")
    if not isinstance(user_id, int):
        return None
    user = session.get(User, user_id)
    if user is None or not user.is_active:
        return None
    if not hmac.compare_digest(
        str(request.session.get("fingerprint", "")), credential_fingerprint(user)
    ):
        return None
    return Caller(user, via_session=True)


def require_caller(
    request: Request, session: Session, *, submitted_csrf: str | None = None
) -> Caller:
    """The authenticated caller; cookie-authenticated writes must carry the CSRF token."""
    caller = identify(request, session)
    if caller is None:
        raise Unauthenticated("log in or send a bearer token")
    if caller.via_session and request.method not in SAFE_METHODS:
        sent = submitted_csrf or request.headers.get(CSRF_HEADER, "")
        expected = str(request.session.get("csrf", ""))
        if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
            raise CsrfFailed("missing or invalid CSRF token")
    return caller


def authenticated(request: Request) -> Caller | None:
    """The caller, looked up before a request body is read (anonymous bodies stay unread)."""
    with request.app.state.sessions() as session:
        return identify(request, session)


def login_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)


def safe_next(target: str | None) -> str:
    """Only same-site relative paths are followed after login (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
