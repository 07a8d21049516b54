"""The JSON the API speaks, as typed models: one home for ``<Export>``, the export request, the
filters, the report page, the download audit and the error body.

``shared.exports.to_json`` and the report build these models; ``services/api/openapi.py``
generates the components of ``/openapi.json`` from them (``model_json_schema``), so the schema
cannot drift from what the code sends.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, WithJsonSchema

from shared.columns import COLUMNS
from shared.downloads import AUDIT_LIST_SIZE, DownloadOutcome
from shared.export_options import COMPRESSIONS
from shared.filters import DEFAULT_SORT, MAX_Q_LENGTH, SORTS
from shared.models import ORDER_CHANNELS, ORDER_STATUSES, ExportState
from shared.support import Verdict

#: A moment in time, sent as ISO 8601 with its UTC offset (``datetime.isoformat``).
Moment = Annotated[
    dt.datetime,
    PlainSerializer(lambda value: value.isoformat(), return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
#: A decimal amount as text (exact; never a float), as numeric(12,2) holds it.
DecimalText = Annotated[str, Field(pattern=r"^-?\d{1,10}(\.\d{1,2})?$", examples=["125.50"])]
OrderStatus = Annotated[str, WithJsonSchema({"type": "string", "enum": list(ORDER_STATUSES)})]
OrderChannel = Annotated[str, WithJsonSchema({"type": "string", "enum": list(ORDER_CHANNELS)})]
Compression = Annotated[str, WithJsonSchema({"type": "string", "enum": list(COMPRESSIONS)})]
Sort = Annotated[str, WithJsonSchema({"type": "string", "enum": list(SORTS)})]


class Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class Filters(Wire):
    """The report's filters: the request's (any key may be left out) and an export's stored ones
    (every key present)."""

    status: list[OrderStatus] = []
    channel: list[OrderChannel] = []
    placed_from: dt.date | None = Field(None, description="first day, inclusive, local time")
    placed_to: dt.date | None = Field(None, description="last day, inclusive, local time")
    q: Annotated[str, Field(max_length=MAX_Q_LENGTH, pattern=r"^[^\x00-\x1f\x7f]*$")] | None = None
    min_total: DecimalText | None = None
    max_total: DecimalText | None = None
    sort: Sort = DEFAULT_SORT


class ExportOptions(Wire):
    """How the file is made (``options`` of a request and of an ``<Export>``)."""

    utf8_bom: bool = False
    compression: Compression = "none"


class ExportRequest(Wire):
    """The body of ``POST /api/v1/accounts/{slug}/order-exports``."""

    filters: Filters | None = None
    options: ExportOptions | None = None


class Progress(Wire):
    rows_written: int
    rows_estimate: int | None
    percent: float | None


class ExportError(Wire):
    code: str
    message: str
    retryable: bool


class ExportFile(Wire):
    name: str
    size_bytes: int
    sha256: str


class Deleted(Wire):
    """Set when an admin (or support) deleted the file before it expired."""

    at: Moment
    by: str = Field(description="the name of who deleted it")


class Export(Wire):
    """``<Export>``: one export as every endpoint returns it."""

    id: uuid.UUID
    account: str
    state: ExportState
    filters: Filters
    row_count: int | None
    progress: Progress
    attempts: int
    created_at: Moment
    started_at: Moment | None
    finished_at: Moment | None
    expires_at: Moment | None
    error: ExportError | None
    download_url: str | None
    file: ExportFile | None
    verdict: Verdict
    options: ExportOptions
    deleted: Deleted | None


class ExportEnvelope(Wire):
    export: Export


class ExportList(Wire):
    exports: list[Export]


class Column(Wire):
    key: str
    label: str


#: One report row: every column's key, its cell as text.
ReportRow = Annotated[
    dict[str, str],
    WithJsonSchema(
        {
            "type": "object",
            "required": [c.key for c in COLUMNS],
            "properties": {c.key: {"type": "string"} for c in COLUMNS},
        }
    ),
]


class ReportPage(Wire):
    """One page of the orders report; ``next_cursor`` is an opaque token (or null: last page)."""

    columns: list[Column]
    rows: list[ReportRow]
    next_cursor: str | None


class DownloadUser(Wire):
    id: int
    email: str


class DownloadAttempt(Wire):
    at: Moment
    user: DownloadUser | None
    outcome: DownloadOutcome
    client_ip: str | None
    bytes: Annotated[str, Field(pattern=r"^\d+-\d+$")] | None = Field(
        description="the range served (inclusive offsets) when the request was ranged"
    )
    redirect: bool = Field(
        description="answered with a 302 to storage (EXPORT_DOWNLOAD_REDIRECT_SECONDS)"
    )


class DownloadList(Wire):
    downloads: Annotated[list[DownloadAttempt], Field(max_length=AUDIT_LIST_SIZE)]


class ErrorDetail(BaseModel):
    """What went wrong; more keys may follow (``field``, ``export_id``, ``reason`` ...)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    code: str
    message: str
    field: str | None = Field(None, description="the input at fault (422)")


class ErrorBody(Wire):
    error: ErrorDetail


#: Every model of the API, by the name the OpenAPI document gives it.
MODELS: tuple[type[BaseModel], ...] = (
    Filters,
    ExportOptions,
    ExportRequest,
    Export,
    ExportEnvelope,
    ExportList,
    ReportPage,
    DownloadList,
    ErrorBody,
)
