"""Tools of the fault tests: a fault-injecting S3 proxy, Kafka group operations, the reference
file of an export, a "quiet stack" check and the final-state assertions every fault test ends
with (one ready file with the right rows, one email, attempts and history consistent)."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import boto3
import httpx2
import psycopg
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from shared.csvfile import copy_statement, header_line
from shared.db import make_engine, make_sessionmaker
from shared.events import TOPIC_LIFECYCLE, TOPIC_REQUESTED
from shared.filters import from_snapshot
from shared.models import Account
from tests.support.exports import export_of
from tests.support.stack import S3_KEYS, LiveStack, link_in
from tests.support.waiting import wait_for

#: Consumer groups of the worker's Kafka bridge and of the notifier, and what they read.
GROUPS = {"orders-export-worker": TOPIC_REQUESTED, "orders-export-notifier": TOPIC_LIFECYCLE}
BUCKET = "exports"


# -- S3 with injected faults ---------------------------------------------------------------------


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away (a killed worker) is no news


class S3FaultProxy:
    """An HTTP proxy in front of the moto S3 server that can break one upload half-way.

    ``arm(mode, export_id)``: the next multipart upload of that export goes through normally
    until its part 1 is stored; from then on, requests for that object key fail:

    - ``"errors"``: part uploads get HTTP 500 ``InternalError`` (the abort still gets through);
    - ``"unreachable"``: every request for the key (parts, abort, delete) loses its connection,
      as if the server went away.

    Other keys (a retry writes a new key) pass, so the fault is exactly one broken upload.
    """

    def __init__(self, *, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._lock = threading.Lock()
        self._mode: str | None = None
        self._export_id: str | None = None
        self._broken_key: str | None = None
        #: (method, key, query) of every request that hit the fault.
        self.faulted: list[tuple[str, str, str]] = []
        self._server = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def storage_url(self) -> str:
        return f"s3://{S3_KEYS[0]}:{S3_KEYS[1]}@127.0.0.1:{self.port}/{BUCKET}"

    def start(self) -> S3FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def arm(self, mode: str, export_id: str) -> None:
        assert mode in ("errors", "unreachable")
        with self._lock:
            self._mode, self._export_id, self._broken_key = mode, export_id, None
            self.faulted = []

    def disarm(self) -> None:
        with self._lock:
            self._mode = self._export_id = self._broken_key = None

    @property
    def broken_key(self) -> str | None:
        return self._broken_key

    def _decide(self, method: str, key: str, query: dict[str, list[str]]) -> str | None:
        """The fault for this request (None: forward it), updating the armed state."""
        with self._lock:
            if self._mode is None or self._export_id is None:
                return None
            if self._broken_key is None:
                part = query.get("partNumber", [""])[0]
                if method == "PUT" and f"/exports/{self._export_id}/" in key and part == "2":
                    self._broken_key = key  # part 1 of this upload is stored by now
                else:
                    return None
            if key != self._broken_key:
                return None
            if self._mode == "errors":
                return "error" if method == "PUT" and "partNumber" in query else None
            return "drop"

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                key = unquote(parts.path).removeprefix(f"/{BUCKET}/")
                query = parse_qs(parts.query, keep_blank_values=True)
                fault = proxy._decide(self.command, key, query)
                if fault is not None:
                    proxy.faulted.append((self.command, key, parts.query))
                if fault == "drop":
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(2)
                    return
                if fault == "error":
                    payload = (
                        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError'
                        b"</Code><Message>injected fault</Message></Error>"
                    )
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    self.send_response(response.status)
                    for name, value in response.getheaders():
                        if name.lower() not in (
                            "connection",
                            "transfer-encoding",
                            "content-length",
                        ):
                            self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler


def s3_client(stack: LiveStack) -> Any:
    return boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{stack.s3_port}", aws_access_key_id=S3_KEYS[0],
        aws_secret_access_key=S3_KEYS[1], region_name="us-east-1",
    )  # fmt: skip


def export_prefix(stack: LiveStack, export_id: str) -> str:
    account_id = stack.sql("SELECT account_id FROM export_jobs WHERE id = %s", export_id)[0][0]
    return f"accounts/{account_id}/exports/{export_id}/"


def objects_of(stack: LiveStack, export_id: str) -> list[str]:
    listing = s3_client(stack).list_objects_v2(
        Bucket=BUCKET, Prefix=export_prefix(stack, export_id)
    )
    return [o["Key"] for o in listing.get("Contents", [])]


def uploads_of(stack: LiveStack, export_id: str) -> list[str]:
    """Keys of the export's multipart uploads that were neither completed nor aborted."""
    listing = s3_client(stack).list_multipart_uploads(
        Bucket=BUCKET, Prefix=export_prefix(stack, export_id)
    )
    return [u["Key"] for u in listing.get("Uploads", [])]


