"""The OpenAPI 3.1 description of the JSON API, served at ``GET /openapi.json``, generated.

The schemas are the wire models' own (``shared/wire.py``, pydantic's ``model_json_schema``), the
paths are the app's routes (``services/api/app.py``) that :data:`OPERATIONS` describes, and the
error statuses of each operation come from the error -> status table (``services/api/errors.py``).
The schemathesis tests (tests/integration/test_openapi.py) check the running app against it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from services.api import export_routes, health, report
from services.api.auth import SESSION_COOKIE
from services.api.errors import STATUS_BY_ERROR
from shared import errors, wire
from shared.exports import MAX_IDEMPOTENCY_KEY
from shared.models import ORDER_CHANNELS, ORDER_STATUSES
from shared.report import MAX_PAGE_SIZE

#: Where the schemas are referenced from.
REF = "#/components/schemas/{model}"
#: What each error status means to a client.
MEANING = {
    401: "not authenticated",
    403: "not allowed (member, bad signature or CSRF)",
    404: "unknown, or not visible to the caller",
    409: "not possible in the current state",
    410: "link or file expired",
    413: "request body larger than MAX_REQUEST_BODY_BYTES (`body_too_large`)",
    422: "invalid input; `field` names it",
    429: "too many requests; see Retry-After",
    503: "exports switched off, storage or the database unavailable, or the API overloaded",
}
#: Errors any authenticated API call may answer with (each needs the database).
AUTH_ERRORS = (errors.Unauthenticated, errors.NotFound, errors.DatabaseUnavailable)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _header(description: str) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "string"}}


def _file_headers() -> dict[str, Any]:
    return {
        "Accept-Ranges": _header("bytes"),
        "Content-Length": _header("bytes in this response"),
        "ETag": _header('"<sha256 hex of the stored file>"'),
        "Repr-Digest": _header("sha-256=:<base64 of that sha256>: (RFC 9530)"),
        "Content-Disposition": _header('attachment; filename="orders-<slug>-<YYYYMMDD-HHMM>.csv"'),
    }


def _file_content() -> dict[str, Any]:
    """text/csv, or application/gzip for ``options.compression = "gzip"`` (``.csv.gz``)."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {"text/csv": binary, "application/gzip": binary}


def _filter_parameters() -> list[dict[str, Any]]:
    """The report's filters as query parameters, with the wire model's own field schemas."""
    fields = wire.Filters.model_json_schema()["properties"]
    empty = {"type": "string", "maxLength": 0}  # an empty value counts as not given
    date = {"anyOf": [{"type": "string", "format": "date"}, empty]}
    decimal = {"anyOf": [fields["min_total"]["anyOf"][0], empty]}
    sort = fields["sort"]

    def query(name: str, schema: dict[str, Any], description: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "in": "query",
            "required": False,
            "schema": schema,
            "description": description,
            **extra,
        }

    return [
        query(
            "status",
            {"type": "array", "items": {"type": "string", "enum": list(ORDER_STATUSES)}},
            "any of",
            style="form",
            explode=True,
        ),
        query(
            "channel",
            {"type": "array", "items": {"type": "string", "enum": list(ORDER_CHANNELS)}},
            "any of",
            style="form",
            explode=True,
        ),
        query("placed_from", date, "first day, inclusive, in the account timezone"),
        query("placed_to", date, "last day, inclusive, in the account timezone"),
        query("q", fields["q"]["anyOf"][0], "substring of number, customer name or email"),
        query("min_total", decimal, "inclusive"),
        query("max_total", decimal, "inclusive"),
        query("sort", sort, "order; ties broken by order id"),
    ]


def _path_slug() -> dict[str, Any]:
    return {
        "name": "slug",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]*$"},
    }


def _path_export() -> dict[str, Any]:
    return {
        "name": "export_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "format": "uuid"},
    }


@dataclass(frozen=True)
class Operation:
    """What the document says of one route's method."""

    summary: str
    #: Status -> (the body's model or None, what it means).
    responses: dict[int, tuple[type[BaseModel] | None, str]]
    #: The domain errors it may answer with (their statuses come from STATUS_BY_ERROR).
    errors: tuple[type[errors.OrdersExportError], ...] = ()
    parameters: Callable[[], list[dict[str, Any]]] = list
    request: type[BaseModel] | None = None
    public: bool = False
    #: Responses that are not JSON models (files, redirects), as OpenAPI objects.
    extra: dict[str, Any] = field(default_factory=dict)


def _idempotency_key() -> list[dict[str, Any]]:
    return [
        _path_slug(),
        {
            "name": "Idempotency-Key",
            "in": "header",
            "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY},
        },
    ]


def _report_parameters() -> list[dict[str, Any]]:
    return [
        _path_slug(),
        *_filter_parameters(),
        {
            "name": "limit",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE},
        },
        {
            "name": "cursor",
            "in": "query",
            "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]*$"},
            "description": "the previous page's next_cursor (opaque)",
        },
    ]


def _download_parameters() -> list[dict[str, Any]]:
    return [
        _path_export(),
        {"name": "expires", "in": "query", "required": True, "schema": {"type": "string"}},
        {"name": "signature", "in": "query", "required": True, "schema": {"type": "string"}},
        {
            "name": "Range",
            "in": "header",
            "schema": {"type": "string", "example": "bytes=1048576-"},
            "description": "one range: bytes=A-B, bytes=A- or bytes=-N",
        },
        {
            "name": "If-Range",
            "in": "header",
            "schema": {"type": "string"},
            "description": "the ETag: the range is served only if it matches",
        },
    ]


