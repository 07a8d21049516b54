"""Liveness, readiness and metrics endpoints."""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest, start_http_server
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.api.errors import error_body
from services.api.state import api_state
from shared.metrics import exposition_registry
from shared.settings import Settings


async def healthz(request: Request) -> Response:
    """The process is up and serving."""
    return JSONResponse({"status": "ok"})


def _check_database(request: Request) -> str | None:
    try:
        with api_state(request).sessions() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:  # any failure means "not ready"; the type is what we report
        return type(exc).__name__
    return None


async def readyz(request: Request) -> Response:
    """Dependencies the API needs right now are reachable."""
    problem = await run_in_threadpool(_check_database, request)
    checks = {"database": "ok" if problem is None else f"failing ({problem})"}
    status = 200 if problem is None else 503
    return JSONResponse(
        {"status": "ok" if status == 200 else "unavailable", "checks": checks}, status
    )


async def metrics(request: Request) -> Response:
    """The request-side metrics (downloads, exports made inside requests); with several uvicorn
    workers sharing PROMETHEUS_MULTIPROC_DIR, every worker answers with the sum of all. With
    METRICS_PORT set they are served there instead (:class:`MetricsPort`), not on the public
    port."""
    settings = api_state(request).settings
    if settings.metrics_port:
        return JSONResponse(error_body("not_found", "Not Found"), 404)
    registry = exposition_registry(settings)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class MetricsPort:
    """``/metrics`` of the API on METRICS_PORT. Every uvicorn worker process tries to bind it;
    one gets it and serves the sum of all workers (PROMETHEUS_MULTIPROC_DIR), the others keep
    trying every few seconds, so another takes over when that worker exits."""

    #: Pause between attempts to bind a port another worker holds (seconds).
    RETRY_SECONDS = 5.0

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._stop = threading.Event()
        self._server: Any = None
        self._bind()
        self._thread: threading.Thread | None = None
        if self._server is None:
            self._thread = threading.Thread(target=self._keep_trying, name="metrics-port")
            self._thread.daemon = True
            self._thread.start()

    def _bind(self) -> None:
        try:
            self._server, _ = start_http_server(
                self._settings.metrics_port,
                addr=self._settings.metrics_host,
                registry=exposition_registry(self._settings),
            )
        except OSError:
            self._server = None

    def _keep_trying(self) -> None:
        while self._server is None and not self._stop.wait(self.RETRY_SECONDS):
            self._bind()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
