"""HTTP byte ranges of downloads (RFC 9110 section 14): one ``Range``, ``If-Range``, 416.

One range per request is served (``bytes=A-B``, ``bytes=A-``, ``bytes=-N``); several ranges, a
unit other than bytes or a header that does not parse are ignored and the whole file is sent, as
RFC 9110 allows. ``If-Range`` is compared strongly against the ETag; anything else (a weak tag,
a date: the files carry no Last-Modified) sends the whole file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ONE_RANGE = re.compile(r"bytes=(\d*)-(\d*)", re.IGNORECASE)


@dataclass(frozen=True)
class ByteRange:
    """Bytes ``start`` to ``end`` (inclusive) of a representation of ``size`` bytes."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    @property
    def spec(self) -> str:
        """``A-B``, as the audit trail records it."""
        return f"{self.start}-{self.end}"

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end}/{self.size}"


class RangeNotSatisfiable(Exception):
    """The one range asked for lies wholly past the end of the file (answer 416)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"bytes */{size}")
        self.size = size

    @property
    def content_range(self) -> str:
        return f"bytes */{self.size}"


def requested_range(
    range_header: str | None, if_range: str | None, *, size: int, etag: str | None
) -> ByteRange | None:
    """The range to send, or None for the whole file; RangeNotSatisfiable for a 416."""
    if range_header is None:
        return None
    if if_range is not None and (etag is None or if_range.strip() != etag):
        return None
    match = _ONE_RANGE.fullmatch(range_header.strip().replace(" ", ""))
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if not first and not last:
        return None
    if not first:  # the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        return ByteRange(max(0, size - suffix), size - 1, size)
    start = int(first)
    end = size - 1 if not last else int(last)
    if last and end < start:
        return None  # invalid: ignored
    if start >= size:
        raise RangeNotSatisfiable(size)
    return ByteRange(start, min(end, size - 1), size)
