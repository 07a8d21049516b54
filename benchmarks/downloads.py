"""Download throughput of one export's file, every way a client can get it, in ONE run.

Used by ``benchmarks/export.py`` (``make bench``) on its 500k file; alone it makes a stack and an
export of its own::

    python benchmarks/downloads.py [--rows 100000] [--runs 3]

A client always downloads over a socket, so each path is timed with the same client (curl into
/dev/null) and compared with the fastest read of the same bytes that path competes with:

- **local storage** (a directory, the dev stack's default): the API streaming the file (every
  check, the audit row) against (a) the file read in-process from storage (no socket at all:
  the memory-copy ceiling) and (b) the same file sent by a zero-copy ``os.sendfile`` loopback
  server (the ceiling of ANY HTTP download on this machine, no Python per byte);
- **S3 storage** (moto's S3 server on loopback, the stand-in for MinIO here): the object fetched
  directly from storage with a presigned URL, against a second API process on the same database
  and S3 storage that (c) streams the object (``EXPORT_DOWNLOAD_REDIRECT_SECONDS=0``) and (d)
  answers ``302`` to a presigned URL (``=60``; the same curl process follows it to
  storage, as a browser does; the 302 alone is timed too), and (e) a bare Starlette app under
  uvicorn (``relay_app``) that streams the object as the API does and does nothing else: no
  link, no caller, no audit row, no middleware. (c) against (e) is what the API's own work
  costs a streamed download; (e) against the direct read is what a relay built as the API's is
  (Starlette under uvicorn, the same storage adapter) reaches without it.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from shared.devstack.ports import free_port
from shared.devstack.services import SERVICES
from shared.storage import Storage, storage_from_url
from shared.storage.local import LocalStorage

ROOT = Path(__file__).resolve().parent.parent

#: How the API runs (its uvicorn command line).
API = next(spec for spec in SERVICES if spec.name == "api")

#: Keys of the S3 test server (any non-empty pair works with moto).
S3_KEYS = ("bench-access", "bench-secret-key-0123456789")


def curl(url: str, *, token: str | None = None, follow: bool = False) -> tuple[int, str, int]:
    """GET ``url`` into /dev/null with curl: (bytes received, redirect location or "", number
    of redirects followed). ``follow``: one curl process follows the 302 as a browser does
    (curl sends the ``Authorization`` header to the API's host only, never to storage's)."""
    report = "%{http_code} %{size_download} %{num_redirects} %{redirect_url}"
    command = ["curl", "-sS", "-o", os.devnull, "-w", report]
    if follow:
        command.append("--location")
    if token is not None:
        command += ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    code, size, redirects, *location = out.split(" ", 3)
    if code not in {"200", "302"}:
        raise RuntimeError(f"GET {url} answered {code}")
    return int(size), "".join(location).strip(), int(redirects)


def fetch(url: str) -> int:
    """Bytes curl received from a GET of ``url`` (an error answer raises)."""
    return curl(url)[0]


def random_file(path: Path, mb: int) -> Path:
    """``path`` filled with ``mb`` MB of random bytes (incompressible, nothing cached)."""
    with path.open("wb") as out:
        for _ in range(mb):
            out.write(os.urandom(1_000_000))
    return path


#: Fewest interleaved rounds of the download paths: a 500k file downloads in 20-60 ms, so with
#: three rounds one busy moment of the machine moved a median (and a ratio) by a quarter.
MIN_ROUNDS = 9


def interleaved(
    paths: dict[str, Callable[[], int]], runs: int, expected: int
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median seconds of each path over ``runs`` rounds, and every round's seconds; each round
    runs every path once, so a busy moment of the machine falls on all of them alike. Each must
    return ``expected`` bytes.
    """
    timings: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(runs):
        for name, fn in paths.items():
            started = time.perf_counter()
            got = fn()
            timings[name].append(time.perf_counter() - started)
            if got != expected:
                raise RuntimeError(f"{name}: read {got:,} bytes, expected {expected:,}")
    return {name: statistics.median(values) for name, values in timings.items()}, timings


