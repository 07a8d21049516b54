"""The options an export request may carry (``options`` of the HTTP contract) and their words.

One home for the option names, defaults, accepted values and the labels the pages, the panel
script and the email use; the request parser lives with the other export use cases
(``shared/exports.py``), the byte-level effect in ``shared/csvfile.py``.
"""

from __future__ import annotations

from typing import Any

from shared.models import ExportJob

#: Options an export request may carry, with their defaults (a value's type is its default's).
DEFAULT_OPTIONS: dict[str, Any] = {"utf8_bom": False, "compression": "none"}
#: The values ``options.compression`` accepts.
COMPRESSIONS = ("none", "gzip")
#: How the pages and the email name the options an export used.
OPTION_LABELS = {"utf8_bom": "Excel-friendly (UTF-8 BOM)", "gzip": "Compressed (.csv.gz)"}


def options_text(options: dict[str, Any]) -> str:
    """``Excel-friendly (UTF-8 BOM), Compressed (.csv.gz)``; "" for an export without options."""
    words = []
    if options.get("utf8_bom"):
        words.append(OPTION_LABELS["utf8_bom"])
    if options.get("compression") == "gzip":
        words.append(OPTION_LABELS["gzip"])
    return ", ".join(words)


def job_options(job: ExportJob) -> dict[str, Any]:
    """The ``options`` an export was requested with (``<Export>.options``)."""
    return {"utf8_bom": job.utf8_bom, "compression": job.compression or "none"}
