"""The S3 test server: moto's S3 on a loopback port, with presigned-URL expiry enforced.

moto checks neither ``X-Amz-Date`` nor ``X-Amz-Expires`` of a presigned URL; S3 and MinIO refuse
an expired one with ``403 AccessDenied`` ("Request has expired"), and so does the thin WSGI front
here. It also logs each request's method, path and ``Range`` header, so a test can see what
actually travelled to the server.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from moto.server import ThreadedMotoServer
from werkzeug.serving import make_server

#: The body S3 answers an expired presigned URL with.
EXPIRED_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Request has expired</Message></Error>"
)


class ExpiringFront:
    """WSGI middleware: refuse presigned URLs past their expiry, log the requests."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self._app = app
        #: (method, path, Range header or None) of every request, in order.
        self.requests: list[tuple[str, str, str | None]] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        self.requests.append(
            (environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("HTTP_RANGE"))
        )
        query = parse_qs(environ.get("QUERY_STRING", ""))
        if "X-Amz-Date" in query and "X-Amz-Expires" in query:
            signed = dt.datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ")
            valid_until = signed.replace(tzinfo=dt.UTC) + dt.timedelta(
                seconds=int(query["X-Amz-Expires"][0])
            )
            if dt.datetime.now(dt.UTC) > valid_until:
                start_response(
                    "403 Forbidden",
                    [
                        ("Content-Type", "application/xml"),
                        ("Content-Length", str(len(EXPIRED_BODY))),
                    ],
                )
                return [EXPIRED_BODY]
        return self._app(environ, start_response)


class S3TestServer(ThreadedMotoServer):
    """``ThreadedMotoServer`` behind :class:`ExpiringFront` (start, get_host_and_port, stop)."""

    def __init__(self) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self.front = ExpiringFront(DomainDispatcherApplication(create_backend_app))

    def _server_entry(self) -> None:
        self._server = make_server(
            self._ip_address, self._port, self.front, True, request_handler=MotoRequestHandler
        )
        self._server_ready_event.set()
        self._server.serve_forever()

    @property
    def endpoint(self) -> str:
        host, port = self.get_host_and_port()
        return f"{host}:{port}"
