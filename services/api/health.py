"""Liveness, readiness and metrics endpoints."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shared.metrics import exposition_registry


async def healthz(request: Request) -> Response:
    """The process is up and serving."""
    return JSONResponse({"status": "ok"})


def _check_database(request: Request) -> str | None:
    try:
        with request.app.state.sessions() as session:
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
    workers sharing PROMETHEUS_MULTIPROC_DIR, every worker answers with the sum of all."""
    registry = exposition_registry(request.app.state.settings)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
