"""Log redaction: the ``signature`` of a signed download link never reaches a log line.

uvicorn's access log writes every request's path and query; a signed link is a bearer credential
for its recipient, so :func:`install` puts :class:`RedactSignatures` on every handler (and on
uvicorn's loggers) of the process.
"""

from __future__ import annotations

import logging
import re
from typing import Any

#: ``signature=<anything up to & or a space or a quote>``, also URL-encoded (``signature%3D``).
_SIGNATURE = re.compile(r"(signature(?:=|%3D))[^&\s\"'#]+", re.IGNORECASE)
#: What replaces the value.
REDACTED = "[redacted]"
#: Loggers with handlers of their own (uvicorn does not propagate its access log).
LOGGERS = ("uvicorn", "uvicorn.access", "uvicorn.error", "")


def redact(text: str) -> str:
    return _SIGNATURE.sub(lambda match: match.group(1) + REDACTED, text)


def _redacted(value: Any) -> Any:
    return redact(value) if isinstance(value, str) else value


class RedactSignatures(logging.Filter):
    """Rewrites a record's message and arguments (formatters that read ``args`` themselves,
    like uvicorn's access formatter, see the redacted values too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redacted(value) for value in record.args)
        elif isinstance(record.args, dict):
            record.args = {key: _redacted(value) for key, value in record.args.items()}
        return True


def install() -> None:
    """Add the filter to every handler configured so far (idempotent)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            if not any(isinstance(f, RedactSignatures) for f in target.filters):
                target.addFilter(RedactSignatures())
