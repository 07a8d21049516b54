"""The export API as the live-stack tests drive it: ask for an export, read it, wait for a state.

``api`` is an HTTP client of the API with a bearer token (:func:`tests.support.stack.api_client`).
"""

from __future__ import annotations

from typing import Any, Protocol

from tests.support.waiting import wait_for


class _Client(Protocol):
    def get(self, url: str) -> Any: ...

    def post(self, url: str, *, json: Any = ...) -> Any: ...


def exports_url(slug: str = "acme") -> str:
    return f"/api/v1/accounts/{slug}/order-exports"


def export_url(export_id: str) -> str:
    return f"/api/v1/order-exports/{export_id}"


def request_export(api: _Client, filters: dict[str, Any], slug: str = "acme") -> dict[str, Any]:
    """A background export of ``filters`` (the API answers 202): its ``<Export>``."""
    response = api.post(exports_url(slug), json={"filters": filters})
    assert response.status_code == 202, response.text
    return response.json()["export"]  # type: ignore[no-any-return]


def export_of(api: _Client, export_id: str) -> dict[str, Any]:
    response = api.get(export_url(export_id))
    assert response.status_code == 200, response.text
    return response.json()["export"]  # type: ignore[no-any-return]


def wait_state(api: _Client, export_id: str, *states: str, timeout: float = 90) -> dict[str, Any]:
    """The export once it is in one of ``states``."""
    return wait_for(  # type: ignore[no-any-return]
        lambda: (e := export_of(api, export_id))["state"] in states and e,
        timeout=timeout,
        what=f"export {export_id} to be {'/'.join(states)}",
        interval=0.2,
    )


def wait_running(api: _Client, export_id: str, *, rows: int = 1) -> dict[str, Any]:
    """The export once it runs and has streamed at least ``rows`` rows."""
    return wait_for(  # type: ignore[no-any-return]
        lambda: (
            (e := export_of(api, export_id))["state"] == "running"
            and e["progress"]["rows_written"] >= rows
            and e
        ),
        timeout=60,
        what=f"export {export_id} to be running past {rows} rows",
    )
