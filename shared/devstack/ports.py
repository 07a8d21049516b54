"""Free TCP ports on the loopback interface."""

from __future__ import annotations

import socket

#: The only address the local stack's servers listen on.
LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on ``host`` a moment ago (the kernel's pick for port 0).

    Another process may take it before the caller binds it; callers that can retry should.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
