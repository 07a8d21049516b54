"""The ASGI application: ``uvicorn services.api.app:create_app --factory``."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from services.api import export_routes, health, login, openapi, pages, report
from services.api.auth import SESSION_COOKIE
from services.api.clients import trusted_networks
from services.api.errors import (
    DATABASE_ERRORS,
    handle_database_error,
    handle_domain_error,
    handle_http_exception,
)
from services.api.middleware import BodyLimitMiddleware, SecurityHeadersMiddleware
from services.api.state import ApiState
from shared import downloads, logredact
from shared.csvfile import inline_pool
from shared.db import libpq_url, make_engine, make_sessionmaker, warm_up
from shared.errors import OrdersExportError, StorageError
from shared.flags import CACHE_SECONDS, FlagCache
from shared.runner import ExportRunner
from shared.settings import Settings, load_settings
from shared.signing import SigningKeys

HERE = Path(__file__).parent
log = logging.getLogger(__name__)


def _static_url(settings: Settings) -> Callable[[str], str]:
    """Static asset URLs: under PUBLIC_URL when set, else root-relative (never the Host
    header)."""
    base = (settings.public_url or "").rstrip("/")

    def static_url(path: str) -> str:
        return f"{base}/static/{path}"

    return static_url


#: How long the stop waits for the start's warm-up thread (seconds).
WARM_UP_JOIN_SECONDS = 10
#: Export connections the API keeps for small exports made inside requests (the per-user
#: EXPORT_MAX_INLINE_PER_MINUTE limit bounds how many users can keep them busy).
INLINE_POOL_SIZE = 4


#: The API's paths of one account's exports and of one export.
ACCOUNT_EXPORTS = "/api/v1/accounts/{slug}/order-exports"
EXPORT = "/api/v1/order-exports/{export_id}"


def app_routes() -> list[BaseRoute]:
    """Every route of the app (services/api/openapi.py describes the JSON ones)."""
    return [
        Route("/", report.home, name="home"),
        Route("/login", login.login_form, methods=["GET"], name="login"),
        Route("/login", login.login, methods=["POST"]),
        Route("/logout", login.logout, methods=["POST"], name="logout"),
        Route("/healthz", health.healthz),
        Route("/readyz", health.readyz),
        Route("/metrics", health.metrics),
        Route("/openapi.json", openapi.openapi_json),
        Route("/accounts/{slug}/orders", report.orders_page, name="orders_page"),
        Route("/api/v1/accounts/{slug}/orders", report.orders_api),
        Route(ACCOUNT_EXPORTS, export_routes.create_export, methods=["POST"]),
        Route(ACCOUNT_EXPORTS, export_routes.list_exports, methods=["GET"]),
        Route(EXPORT, export_routes.get_export, methods=["GET"]),
        Route(f"{EXPORT}/retry", export_routes.retry_export, methods=["POST"]),
        Route(f"{EXPORT}/cancel", export_routes.cancel_export, methods=["POST"]),
        Route(f"{EXPORT}/file", export_routes.delete_file, methods=["DELETE"]),
        Route(f"{EXPORT}/downloads", export_routes.list_downloads, methods=["GET"]),
        Route("/exports/{export_id}/download", export_routes.download, methods=["GET"]),
        Route("/accounts/{slug}/exports", pages.request_export, methods=["POST"]),
        Route("/accounts/{slug}/exports/panel", pages.panel_items, methods=["GET"]),
        Route("/exports/{export_id}/panel", pages.export_items, methods=["GET"]),
        Route("/exports/{export_id}", pages.export_page, methods=["GET"], name="export_page"),
        Route("/exports/{export_id}/retry", pages.retry_export, methods=["POST"]),
        Route("/exports/{export_id}/cancel", pages.cancel_export, methods=["POST"]),
        Route("/exports/{export_id}/delete-file", pages.confirm_delete_file, methods=["GET"]),
        Route("/exports/{export_id}/delete-file", pages.delete_file, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]


def _templates(settings: Settings) -> Jinja2Templates:
    environment = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(),
        auto_reload=False,
    )
    environment.globals["static_url"] = _static_url(settings)
    return Jinja2Templates(env=environment)


def build_state(settings: Settings, *, flag_cache_seconds: float = CACHE_SECONDS) -> ApiState:
    """Everything the requests share: the database, the switches, the templates and, when
    STORAGE_URL is set, the storage and the runner of small exports (its pool opens now)."""
    engine = make_engine(settings.database_url, pool_timeout=settings.database_pool_timeout_seconds)
    sessions = make_sessionmaker(engine)
    flags = FlagCache(sessions, max_age=flag_cache_seconds)
    storage = settings.storage_target
    runner = None
    if storage is not None:
        runner = ExportRunner(
            settings=settings,
            sessions=sessions,
            storage=storage,
            flags=flags,
            inline_pool=inline_pool(
                libpq_url(settings.export_database_url or settings.database_url),
                size=INLINE_POOL_SIZE,
            ),
        )
    return ApiState(
        settings=settings,
        engine=engine,
        sessions=sessions,
        flags=flags,
        templates=_templates(settings),
        trusted_proxies=trusted_networks(settings.trusted_proxies),
        password_checks=threading.BoundedSemaphore(settings.login_max_concurrent_checks),
        storage_or_none=storage,
        runner_or_none=runner,
    )


def _prepare_storage(state: ApiState) -> None:
    """The bucket (or directory) and its expiry rule; storage that is down at the start is not
    fatal here: the report goes on, exports answer 503 until it is back (the worker, which
    cannot work without it, prepares it too)."""
    if state.storage_or_none is None:
        return
    try:
        state.storage_or_none.prepare()
    except StorageError as exc:
        log.warning("api: storage not prepared at the start: %s", exc.message)


def create_app(
    settings: Settings | None = None, *, flag_cache_seconds: float = CACHE_SECONDS
) -> Starlette:
    """Build the app; reads the environment only when no settings are given."""
    settings = settings or load_settings()
    SigningKeys.from_settings(settings)  # a malformed or repeated key fails the start
    logredact.install()  # access logs carry signed links: their signatures are redacted
    downloads.declare_metrics()
    state = build_state(settings, flag_cache_seconds=flag_cache_seconds)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        metrics_port = health.MetricsPort(settings) if settings.metrics_port else None
        # The first request should not pay the one-time setup; a database that is slow to
        # answer must not hold the start up either, hence a thread of its own.
        warming = threading.Thread(
            target=warm_up, args=(state.engine,), name="warm-up", daemon=True
        )
        warming.start()
        await run_in_threadpool(_prepare_storage, state)
        yield
        warming.join(WARM_UP_JOIN_SECONDS)  # its connections go back to the pool before dispose
        if metrics_port is not None:
            metrics_port.stop()
        if state.runner_or_none is not None:
            state.runner_or_none.close()
        state.engine.dispose()

    routes = app_routes()
    middleware = [
        Middleware(SecurityHeadersMiddleware, hsts=settings.session_cookie_secure),
        Middleware(BodyLimitMiddleware, max_bytes=settings.max_request_body_bytes),
        Middleware(
            SessionMiddleware,
            secret_key=settings.secret_key,
            session_cookie=SESSION_COOKIE,
            max_age=settings.session_lifetime_seconds,
            same_site="lax",
            https_only=settings.session_cookie_secure,
        ),
    ]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            OrdersExportError: handle_domain_error,
            HTTPException: handle_http_exception,
            **{error: handle_database_error for error in DATABASE_ERRORS},
        },
        lifespan=lifespan,
    )
    app.state.api = state
    return app