@contextmanager
def loopback_server(handle: Callable[[socket.socket], None]) -> Iterator[int]:
    """A server on a loopback port that gives each connection to ``handle`` in a thread of its
    own (which closes it); yields the port."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed: the block ended
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept (closing alone does not)
        listener.close()
        thread.join(timeout=10)


@contextmanager
def sendfile_server(path: Path) -> Iterator[str]:
    """A minimal HTTP/1.1 server on loopback that answers every GET with ``path`` by sendfile."""
    size = path.stat().st_size

    def send(conn: socket.socket) -> None:
        with conn, path.open("rb") as file:
            conn.recv(65536)
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
            conn.sendall(head.encode())
            offset = 0
            while offset < size:
                offset += os.sendfile(conn.fileno(), file.fileno(), offset, size - offset)

    with loopback_server(send) as port:
        yield f"http://127.0.0.1:{port}/file"


@contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server on a loopback port; yields the STORAGE_URL of its (made) bucket."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        _, port = server.get_host_and_port()
        url = f"s3://{S3_KEYS[0]}:{S3_KEYS[1]}@127.0.0.1:{port}/exports"
        storage_from_url(url).prepare()
        yield url
    finally:
        server.stop()


@contextmanager
def served(
    argv: list[str], *, ready_url: str, env: dict[str, str], cwd: Path | None = None
) -> Iterator[None]:
    """Run the server ``argv`` for the block, entered once ``ready_url`` answers 200."""
    process = subprocess.Popen(argv, env=env, cwd=cwd)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx2.get(ready_url, timeout=1, trust_env=False).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(argv[1:4])} did not start")
            time.sleep(0.2)
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


def stored(storage_url: str, key: str, path: Path) -> str:
    """Store the file ``path`` as ``key`` in S3 storage; a presigned GET of it, valid an hour."""
    storage = storage_from_url(storage_url)
    with path.open("rb") as file:
        storage.put(key, file)
    url = storage.presigned_get(
        key, expires_seconds=3600, filename=path.name, content_type="text/csv"
    )
    assert url is not None, "S3 storage presigns"
    return url


@functools.cache
def relayed_storage() -> Storage:
    """The storage ``relay_app`` reads (``RELAY_STORAGE_URL``): one client, as the API keeps."""
    return storage_from_url(os.environ["RELAY_STORAGE_URL"])


async def relayed(request: Request) -> Response:
    """The object ``RELAY_KEY`` (``RELAY_SIZE`` bytes) streamed as the API streams a download:
    the storage adapter's chunks, opened in the thread pool; nothing else."""
    key = os.environ["RELAY_KEY"]
    chunks = await run_in_threadpool(relayed_storage().open, key)
    headers = {"Content-Length": os.environ["RELAY_SIZE"]}
    return StreamingResponse(chunks, media_type="text/csv", headers=headers)


async def ready(request: Request) -> Response:
    """200 once the server runs (what ``served`` waits for)."""
    return PlainTextResponse("ok")


#: The bare relay uvicorn serves (``downloads:relay_app``).
relay_app = Starlette(routes=[Route("/", relayed), Route("/ready", ready)])


@contextmanager
def bare_app(target: str, env: dict[str, str]) -> Iterator[str]:
    """The app ``target`` (``module:app`` of benchmarks/, with a ``/ready`` route) under uvicorn
    on a loopback port, with the API's server switches and ``env`` added to this process's;
    yields its base URL once it answers."""
    port = free_port()
    flags = [arg for arg in API.args if arg.startswith("--no-")]  # the API's server options
    argv = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--log-level", "warning", *flags]
    base = f"http://127.0.0.1:{port}/"
    child_env = dict(os.environ) | {"PYTHONPATH": str(ROOT)} | env
    with served(argv, ready_url=base + "ready", env=child_env, cwd=Path(__file__).parent):
        yield base


def bare_relay(storage_url: str, key: str, size: int) -> AbstractContextManager[str]:
    """``relay_app`` streaming ``key`` of ``storage_url``; its URL once it answers."""
    env = {"RELAY_STORAGE_URL": storage_url, "RELAY_KEY": key, "RELAY_SIZE": str(size)}
    return bare_app("downloads:relay_app", env)


@contextmanager
def api_process(env: dict[str, str]) -> Iterator[str]:
    """One more API process (uvicorn) with ``env``; yields its base URL once it answers."""
    port = free_port()
    child_env = {k: v for k, v in os.environ.items() if k != "METRICS_PORT"} | env
    child_env["PYTHONPATH"] = str(ROOT)
    assert API.health_path is not None
    base = f"http://127.0.0.1:{port}"
    argv = [*API.argv(host="127.0.0.1", port=port), "--log-level", "warning"]
    with served(argv, ready_url=base + API.health_path, env=child_env):
        yield base


def on_host(url: str, base: str) -> str:
    """``url`` with its scheme and host replaced by those of ``base`` (same path and query)."""
    parts = urllib.parse.urlsplit(url)
    return base + urllib.parse.urlunsplit(("", "", parts.path, parts.query, ""))


