"""How sizes, moments and waiting times read to people: the web pages and the emails alike."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

#: Decimal units of file sizes.
SIZE_UNITS = ("bytes", "kB", "MB", "GB", "TB")
#: Bytes per :data:`SIZE_UNITS` step.
SIZE_STEP = 1000


def file_size(size: int | None) -> str:
    """``3.5 MB`` (decimal units); ``?`` when unknown."""
    if size is None:
        return "?"
    value, unit = float(size), 0
    while value >= SIZE_STEP and unit < len(SIZE_UNITS) - 1:
        value, unit = value / SIZE_STEP, unit + 1
    return f"{size} bytes" if unit == 0 else f"{value:.1f} {SIZE_UNITS[unit]}"


def duration(seconds: float) -> str:
    """``12 s``, ``4 min``, ``2 h`` (rounded down)."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"


def zone(timezone: str) -> ZoneInfo:
    """The account's time zone (UTC when the name is unknown)."""
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def local_time(moment: dt.datetime, timezone: str) -> str:
    """``2025-06-08 14:00`` in the account's time zone (the pages, beside the zone's name)."""
    return moment.astimezone(zone(timezone)).strftime("%Y-%m-%d %H:%M")


def zoned_time(moment: dt.datetime, timezone: str) -> str:
    """``2025-06-08 14:00 Europe/Berlin``: the local time with the zone's name (the emails)."""
    where = zone(timezone)
    return f"{local_time(moment, str(where))} {where}"
