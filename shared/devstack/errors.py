"""Errors of the local stack."""

from __future__ import annotations


class DevStackError(Exception):
    """Base class for failures of the local stack."""


class StartupTimeoutError(DevStackError):
    """A piece of the stack did not become ready in time."""


class ChildExitedError(DevStackError):
    """A child process exited while it was expected to run."""


class PostgresStopError(DevStackError):
    """The embedded PostgreSQL server did not stop."""
