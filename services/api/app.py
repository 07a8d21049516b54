"""The ASGI application: ``uvicorn services.api.app:create_app --factory``."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from services.api import export_routes, health, login, openapi, pages, report
from services.api.auth import SESSION_COOKIE
from services.api.clients import trusted_networks
from services.api.errors import handle_domain_error, handle_http_exception
from services.api.middleware import BodyLimitMiddleware, SecurityHeadersMiddleware
from shared import downloads, logredact
from shared.db import make_engine, make_sessionmaker, warm_up
from shared.errors import OrdersExportError
from shared.flags import FlagCache
from shared.settings import Settings, load_settings
from shared.signing import SigningKeys

HERE = Path(__file__).parent


def _static_url(settings: Settings) -> Callable[[str], str]:
    """Static asset URLs: under PUBLIC_URL when set, else root-relative (never the Host
    header)."""
    base = (settings.public_url or "").rstrip("/")

    def static_url(path: str) -> str:
        return f"{base}/static/{path}"

    return static_url


#: How long the stop waits for the start's warm-up thread (seconds).
WARM_UP_JOIN_SECONDS = 10


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
        Route(
            "/api/v1/accounts/{slug}/order-exports", export_routes.create_export, methods=["POST"]
        ),
        Route("/api/v1/accounts/{slug}/order-exports", export_routes.list_exports, methods=["GET"]),
        Route("/api/v1/order-exports/{export_id}", export_routes.get_export, methods=["GET"]),
        Route(
            "/api/v1/order-exports/{export_id}/retry", export_routes.retry_export, methods=["POST"]
        ),
        Route(
            "/api/v1/order-exports/{export_id}/cancel",
            export_routes.cancel_export,
            methods=["POST"],
        ),
        Route(
            "/api/v1/order-exports/{export_id}/file", export_routes.delete_file, methods=["DELETE"]
        ),
        Route(
            "/api/v1/order-exports/{export_id}/downloads",
            export_routes.list_downloads,
            methods=["GET"],
        ),
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


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the app; reads the environment only when no settings are given."""
    settings = settings or load_settings()
    SigningKeys.from_settings(settings)  # a malformed or repeated key fails the start
    logredact.install()  # access logs carry signed links: their signatures are redacted
    engine = make_engine(settings.database_url)
    downloads.declare_metrics()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        metrics_port = health.MetricsPort(settings) if settings.metrics_port else None
        # The first request should not pay the one-time setup; a database that is slow to
        # answer must not hold the start up either, hence a thread of its own.
        warming = threading.Thread(target=warm_up, args=(engine,), name="warm-up", daemon=True)
        warming.start()
        yield
        warming.join(WARM_UP_JOIN_SECONDS)  # its connections go back to the pool before dispose
        if metrics_port is not None:
            metrics_port.stop()
        runner = getattr(app.state, "runner", None)
        if runner is not None:
            runner.close()
        engine.dispose()

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
        },
        lifespan=lifespan,
    )
    environment = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(),
        auto_reload=False,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = make_sessionmaker(engine)
    app.state.flags = FlagCache(app.state.sessions)
    app.state.storage = None
    app.state.runner = None
    app.state.templates = Jinja2Templates(env=environment)
    environment.globals["static_url"] = _static_url(settings)
    app.state.trusted_proxies = trusted_networks(settings.trusted_proxies)
    app.state.password_checks = threading.BoundedSemaphore(settings.login_max_concurrent_checks)
    return app
