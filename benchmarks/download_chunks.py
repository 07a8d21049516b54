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
import sys
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from downloads import bare_app, fetch, interleaved, random_file, ready, sendfile_server
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

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


def app_server(path: Path) -> AbstractContextManager[str]:
    """The bare app streaming ``path``; its URL once it answers."""
    return bare_app("download_chunks:app", {"CHUNKS_FILE": str(path)})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", type=Path, help="file to stream (default: --mb random bytes)")
    parser.add_argument("--mb", type=int, default=58, help="size of the generated file (MB)")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="download-chunks-") as tmp:
        directory = Path(tmp)
        path = args.file or random_file(directory / "file.bin", args.mb)
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
