"""Waiting in tests: polling until something is true (failing with what was awaited), and
threads that run together until all are done."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any


def wait_for(check: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy (returned); fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def wait_until(condition: Callable[[], bool], *, what: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` every 50 ms until it holds (at most ``timeout`` seconds)."""
    wait_for(condition, timeout=timeout, what=what, interval=0.05)


def run_together(work: Callable[..., None], calls: Iterable[tuple[Any, ...]]) -> None:
    """``work(*args)`` for every ``args`` of ``calls``, each in a thread of its own, all at once;
    back when every one is done."""
    threads = [threading.Thread(target=work, args=args) for args in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
