"""Export lanes: small background exports never wait behind big ones.

Every background export is sent to one of two Dramatiq queues, chosen when it is requested from
the size the request finds anyway (``shared.exports``: exact up to the count budget, or "big" from
the planner's estimate; no extra query):

- ``fast`` (queue ``exports.fast``): at most EXPORT_FAST_LANE_MAX_ROWS rows. Served by
  EXPORT_FAST_LANE_THREADS threads of each worker process that take nothing else, so a small
  export is claimed as soon as it is queued however many big ones run or wait.
- ``normal`` (queue ``exports``): everything else, and every export whose size is unknown
  (housekeeping's re-sends), served by EXPORT_WORKER_THREADS threads.

The claim in PostgreSQL is the same in both lanes: an account still runs one background export
at a time (a small export of an account whose big export runs waits for it, as before); the
lanes only decide which worker threads may pick a message up. Since the fast lane only takes
exports of a bounded size, its threads are never held for long, and the database never runs
more than EXPORT_WORKER_THREADS big COPYs per worker process.
"""

from __future__ import annotations

from shared.settings import Settings

#: The lane of big exports and of exports of unknown size.
NORMAL = "normal"
#: The lane of small exports.
FAST = "fast"
LANES = (NORMAL, FAST)


def lane_for(rows: int | None, *, settings: Settings) -> str:
    """The lane of an export of ``rows`` rows (None: not known)."""
    if rows is not None and rows <= settings.export_fast_lane_max_rows:
        return FAST
    return NORMAL


def count_budget(settings: Settings) -> int:
    """Rows an export request counts at most: enough to tell an export made in the request
    (EXPORT_ASYNC_THRESHOLD_ROWS) and a fast-lane one from the rest, no more (the count is most
    of a request's time on a big account); above it the planner's estimate checks the row cap
    and the worker enforces it exactly."""
    return max(settings.export_async_threshold_rows, settings.export_fast_lane_max_rows)