def abort_incomplete_upload_days(stack: LiveStack) -> int | None:
    """What the bucket lifecycle rule does with uploads a crash left incomplete."""
    rules = s3_client(stack).get_bucket_lifecycle_configuration(Bucket=BUCKET)["Rules"]
    for rule in rules:
        if rule.get("Status") == "Enabled" and "AbortIncompleteMultipartUpload" in rule:
            return int(rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"])
    return None


# -- Kafka ----------------------------------------------------------------------------------------


def _bootstrap(stack: LiveStack) -> str:
    return stack.env["KAFKA_BOOTSTRAP_SERVERS"]


def _probe(stack: LiveStack, group: str) -> Any:
    """A consumer that never subscribes: it reads offsets without joining ``group``."""
    return Consumer(
        {"bootstrap.servers": _bootstrap(stack), "group.id": group, "enable.auto.commit": False}
    )


def _partitions_of(client: Any, topic: str) -> list[int]:
    return sorted(client.list_topics(topic, timeout=10).topics[topic].partitions)


def partitions(stack: LiveStack, topic: str) -> list[int]:
    consumer = _probe(stack, f"probe-{uuid.uuid4().hex}")
    try:
        return _partitions_of(consumer, topic)
    finally:
        consumer.close()


def lag(stack: LiveStack, group: str, topic: str) -> int:
    """Messages of ``topic`` that ``group`` has not committed yet."""
    consumer = _probe(stack, group)
    try:
        total = 0
        wanted = [TopicPartition(topic, p) for p in _partitions_of(consumer, topic)]
        for committed in consumer.committed(wanted, timeout=10):
            _, high = consumer.get_watermark_offsets(
                TopicPartition(topic, committed.partition), timeout=10
            )
            total += high - max(committed.offset, 0)
        return total
    finally:
        consumer.close()


def high_watermarks(stack: LiveStack, topic: str) -> dict[int, int]:
    consumer = _probe(stack, f"probe-{uuid.uuid4().hex}")
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in _partitions_of(consumer, topic)
        }
    finally:
        consumer.close()


