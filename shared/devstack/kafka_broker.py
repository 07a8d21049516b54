"""In-memory Kafka-protocol broker for local runs.

librdkafka (inside the ``confluent-kafka`` wheel) has a built-in mock cluster: a client created
with ``test.mock.num.brokers`` starts an in-memory broker on 127.0.0.1 that other processes reach
over TCP like any Kafka broker. It is not durable (everything is gone when it stops) and has no
CreateTopics admin API (topics auto-create); Redpanda is the real thing in production.

``python -m shared.devstack.kafka_broker --ready-file PATH`` owns such a client, writes the
broker's ``bootstrap.servers`` to PATH (atomically), prints it, and keeps serving until
SIGTERM/SIGINT. :class:`KafkaBroker` starts it as a child process.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from shared.devstack.atomic import write_atomic
from shared.devstack.children import ChildProcess, RunsChild, python_env

#: How long the mock cluster may take to announce its address (seconds).
ANNOUNCE_TIMEOUT = 30.0
#: How long the parent waits for the ready file (seconds).
START_TIMEOUT = 45.0
#: How long one poll of the owning client blocks (seconds); bounds the reaction to SIGTERM.
POLL_INTERVAL = 0.5
#: Brokers in the mock cluster.
MOCK_BROKERS = 1
#: How librdkafka announces the mock cluster's address with ``debug=mock``.
BOOTSTRAP_PATTERN = re.compile(r"bootstrap\.servers=(\S+)")


class _BootstrapCapture(logging.Handler):
    """Picks the mock cluster's address out of librdkafka's log; passes on warnings."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.bootstrap: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.bootstrap is None:
            match = BOOTSTRAP_PATTERN.search(message)
            if match is not None:
                self.bootstrap = match.group(1)
        if record.levelno >= logging.WARNING:
            print(f"kafka-broker: {message}", file=sys.stderr, flush=True)


def serve(*, ready_file: Path) -> int:
    """Run the mock cluster until SIGTERM/SIGINT; 0 on a clean stop."""
    import confluent_kafka

    stopping = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    capture = _BootstrapCapture()
    rdkafka_log = logging.getLogger("shared.devstack.kafka_broker.librdkafka")
    rdkafka_log.setLevel(logging.DEBUG)
    rdkafka_log.propagate = False
    rdkafka_log.addHandler(capture)
    client = confluent_kafka.Producer(
        {
            "bootstrap.servers": "unused",
            "test.mock.num.brokers": MOCK_BROKERS,
            "logger": rdkafka_log,
            "debug": "mock",
        }
    )
    deadline = time.monotonic() + ANNOUNCE_TIMEOUT
    while capture.bootstrap is None:
        if stopping:
            return 0
        if time.monotonic() >= deadline:
            print("kafka-broker: the mock cluster announced no address", file=sys.stderr)
            return 1
        client.poll(0.1)
    write_atomic(ready_file, capture.bootstrap + "\n")
    print(capture.bootstrap, flush=True)
    while not stopping:
        client.poll(POLL_INTERVAL)
    ready_file.unlink(missing_ok=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="In-memory Kafka-protocol broker for local runs")
    parser.add_argument("--ready-file", type=Path, required=True, help="where to write the address")
    args = parser.parse_args(argv)
    return serve(ready_file=args.ready_file)


class KafkaBroker(RunsChild):
    """Starts ``python -m shared.devstack.kafka_broker`` as a child and waits for its address."""

    def __init__(self, *, ready_file: Path, pid_file: Path | None = None) -> None:
        self.ready_file = ready_file
        self.pid_file = pid_file
        self.bootstrap_servers: str | None = None

    def start(self) -> str:
        """Start the broker; return its ``bootstrap.servers`` (``127.0.0.1:PORT``)."""
        self.ready_file.parent.mkdir(parents=True, exist_ok=True)
        self.ready_file.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "shared.devstack.kafka_broker"]
        argv += ["--ready-file", str(self.ready_file)]
        self._child = ChildProcess(
            name="kafka-broker", argv=argv, env=python_env(), pid_file=self.pid_file
        )
        self._child.start()
        self.bootstrap_servers = self._child.wait_for_file(self.ready_file, timeout=START_TIMEOUT)
        return self.bootstrap_servers

    def stop(self) -> None:
        """SIGTERM the broker and wait for it; its data is gone (in-memory)."""
        self._stop_child()
        self.ready_file.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