def measure(
    *, env: dict[str, str], token: str, download_url: str, key: str, size: int, runs: int
) -> dict[str, Any]:
    """Seconds (median of ``runs`` rounds, at least MIN_ROUNDS) of each download path of one
    stored file of ``size`` bytes, and every round's seconds (``download_rounds``).

    ``env``: the running stack's settings (``stack.json``), whose storage is a local directory
    holding ``key``; ``download_url``: the export's signed link on that stack's API.
    """
    if shutil.which("curl") is None:
        raise RuntimeError("the download benchmark needs curl")
    local = storage_from_url(env["STORAGE_URL"])
    assert isinstance(local, LocalStorage), "the benchmark stack stores files in a directory"
    path = local.root / key

    def through(url: str) -> int:
        return curl(url, token=token)[0]

    def redirected(url: str) -> int:
        size, _, redirects = curl(url, token=token, follow=True)
        if redirects != 1:
            raise RuntimeError("the API did not redirect")
        return size

    with (
        sendfile_server(path) as zero_copy,
        s3_server() as s3_url,
        api_process(env | {"STORAGE_URL": s3_url}) as s3_streaming,
        api_process(
            env | {"STORAGE_URL": s3_url, "EXPORT_DOWNLOAD_REDIRECT_SECONDS": "60"}
        ) as s3_redirecting,
    ):
        direct = stored(s3_url, key, path)
        with bare_relay(s3_url, key, size) as relay:
            paths: dict[str, Callable[[], int]] = {
                "download_api_seconds": lambda: through(download_url),
                "download_storage_seconds": lambda: sum(len(chunk) for chunk in local.open(key)),
                "download_zero_copy_http_seconds": lambda: fetch(zero_copy),
                "download_s3_direct_seconds": lambda: fetch(direct),
                "download_s3_api_stream_seconds": lambda: through(
                    on_host(download_url, s3_streaming)
                ),
                # the same bytes through a relay that checks nothing (the API's server, no API)
                "download_s3_bare_relay_seconds": lambda: fetch(relay),
                "download_s3_api_redirect_seconds": lambda: redirected(
                    on_host(download_url, s3_redirecting)
                ),
                # the 302 alone: what the API adds to a redirected download (checks, audit row)
                "download_s3_api_redirect_answer_seconds": lambda: (
                    size if curl(on_host(download_url, s3_redirecting), token=token)[1] else 0
                ),
            }
            medians, rounds = interleaved(paths, max(runs, MIN_ROUNDS), size)
            return medians | {"download_rounds": rounds}


def summarize(r: dict[str, Any], size: int) -> dict[str, float]:
    """MB/s of each path and the ratios the targets are about (higher is better)."""
    mb = size / 1e6
    api, s3_direct = r["download_api_seconds"], r["download_s3_direct_seconds"]
    return {
        "download_api_mb_per_s": mb / api,
        "download_storage_mb_per_s": mb / r["download_storage_seconds"],
        "download_zero_copy_http_mb_per_s": mb / r["download_zero_copy_http_seconds"],
        "ratio_download_api_to_storage": r["download_storage_seconds"] / api,
        "ratio_download_api_to_zero_copy_http": r["download_zero_copy_http_seconds"] / api,
        "download_s3_direct_mb_per_s": mb / s3_direct,
        "download_s3_api_stream_mb_per_s": mb / r["download_s3_api_stream_seconds"],
        "download_s3_api_redirect_mb_per_s": mb / r["download_s3_api_redirect_seconds"],
        "ratio_download_s3_stream_to_direct": s3_direct / r["download_s3_api_stream_seconds"],
        "ratio_download_s3_redirect_to_direct": s3_direct / r["download_s3_api_redirect_seconds"],
        "ratio_download_s3_bare_relay_to_direct": s3_direct / r["download_s3_bare_relay_seconds"],
        "ratio_download_s3_stream_to_bare_relay": (
            r["download_s3_bare_relay_seconds"] / r["download_s3_api_stream_seconds"]
        ),
        "download_s3_redirect_answer_ms": 1000 * r["download_s3_api_redirect_answer_seconds"],
    }


def main() -> int:
    import argparse
    import json
    import tempfile

    from export import dev_stack, run_export, storage_key

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, dev_stack(args.rows, Path(tmp), {}) as (stack, _):
        env = stack["env"]
        token = subprocess.run(
            [sys.executable, "-m", "shared.cli", "tokens", "create", "--email", "admin@acme.test"],
            env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        headers = {"Authorization": f"Bearer {token}"}
        with httpx2.Client(
            base_url=stack["api_url"], headers=headers, timeout=120, trust_env=False
        ) as client:
            export = run_export(client, {})
        key = storage_key(env["DATABASE_URL"], export["id"])
        raw = measure(
            env=env,
            token=token,
            download_url=export["download_url"],
            key=key,
            size=export["bytes"],
            runs=args.runs,
        )
    print(json.dumps(raw | summarize(raw, export["bytes"]), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