def read_topic(stack: LiveStack, topic: str, *, since: dict[int, int] | None = None) -> list[Any]:
    """Every message of ``topic`` (from the ``since`` offsets), without joining any group."""
    ends = high_watermarks(stack, topic)
    starts = since or {}
    consumer = Consumer(
        {
            "bootstrap.servers": _bootstrap(stack),
            "group.id": f"reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, p, starts.get(p, OFFSET_BEGINNING)) for p in ends])
        remaining = {p for p, end in ends.items() if end > starts.get(p, 0)}
        messages: list[Any] = []
        deadline = time.monotonic() + 30
        while remaining and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error() is not None:
                continue
            messages.append(message)
            if message.offset() + 1 >= ends[message.partition()]:
                remaining.discard(message.partition())
        assert not remaining, f"could not read {topic} to its end"
        return messages
    finally:
        consumer.close()


def produce(
    stack: LiveStack,
    topic: str,
    value: bytes,
    *,
    key: bytes | None = None,
    partition: int | None = None,
    headers: list[tuple[str, bytes]] | None = None,
) -> None:
    """Write one message and wait until the broker has it."""
    producer = Producer({"bootstrap.servers": _bootstrap(stack), "enable.idempotence": True})
    outcome: list[Any] = []
    extra: dict[str, Any] = {} if partition is None else {"partition": partition}
    producer.produce(
        topic, value=value, key=key, headers=headers or [],
        on_delivery=lambda err, _msg: outcome.append(err), **extra,
    )  # fmt: skip
    producer.flush(15)
    assert outcome == [None], outcome


def rewind_group(stack: LiveStack, group: str, topic: str) -> None:
    """Set ``group``'s committed offsets on ``topic`` back to the beginning.

    What ``kafka-consumer-groups --reset-offsets --to-earliest`` does: the group's own members
    must be stopped. (The local broker only accepts commits from members, so we join, commit
    offset 0 for every partition, and leave.)
    """
    assigned: list[Any] = []
    consumer = Consumer(
        {
            "bootstrap.servers": _bootstrap(stack),
            "group.id": group,
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500,
        }
    )
    try:
        consumer.subscribe([topic], on_assign=lambda _c, ps: assigned.extend(ps))
        count = len(_partitions_of(consumer, topic))
        deadline = time.monotonic() + 60
        while len(assigned) < count:
            assert time.monotonic() < deadline, f"{group} did not get all partitions of {topic}"
            consumer.poll(0.2)
        consumer.commit(
            offsets=[TopicPartition(topic, p.partition, 0) for p in assigned], asynchronous=False
        )
    finally:
        consumer.close()


# -- Redis ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DramatiqBacklog:
    """The exports queue in Redis, as Dramatiq's Redis broker keeps it."""

    waiting: int  # in the queue or the delay queue, not fetched by a worker yet
    held: int  # fetched and not acknowledged, by a worker that is alive (being run or delayed)
    #: Fetched by a worker that died. Dramatiq requeues them once that worker's heartbeat is
    #: older than its timeout (60 s); they then find their job finished and are dropped.
    orphaned: int
    dead: int  # dead-lettered because an actor raised (the runner decides retries: never)


#: A Dramatiq consumer without a heartbeat for this long is dead (it beats on every fetch,
#: several times a second).
CONSUMER_DEAD_AFTER_MS = 5_000


def dramatiq_backlog(stack: LiveStack) -> DramatiqBacklog:
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    try:
        seconds, micros = client.time()
        now_ms = seconds * 1000 + micros // 1000
        beats = {
            k.decode(): v
            for k, v in client.zrange("dramatiq:__heartbeats__", 0, -1, withscores=True)
        }
        waiting = int(client.llen("dramatiq:exports")) + int(client.llen("dramatiq:exports.DQ"))
        held = orphaned = 0
        for key in client.scan_iter(match="dramatiq:__acks__.*"):
            consumer = key.decode().removeprefix("dramatiq:__acks__.").rsplit(".exports", 1)[0]
            count = int(client.scard(key))
            if now_ms - beats.get(consumer, 0) > CONSUMER_DEAD_AFTER_MS:
                orphaned += count
            else:
                held += count
        dead = int(client.zcard("dramatiq:exports.XQ"))
        return DramatiqBacklog(waiting, held, orphaned, dead)
    finally:
        client.close()


# -- the quiet stack -----------------------------------------------------------------------------


def unsettled(stack: LiveStack) -> list[str]:
    """What is still in flight; empty when no export is queued or running, the outbox is
    published, both consumer groups have committed every message and no Dramatiq message waits
    to be fetched. From then on, the counts of claims, files and emails are final: a message
    still held somewhere can only find its job finished (claims need ``queued``)."""
    reasons = []
    active = stack.sql("SELECT count(*) FROM export_jobs WHERE state IN ('queued', 'running')")
    if active[0][0]:
        reasons.append(f"{active[0][0]} exports queued or running")
    pending = stack.sql("SELECT count(*) FROM outbox WHERE published_at IS NULL")[0][0]
    if pending:
        reasons.append(f"{pending} outbox rows unpublished")
    for group, topic in GROUPS.items():
        behind = lag(stack, group, topic)
        if behind:
            reasons.append(f"{group} {behind} messages behind on {topic}")
    backlog = dramatiq_backlog(stack)
    if backlog.waiting:
        reasons.append(f"Dramatiq: {backlog}")
    return reasons


def settle(stack: LiveStack, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while reasons := unsettled(stack):
        if time.monotonic() > deadline:
            raise AssertionError(f"the stack did not settle in {timeout:.0f}s: {reasons}")
        time.sleep(0.5)
    assert dramatiq_backlog(stack).dead == 0, "an actor raised: its message was dead-lettered"


# -- services and metrics -------------------------------------------------------------------------


def restart_services(stack: LiveStack, *names: str) -> None:
    """SIGTERM several services at once (each shuts down cleanly), then start them again."""
    for name in names:
        pid = stack.services[name].pid
        assert pid is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for name in names:
        stack.services[name].stop(timeout=30)
    for name in names:
        stack.start_service(name)


@contextlib.contextmanager
def service_settings(stack: LiveStack, service: str, **settings: str) -> Iterator[None]:
    """Run ``service`` with changed settings (a config change plus a restart), then restore
    them and restart it again. Processes started meanwhile from ``stack.env`` get them too."""
    saved = {name: stack.env.get(name) for name in settings}
    stack.env.update(settings)
    stack.restart_service(service)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                stack.env.pop(name, None)
            else:
                stack.env[name] = value
        stack.restart_service(service)


def metrics(stack: LiveStack, service: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a service's /metrics, keyed by (name, labels)."""

    def scrape() -> str | None:
        try:
            response = httpx2.get(stack.metrics_url(service), timeout=5, trust_env=False)
        except httpx2.HTTPError:
            return None
        return response.text if response.status_code == 200 else None

    text = wait_for(scrape, timeout=30, what=f"{service} metrics")
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


# -- exports and their final state ----------------------------------------------------------------


def history(stack: LiveStack, export_id: str) -> list[tuple[str | None, str, str, str | None]]:
    """(from, to, actor, detail) of every state change, oldest first."""
    return [
        (row[0], row[1], row[2], row[3] or None)
        for row in stack.sql(
            "SELECT from_state::text, to_state::text, actor, detail FROM export_transitions"
            " WHERE export_id = %s ORDER BY id",
            export_id,
        )
    ]


def events(stack: LiveStack, export_id: str, event_type: str) -> list[dict[str, Any]]:
    return [
        row[0]
        for row in stack.sql(
            "SELECT payload FROM outbox WHERE key = %s AND payload->>'type' = %s ORDER BY id",
            export_id,
            event_type,
        )
    ]


def reference_csv(stack: LiveStack, export_id: str) -> tuple[bytes, int]:
    """The file a fault-free run of the export produces, and its rows: the header and the same
    COPY, run now (the test data never changes, and tests/e2e proves this COPY equals the
    report). One COPY message is one row, even when a value holds a line break."""
    (snapshot, account_id, utf8_bom) = stack.sql(
        "SELECT filters, account_id, utf8_bom FROM export_jobs WHERE id = %s", export_id
    )[0]
    engine = make_engine(stack.database_url, pool_size=1)
    try:
        with make_sessionmaker(engine)() as session:
            account = session.get_one(Account, account_id)
            statement, params = copy_statement(account, from_snapshot(snapshot))
            header = header_line(account.timezone)
    finally:
        engine.dispose()
    out = bytearray(b"\xef\xbb\xbf" if utf8_bom else b"")
    out += header
    rows = 0
    with psycopg.connect(stack.database_url) as conn:
        cursor = psycopg.ClientCursor(conn)
        with cursor.copy(statement, params) as copy:
            for chunk in copy:
                out += chunk
                rows += 1
    return bytes(out), rows


@dataclass
class Ready:
    """What the final-state check found, for further assertions."""

    export: dict[str, Any]
    history: list[tuple[str | None, str, str, str | None]]
    storage_key: str
    leftover_uploads: list[str] = field(default_factory=list)


def assert_ready_once(
    stack: LiveStack,
    api: httpx2.Client,
    export_id: str,
    *,
    attempts: int,
    leftover_uploads: int = 0,
) -> Ready:
    """The final state of an export that must end ready, once, whatever happened on the way.

    Call after :func:`settle`. Checks: state ready with no error; ``attempts`` claims (plus one
    per hand-back of a stopping worker, which refunds its attempt), each one a
    ``queued -> running`` in the history, exactly one ``-> ready`` and one ExportReady event;
    exactly one stored object, the job's, no other upload left unless ``leftover_uploads``
    (a worker killed mid-upload cannot abort its own); exactly one email, whose signed link
    downloads a file byte for byte equal to a fault-free run, with the recorded size and SHA-256.
    """
    export = export_of(api, export_id)
    assert export["state"] == "ready", export
    assert export["error"] is None
    assert export["attempts"] == attempts, export
    steps = history(stack, export_id)
    # A stopping worker's hand-back (detail "shutdown") refunds the attempt of its claim
    handed_back = sum(1 for h in steps if h[1] == "queued" and h[3] == "shutdown")
    claims = attempts + handed_back
    assert [h[1] for h in steps].count("running") == claims, steps
    assert [h[1] for h in steps].count("ready") == 1, steps
    assert len(events(stack, export_id, "ExportReady")) == 1
    assert len(events(stack, export_id, "ExportStarted")) == claims
    (storage_key,) = stack.sql("SELECT storage_key FROM export_jobs WHERE id = %s", export_id)[0]
    assert objects_of(stack, export_id) == [storage_key]
    uploads = uploads_of(stack, export_id)
    assert len(uploads) == leftover_uploads, uploads
    assert storage_key not in uploads
    mails = stack.emails_about(export_id)
    assert len(mails) == 1, [m["Subject"] for m in mails]
    assert "ready" in mails[0]["Subject"].lower()
    assert f"{export['row_count']:,} rows" in mails[0]["Subject"]
    download = api.get(link_in(mails[0]))
    assert download.status_code == 200, download.text
    expected, rows = reference_csv(stack, export_id)
    assert download.content == expected, "the file differs from a fault-free run"
    assert export["row_count"] == rows
    assert export["file"]["size_bytes"] == len(expected)
    assert export["file"]["sha256"] == hashlib.sha256(expected).hexdigest()
    notification = stack.sql(
        "SELECT sent_at IS NOT NULL FROM notifications WHERE export_id = %s AND kind = 'ready'",
        export_id,
    )
    assert notification == [(True,)]
    return Ready(export=export, history=steps, storage_key=storage_key, leftover_uploads=uploads)


def poll_until(check: Callable[[], Any], *, timeout: float, what: str) -> Any:
    """``wait_for`` with a faster poll, for windows of a second or two."""
    return wait_for(check, timeout=timeout, what=what, interval=0.05)
