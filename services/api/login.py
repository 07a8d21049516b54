"""Login and logout for browser users (session cookie)."""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.api.auth import (
    CSRF_FIELD,
    SESSION_ID_KEY,
    authenticated,
    check_csrf,
    csrf_token,
    safe_next,
    start_session,
)
from services.api.clients import client_address
from services.api.errors import redirect
from services.api.state import api_state
from shared.db import transaction
from shared.errors import Forbidden, Overloaded, Unauthenticated
from shared.identity import (
    authenticate,
    clear_login_failures,
    end_web_session,
    reserve_login_check,
    start_web_session,
)
from shared.models import User


def _same_origin(request: Request) -> bool:
    """Login CSRF defence: a browser's Origin (or Referer) must be this site when sent."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        return source is None
    parts = urlsplit(source)
    return f"{parts.scheme}://{parts.netloc}" == f"{request.url.scheme}://{request.url.netloc}"


async def login_form(request: Request) -> Response:
    return api_state(request).templates.TemplateResponse(
        request,
        "login.html",
        {
            "next": safe_next(request.query_params.get("next")),
            "csrf": csrf_token(request),
            "error": None,
        },
    )


def _login(request: Request, email: str, password: str) -> tuple[User, str] | None:
    state = api_state(request)
    settings, checks = state.settings, state.password_checks
    if not checks.acquire(blocking=False):  # never a pile-up of argon2 threads and memory
        raise Overloaded("too many logins at this moment; try again shortly", retry_after=1)
    try:
        with state.sessions() as session, session.begin():
            reserve_login_check(
                session,
                email=email,
                client=client_address(request),
                max_per_email=settings.login_max_failures,
                max_per_client=settings.login_max_failures_per_client,
                window_seconds=settings.login_throttle_window_seconds,
            )
        # Committed: the reservation counts for every concurrent attempt from here on.
        with state.sessions() as session, session.begin():
            user = authenticate(session, email, password)
            if user is None:
                return None
            clear_login_failures(session, email)
            old = request.session.get(SESSION_ID_KEY)
            if isinstance(old, str):  # logging in again (perhaps as someone else) ends it
                end_web_session(session, old)
            return user, start_web_session(session, user)
    finally:
        checks.release()


async def login(request: Request) -> Response:
    if not _same_origin(request):
        raise Forbidden("cross-site login refused")
    form = await request.form()
    email = str(form.get("email", ""))[:320]
    password = str(form.get("password", ""))[:1024]
    target = safe_next(str(form.get("next", "")) or None)
    started = await run_in_threadpool(_login, request, email, password)
    wants_json = "application/json" in request.headers.get("accept", "")
    if started is None:
        if wants_json:
            return JSONResponse(
                {"error": {"code": "invalid_credentials", "message": "invalid email or password"}},
                401,
            )
        return api_state(request).templates.TemplateResponse(
            request,
            "login.html",
            {
                "next": target,
                "csrf": csrf_token(request),
                "error": "Invalid email or password.",
                "email": email,
            },
            status_code=401,
        )
    user, sid = started
    start_session(request, sid)
    if wants_json:
        return JSONResponse(
            {"user": {"id": user.id, "email": user.email}, "csrf_token": request.session["csrf"]}
        )
    return redirect(target)


def _end_session(request: Request) -> None:
    sid = request.session.get(SESSION_ID_KEY)
    if isinstance(sid, str):
        with transaction(api_state(request).sessions) as session:
            end_web_session(session, sid)


async def logout(request: Request) -> Response:
    caller = await run_in_threadpool(authenticated, request)  # before reading the form
    if caller is None:
        raise Unauthenticated("log in or send a bearer token")
    form = await request.form()
    submitted = form.get(CSRF_FIELD)
    check_csrf(request, caller, str(submitted) if submitted else None)
    await run_in_threadpool(_end_session, request)  # a copied cookie dies with it
    request.session.clear()
    return redirect("/login")
