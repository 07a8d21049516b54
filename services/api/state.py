"""What the API process holds for its requests: built once by ``create_app``, read through
:func:`api_state`."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.templating import Jinja2Templates

from shared.errors import ConfigurationError
from shared.flags import FlagCache
from shared.runner import ExportRunner
from shared.settings import Settings
from shared.storage import Storage

if TYPE_CHECKING:
    from services.api.clients import Network


@dataclass(frozen=True)
class ApiState:
    """The application's state (``app.state.api``); the same for every request."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    flags: FlagCache
    templates: Jinja2Templates
    #: TRUSTED_PROXIES as networks (X-Forwarded-For counts only from these).
    trusted_proxies: tuple[Network, ...]
    #: Password hashes checked at once at the most (logins beyond are refused, 503).
    password_checks: threading.BoundedSemaphore
    #: The export files' storage and the runner of small exports made inside requests; None
    #: when STORAGE_URL is not set (the report alone needs neither).
    storage_or_none: Storage | None
    runner_or_none: ExportRunner | None

    @property
    def storage(self) -> Storage:
        if self.storage_or_none is None:
            raise ConfigurationError("missing required setting STORAGE_URL")
        return self.storage_or_none

    @property
    def runner(self) -> ExportRunner:
        if self.runner_or_none is None:
            raise ConfigurationError("missing required setting STORAGE_URL")
        return self.runner_or_none


def state_of(app: Starlette) -> ApiState:
    """The state ``create_app`` gave ``app``."""
    state: ApiState = app.state.api
    return state


def api_state(request: Request) -> ApiState:
    """The state of the app serving ``request``."""
    return state_of(request.app)
