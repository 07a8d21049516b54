"""How the size of the chunks a download is streamed in sets its speed (``DOWNLOAD_CHUNK_BYTES``).

A bare Starlette app under uvicorn (the API's server, with its event loop and HTTP parser)
streams one file from disk in chunks of each size, as the API streams an export, and curl
fetches it over loopback into /dev/null, in interleaved rounds beside the zero-copy ``sendfile``
server of ``downloads.py`` (the ceiling of any HTTP download on the machine)::

    python benchmarks/download_chunks.py [--file PATH | --mb 58] [--rounds 15]

Prints the median milliseconds of each path and its ratio to the zero-copy server.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from downloads import interleaved, ready, sendfile_server, served
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from shared.devstack.ports import free_port

SIZES_KIB = (256, 1024, 2048, 4096, 8192, 16384)


def chunks(size: int) -> Iterator[bytes]:
    """The benchmarked file (``CHUNKS_FILE``) in chunks of ``size`` bytes, as the API reads one."""
    with open(os.environ["CHUNKS_FILE"], "rb") as file:
        while chunk := file.read(size):
            yield chunk


async def stream(request: Request) -> Response:
    length = str(os.path.getsize(os.environ["CHUNKS_FILE"]))
    size = int(request.query_params["bytes"])
    return StreamingResponse(chunks(size), headers={"Content-Length": length})


#: The bare app uvicorn serves (``download_chunks:app``).
app = Starlette(routes=[Route("/", stream), Route("/ready", ready)])


def fetch(url: str) -> int:
    out = subprocess.run(
        ["curl", "-sS", "-o", os.devnull, "-w", "%{size_download}", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out)


@contextmanager
def app_server(path: Path) -> Iterator[str]:
    """The bare app on a loopback port, streaming ``path``; yields its URL once it answers."""
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "download_chunks:app", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--log-level", "warning", "--no-access-log"]
    base = f"http://127.0.0.1:{port}/"
    env = dict(os.environ) | {"CHUNKS_FILE": str(path)}
    with served(argv, ready_url=base + "ready", env=env, cwd=Path(__file__).parent):
        yield base


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", type=Path, help="file to stream (default: --mb random bytes)")
    parser.add_argument("--mb", type=int, default=58, help="size of the generated file (MB)")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="download-chunks-") as tmp:
        directory = Path(tmp)
        path = args.file
        if path is None:
            path = directory / "file.bin"
            with path.open("wb") as out:
                for _ in range(args.mb):
                    out.write(os.urandom(1_000_000))
        size = path.stat().st_size
        with sendfile_server(path) as zero_copy, app_server(path) as base:
            paths = {"zero-copy server": lambda: fetch(zero_copy)}
            for kib in SIZES_KIB:
                paths[f"{kib} KiB chunks"] = functools.partial(fetch, f"{base}?bytes={kib * 1024}")
            medians, _ = interleaved(paths, args.rounds, size)
    ceiling = medians["zero-copy server"]
    print(f"{size / 1e6:.1f} MB, median of {args.rounds} interleaved rounds:")
    for name, seconds in medians.items():
        print(f"{name:>18}  {1000 * seconds:7.1f} ms  {ceiling / seconds:5.2f} of zero-copy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