def _download_responses() -> dict[str, Any]:
    return {
        "200": {
            "description": "the whole file",
            "headers": _file_headers(),
            "content": _file_content(),
        },
        "206": {
            "description": "the one range asked for",
            "headers": {**_file_headers(), "Content-Range": _header("bytes A-B/SIZE")},
            "content": _file_content(),
        },
        "302": {
            "description": "redirect mode (EXPORT_DOWNLOAD_REDIRECT_SECONDS > 0, S3 storage): a "
            "presigned storage URL valid that many seconds",
            "headers": {
                "Location": _header("the presigned URL"),
                "Cache-Control": _header("no-store"),
            },
        },
        "416": {
            **_json(wire.ErrorBody, "the range is not in the file"),
            "headers": {"Content-Range": _header("bytes */SIZE")},
        },
    }


_ENVELOPE = wire.ExportEnvelope
_WRITE_ERRORS = (*AUTH_ERRORS, errors.Forbidden, errors.Conflict)

#: The JSON routes the document describes, by their endpoint.
OPERATIONS: dict[Callable[..., Any], Operation] = {
    report.orders_api: Operation(
        "One page of the orders report",
        {200: (wire.ReportPage, "the page")},
        (*AUTH_ERRORS, errors.ValidationError),
        _report_parameters,
    ),
    export_routes.create_export: Operation(
        "Request an export of the report with these filters",
        {
            200: (_ENVELOPE, "an identical export is in flight, or an idempotent replay"),
            201: (_ENVELOPE, "small export, made in the request, ready"),
            202: (_ENVELOPE, "queued for the workers"),
        },
        (
            *_WRITE_ERRORS,
            errors.BodyTooLarge,
            errors.ValidationError,
            errors.TooManyActiveExports,
            errors.ExportsDisabled,
        ),
        _idempotency_key,
        request=wire.ExportRequest,
    ),
    export_routes.list_exports: Operation(
        "The account's exports, newest first",
        {200: (wire.ExportList, "the exports")},
        (*AUTH_ERRORS, errors.Forbidden),
        lambda: [_path_slug()],
    ),
    export_routes.get_export: Operation(
        "One export", {200: (_ENVELOPE, "the export")}, AUTH_ERRORS, lambda: [_path_export()]
    ),
    export_routes.retry_export: Operation(
        "Queue a failed, canceled or expired export again",
        {202: (_ENVELOPE, "queued")},
        (*_WRITE_ERRORS, errors.TooManyActiveExports, errors.ExportsDisabled),
        lambda: [_path_export()],
    ),
    export_routes.cancel_export: Operation(
        "Cancel a queued or running export",
        {202: (_ENVELOPE, "canceled")},
        _WRITE_ERRORS,
        lambda: [_path_export()],
    ),
    export_routes.delete_file: Operation(
        "Delete a ready export's file now (the export becomes expired)",
        {200: (_ENVELOPE, "deleted: the export, now expired")},
        (*_WRITE_ERRORS, errors.StorageError),
        lambda: [_path_export()],
    ),
    export_routes.list_downloads: Operation(
        "Who tried to download the export, newest first (at most 500)",
        {200: (wire.DownloadList, "the download attempts")},
        (*AUTH_ERRORS, errors.Forbidden),
        lambda: [_path_export()],
    ),
    export_routes.download: Operation(
        "The file, through a signed link (resumable, verifiable)",
        {},
        (*AUTH_ERRORS, errors.Forbidden, errors.LinkExpired),
        _download_parameters,
        extra=_download_responses(),
    ),
    health.healthz: Operation(
        "Process is up", {}, public=True, extra={"200": {"description": "up"}}
    ),
    health.readyz: Operation(
        "Dependencies reachable",
        {},
        public=True,
        extra={"200": {"description": "ready"}, "503": {"description": "not ready"}},
    ),
}


def _operation(operation: Operation) -> dict[str, Any]:
    responses: dict[str, Any] = {
        str(status): {"description": description} if model is None else _json(model, description)
        for status, (model, description) in operation.responses.items()
    }
    for status in sorted({STATUS_BY_ERROR[error] for error in operation.errors}):
        responses[str(status)] = _json(wire.ErrorBody, MEANING[status])
    responses.update(operation.extra)
    body: dict[str, Any] = {
        "summary": operation.summary,
        "parameters": operation.parameters(),
        "responses": dict(sorted(responses.items())),
    }
    if operation.request is not None:
        body["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(operation.request)}},
        }
    if operation.public:
        body["security"] = []
        del body["parameters"]
    return body


def _schemas() -> dict[str, Any]:
    _, top = models_json_schema(
        [(model, "serialization") for model in wire.MODELS], ref_template=REF
    )
    return dict(sorted(top["$defs"].items()))


def document(routes: Iterable[BaseRoute]) -> dict[str, Any]:
    """The whole OpenAPI document of the app with these routes."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route) or route.endpoint not in OPERATIONS:
            continue
        for method in sorted((route.methods or set()) - {"HEAD"}):
            paths.setdefault(route.path, {})[method.lower()] = _operation(
                OPERATIONS[route.endpoint]
            )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "orders-export",
            "version": "1",
            "description": "Orders report and CSV exports (docs/contract.md).",
        },
        "security": [{"bearer": []}, {"session": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "token from `orders-export tokens create`",
                },
                "session": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": SESSION_COOKIE,
                    "description": "after POST /login; writes need X-CSRF-Token",
                },
            },
            "schemas": _schemas(),
        },
    }


async def openapi_json(request: Request) -> Response:
    return JSONResponse(document(request.app.routes))
