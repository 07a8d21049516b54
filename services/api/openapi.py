"""The OpenAPI 3.0 description of the JSON API, served at ``GET /openapi.json``.

Written by hand from the HTTP contract (README "HTTP API", docs/contract.md) and checked against
the running app by the schemathesis tests (tests/integration/test_openapi.py): every response
must match it.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shared.columns import COLUMNS
from shared.downloads import AUDIT_LIST_SIZE, Outcome
from shared.export_options import COMPRESSIONS
from shared.filters import MAX_Q_LENGTH, SORTS
from shared.models import ORDER_CHANNELS, ORDER_STATUSES, ExportState
from shared.report import MAX_PAGE_SIZE
from shared.support import Verdict

_DATE = {"type": "string", "format": "date", "example": "2025-03-01"}
_DECIMAL = {"type": "string", "pattern": r"^-?\d+(\.\d+)?$", "example": "125.50"}
_TIMESTAMP = {"type": "string", "format": "date-time", "nullable": True}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    meaning = {
        401: "not authenticated",
        403: "not allowed (member, bad signature or CSRF)",
        404: "unknown, or not visible to the caller",
        409: "not possible in the current state",
        410: "link or file expired",
        413: "request body larger than MAX_REQUEST_BODY_BYTES (`body_too_large`)",
        416: "the range is not in the file; Content-Range: bytes */SIZE",
        422: "invalid input; `field` names it",
        429: "too many requests; see Retry-After",
        503: "exports switched off",
    }
    return {str(status): _json(_ref("Error"), meaning[status]) for status in statuses}


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
        query("placed_from", _DATE, "first day, inclusive, in the account timezone"),
        query("placed_to", _DATE, "last day, inclusive, in the account timezone"),
        query(
            "q",
            {"type": "string", "maxLength": MAX_Q_LENGTH},
            "substring of number, customer name or email",
        ),
        query("min_total", _DECIMAL, "inclusive"),
        query("max_total", _DECIMAL, "inclusive"),
        query("sort", {"type": "string", "enum": list(SORTS)}, "order; ties broken by order id"),
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


def _schemas() -> dict[str, Any]:
    filters = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "status": {"type": "array", "items": {"type": "string", "enum": list(ORDER_STATUSES)}},
            "channel": {"type": "array", "items": {"type": "string", "enum": list(ORDER_CHANNELS)}},
            "placed_from": {**_DATE, "nullable": True},
            "placed_to": {**_DATE, "nullable": True},
            "q": {"type": "string", "maxLength": MAX_Q_LENGTH, "nullable": True},
            "min_total": {**_DECIMAL, "nullable": True},
            "max_total": {**_DECIMAL, "nullable": True},
            "sort": {"type": "string", "enum": list(SORTS)},
        },
    }
    export = {
        "type": "object",
        "required": [
            "id",
            "account",
            "state",
            "filters",
            "row_count",
            "progress",
            "attempts",
            "created_at",
            "started_at",
            "finished_at",
            "expires_at",
            "error",
            "download_url",
            "file",
            "verdict",
            "options",
            "deleted",
        ],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "account": {"type": "string"},
            "state": {"type": "string", "enum": [s.value for s in ExportState]},
            "filters": filters,
            "row_count": {"type": "integer", "nullable": True},
            "progress": {
                "type": "object",
                "required": ["rows_written", "rows_estimate", "percent"],
                "properties": {
                    "rows_written": {"type": "integer"},
                    "rows_estimate": {"type": "integer", "nullable": True},
                    "percent": {"type": "number", "nullable": True},
                },
            },
            "attempts": {"type": "integer"},
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": _TIMESTAMP,
            "finished_at": _TIMESTAMP,
            "expires_at": _TIMESTAMP,
            "error": {
                "type": "object",
                "nullable": True,
                "required": ["code", "message", "retryable"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "retryable": {"type": "boolean"},
                },
            },
            "download_url": {"type": "string", "nullable": True},
            "file": {
                "type": "object",
                "nullable": True,
                "required": ["name", "size_bytes", "sha256"],
                "properties": {
                    "name": {"type": "string"},
                    "size_bytes": {"type": "integer"},
                    "sha256": {"type": "string"},
                },
            },
            "verdict": {"type": "string", "enum": [v.value for v in Verdict]},
            "options": {
                "type": "object",
                "required": ["utf8_bom", "compression"],
                "properties": {
                    "utf8_bom": {"type": "boolean"},
                    "compression": {"type": "string", "enum": list(COMPRESSIONS)},
                },
            },
            "deleted": {
                "type": "object",
                "nullable": True,
                "description": "set when an admin (or support) deleted the file before expiry",
                "required": ["at", "by"],
                "properties": {
                    "at": {"type": "string", "format": "date-time"},
                    "by": {"type": "string", "description": "the name of who deleted it"},
                },
            },
        },
    }
    download = {
        "type": "object",
        "required": ["at", "user", "outcome", "client_ip", "bytes", "redirect"],
        "properties": {
            "at": {"type": "string", "format": "date-time"},
            "user": {
                "type": "object",
                "nullable": True,
                "required": ["id", "email"],
                "properties": {"id": {"type": "integer"}, "email": {"type": "string"}},
            },
            "outcome": {"type": "string", "enum": [o.value for o in Outcome]},
            "client_ip": {"type": "string", "nullable": True},
            "bytes": {
                "type": "string",
                "nullable": True,
                "pattern": r"^\d+-\d+$",
                "description": "the range served (inclusive offsets) when the request was ranged",
            },
            "redirect": {
                "type": "boolean",
                "description": "answered with a 302 to storage (EXPORT_DOWNLOAD_REDIRECT_SECONDS)",
            },
        },
    }
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"type": "string"},
                        "message": {"type": "string"},
                        "field": {"type": "string"},
                    },
                }
            },
        },
        "ReportPage": {
            "type": "object",
            "required": ["columns", "rows", "next_cursor"],
            "properties": {
                "columns": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["key", "label"],
                        "properties": {"key": {"type": "string"}, "label": {"type": "string"}},
                    },
                },
                "rows": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": [c.key for c in COLUMNS],
                        "properties": {c.key: {"type": "string"} for c in COLUMNS},
                    },
                },
                "next_cursor": {"type": "string", "nullable": True},
            },
        },
        "Filters": filters,
        "Export": export,
        "ExportEnvelope": {
            "type": "object",
            "required": ["export"],
            "properties": {"export": _ref("Export")},
        },
        "ExportList": {
            "type": "object",
            "required": ["exports"],
            "properties": {"exports": {"type": "array", "items": _ref("Export")}},
        },
        "DownloadList": {
            "type": "object",
            "required": ["downloads"],
            "properties": {
                "downloads": {
                    "type": "array",
                    "maxItems": AUDIT_LIST_SIZE,
                    "items": download,
                }
            },
        },
        "ExportRequest": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "filters": _ref("Filters"),
                "options": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "utf8_bom": {"type": "boolean"},
                        "compression": {"type": "string", "enum": list(COMPRESSIONS)},
                    },
                },
            },
        },
    }


def document() -> dict[str, Any]:
    """The whole OpenAPI document."""
    envelope = _ref("ExportEnvelope")
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "orders-export",
            "version": "1",
            "description": "Orders report and CSV exports.",
        },
        "security": [{"bearer": []}, {"session": []}],
        "paths": {
            "/api/v1/accounts/{slug}/orders": {
                "get": {
                    "summary": "One page of the orders report",
                    "parameters": [
                        _path_slug(),
                        *_filter_parameters(),
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE},
                        },
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": _json(_ref("ReportPage"), "the page"),
                        **_errors(401, 404, 422),
                    },
                }
            },
            "/api/v1/accounts/{slug}/order-exports": {
                "post": {
                    "summary": "Request an export of the report with these filters",
                    "parameters": [
                        _path_slug(),
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                        },
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("ExportRequest")}},
                    },
                    "responses": {
                        "200": _json(
                            envelope, "an identical export is in flight, or an idempotent replay"
                        ),
                        "201": _json(envelope, "small export, made in the request, ready"),
                        "202": _json(envelope, "queued for the workers"),
                        **_errors(401, 403, 404, 409, 413, 422, 429, 503),
                    },
                },
                "get": {
                    "summary": "The account's exports, newest first",
                    "parameters": [_path_slug()],
                    "responses": {
                        "200": _json(_ref("ExportList"), "the exports"),
                        **_errors(401, 403, 404),
                    },
                },
            },
            "/api/v1/order-exports/{export_id}": {
                "get": {
                    "summary": "One export",
                    "parameters": [_path_export()],
                    "responses": {"200": _json(envelope, "the export"), **_errors(401, 404)},
                }
            },
            "/api/v1/order-exports/{export_id}/retry": {
                "post": {
                    "summary": "Queue a failed, canceled or expired export again",
                    "parameters": [_path_export()],
                    "responses": {
                        "202": _json(envelope, "queued"),
                        **_errors(401, 403, 404, 409, 429, 503),
                    },
                }
            },
            "/api/v1/order-exports/{export_id}/cancel": {
                "post": {
                    "summary": "Cancel a queued or running export",
                    "parameters": [_path_export()],
                    "responses": {
                        "202": _json(envelope, "canceled"),
                        **_errors(401, 403, 404, 409),
                    },
                }
            },
            "/api/v1/order-exports/{export_id}/file": {
                "delete": {
                    "summary": "Delete a ready export's file now (the export becomes expired)",
                    "parameters": [_path_export()],
                    "responses": {
                        "200": _json(envelope, "deleted: the export, now expired"),
                        **_errors(401, 403, 404, 409, 503),
                    },
                }
            },
            "/api/v1/order-exports/{export_id}/downloads": {
                "get": {
                    "summary": "Who tried to download the export, newest first (at most 500)",
                    "parameters": [_path_export()],
                    "responses": {
                        "200": _json(_ref("DownloadList"), "the download attempts"),
                        **_errors(401, 403, 404),
                    },
                }
            },
            "/exports/{export_id}/download": {
                "get": {
                    "summary": "The file, through a signed link (resumable, verifiable)",
                    "parameters": [
                        _path_export(),
                        {
                            "name": "expires",
                            "in": "query",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "signature",
                            "in": "query",
                            "required": True,
                            "schema": {"type": "string"},
                        },
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
                    ],
                    "responses": {
                        "200": {
                            "description": "the whole file",
                            "headers": _file_headers(),
                            "content": _file_content(),
                        },
                        "206": {
                            "description": "the one range asked for",
                            "headers": {
                                **_file_headers(),
                                "Content-Range": _header("bytes A-B/SIZE"),
                            },
                            "content": _file_content(),
                        },
                        "302": {
                            "description": "redirect mode (EXPORT_DOWNLOAD_REDIRECT_SECONDS > 0, "
                            "S3 storage): a presigned storage URL valid that many seconds",
                            "headers": {
                                "Location": _header("the presigned URL"),
                                "Cache-Control": _header("no-store"),
                            },
                        },
                        **_errors(401, 403, 404, 410),
                        "416": {
                            **_json(_ref("Error"), "the range is not in the file"),
                            "headers": {"Content-Range": _header("bytes */SIZE")},
                        },
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Process is up",
                    "security": [],
                    "responses": {"200": {"description": "up"}},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Dependencies reachable",
                    "security": [],
                    "responses": {
                        "200": {"description": "ready"},
                        "503": {"description": "not ready"},
                    },
                }
            },
        },
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
                    "name": "oex_session",
                    "description": "after POST /login; writes need X-CSRF-Token",
                },
            },
            "schemas": _schemas(),
        },
    }


async def openapi_json(request: Request) -> Response:
    return JSONResponse(document())
