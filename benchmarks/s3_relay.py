"""How fast do relays of an object from S3 storage run, next to reading it directly?

The API streams a download from S3 storage (``EXPORT_DOWNLOAD_REDIRECT_SECONDS=0``) by reading
the object and writing it to the client. This puts the relay alone, without the API, beside the
direct read. moto's S3 server (on loopback) holds one object, and curl fetches it in interleaved
rounds:

- directly, with a presigned GET;
- through ``downloads.relay_app``: a bare Starlette app under uvicorn (the API's server) that
  streams the object with the storage adapter, as the API does, and checks nothing;
- through a plain socket relay: a thread (in this process, beside moto) per request that sends
  the presigned GET and copies storage's whole answer to the client with ``recv_into`` a reused
  4 MiB buffer and ``sendall``: no event loop, no ASGI server, no HTTP parsing, no signing. About
  the least a Python relay can do; an app behind an ASGI server never holds the sockets.

::

    python benchmarks/s3_relay.py [--mb 58] [--rounds 15]

Prints the median milliseconds of each path and the direct read's time over it (≥ 0.7 is the
download target).
"""

from __future__ import annotations

import argparse
import functools
import socket
import sys
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from downloads import (
    bare_relay,
    fetch,
    interleaved,
    loopback_server,
    random_file,
    s3_server,
    stored,
)

#: What the socket relay copies at a time.
BUFFER_BYTES = 4 * 1024 * 1024
#: How long the socket relay waits on either socket before it gives up.
TIMEOUT_SECONDS = 60


def relay_one(client: socket.socket, url: urllib.parse.SplitResult) -> None:
    """Answer one request on ``client`` with the storage's whole answer to a GET of ``url``."""
    address = (url.hostname, url.port or 80)
    with client, socket.create_connection(address, timeout=TIMEOUT_SECONDS) as upstream:
        client.settimeout(TIMEOUT_SECONDS)
        client.recv(65536)  # the request: every request gets the one object
        request = f"GET {url.path}?{url.query} HTTP/1.1\r\nHost: {url.netloc}\r\n"
        upstream.sendall(f"{request}Connection: close\r\n\r\n".encode())
        buffer = bytearray(BUFFER_BYTES)
        view = memoryview(buffer)
        while received := upstream.recv_into(buffer):
            client.sendall(view[:received])


@contextmanager
def socket_relay(url: str) -> Iterator[str]:
    """The plain socket relay of ``url`` on a loopback port; yields its URL."""
    parts = urllib.parse.urlsplit(url)
    with loopback_server(functools.partial(relay_one, url=parts)) as port:
        yield f"http://127.0.0.1:{port}/object"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=58, help="size of the object (MB)")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    size = args.mb * 1_000_000
    key = "bench/object.bin"
    with tempfile.TemporaryDirectory(prefix="s3-relay-") as tmp, s3_server() as storage_url:
        direct = stored(storage_url, key, random_file(Path(tmp) / "object.bin", args.mb))
        with bare_relay(storage_url, key, size) as app, socket_relay(direct) as plain:
            paths: dict[str, Callable[[], int]] = {
                "direct": functools.partial(fetch, direct),
                "Starlette relay": functools.partial(fetch, app),
                "socket relay": functools.partial(fetch, plain),
            }
            medians, _ = interleaved(paths, args.rounds, size)
    print(f"{size / 1e6:.1f} MB object, median of {args.rounds} interleaved rounds:")
    for name, seconds in medians.items():
        ratio = medians["direct"] / seconds
        print(f"{name:>16}  {1000 * seconds:7.1f} ms  {ratio:5.2f} of direct")
    return 0


if __name__ == "__main__":
    sys.exit(main())
