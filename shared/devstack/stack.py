"""The supervisor behind ``orders-export dev``: the whole stack on this machine.

Start order: PostgreSQL, Redis, the in-memory Kafka-protocol broker, the SMTP sink (each only if
its environment variable does not already name a real server), migrations, demo data, then the
services of :data:`~shared.devstack.services.SERVICES`. When all are up it writes ``stack.json``
and prints ``ready <api_url>``. It stops everything, in reverse order, on SIGINT/SIGTERM (exit 0)
or when a child dies (exit 1). PostgreSQL is daemonized by ``pg_ctl``, not our child: it is
stopped with ``pg_ctl stop`` and its pid checked.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Protocol

from shared import migrate
from shared.devstack.atomic import write_atomic
from shared.devstack.children import ChildProcess, python_env
from shared.devstack.errors import DevStackError
from shared.devstack.kafka_broker import KafkaBroker
from shared.devstack.layout import SECRET_KEY_FILE_MODE, StackLayout
from shared.devstack.mailsink import MailSink
from shared.devstack.ports import LOOPBACK, free_port
from shared.devstack.postgres import DATABASE_NAME, EmbeddedPostgres
from shared.devstack.redis import EmbeddedRedis
from shared.devstack.services import SERVICES, ServiceSpec
from shared.seeding import ensure_demo_data
from shared.settings import Settings

#: Kafka consumer session timeout of the local stack (milliseconds).
LOCAL_KAFKA_SESSION_TIMEOUT_MS = 6000

logger = logging.getLogger(__name__)

#: How long a service may take to answer its health check with 200 (seconds).
SERVICE_START_TIMEOUT = 60.0
#: Timeout of one health-check request (seconds).
HEALTH_REQUEST_TIMEOUT = 1.0
#: How long ``ready`` waits for the services' Kafka consumers to hold their partitions (seconds;
#: the local broker's first group join takes a few). Then the stack says ready anyway, with a
#: warning: an external broker may have other members of the group holding every partition.
CONSUMER_JOIN_TIMEOUT = 30.0
#: The gauge a Kafka-consuming service exposes per group (``shared/metrics.py``).
ASSIGNED_PARTITIONS = "orders_export_consumer_assigned_partitions"
#: How often the supervisor looks at its children (seconds).
SUPERVISE_INTERVAL = 0.25
#: Exit status after a clean stop (signal) and after a failure.
EXIT_OK, EXIT_FAILURE = 0, 1

DATABASE_URL = "DATABASE_URL"
REDIS_URL = "REDIS_URL"
KAFKA_BOOTSTRAP_SERVERS = "KAFKA_BOOTSTRAP_SERVERS"
SMTP_URL = "SMTP_URL"
STORAGE_URL = "STORAGE_URL"
SECRET_KEY = "SECRET_KEY"  # noqa: S105 - the variable's name, not a secret
PUBLIC_URL = "PUBLIC_URL"
#: Variables that, when set, make ``dev`` join that server (or use that key or address) instead
#: of starting or making its own.
JOINED = (
    DATABASE_URL,
    REDIS_URL,
    KAFKA_BOOTSTRAP_SERVERS,
    STORAGE_URL,
    SMTP_URL,
    SECRET_KEY,
    PUBLIC_URL,
)
METRICS_PORT = "METRICS_PORT"
METRICS_HOST = "METRICS_HOST"
PROMETHEUS_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
#: Settings that differ per service: given to each child, never shared through stack.json.
PER_SERVICE = frozenset({METRICS_PORT, METRICS_HOST, PROMETHEUS_MULTIPROC_DIR})


class _Stoppable(Protocol):
    def stop(self) -> object: ...


class _StopRequested(Exception):
    """SIGINT/SIGTERM arrived while the stack was starting."""


class Stack:
    """One run of the local stack; use :func:`run`."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        data_dir: Path,
        demo_orders: int,
        services: Sequence[ServiceSpec] = SERVICES,
    ) -> None:
        self.host = host
        self.port = port
        self.layout = StackLayout.at(data_dir)
        self.demo_orders = demo_orders
        self.services = tuple(services)
        self.env: dict[str, str] = {}
        #: Service name -> URL of its Prometheus endpoint.
        self.metrics: dict[str, str] = {}
        self.api_url = ""
        self._postgres: EmbeddedPostgres | None = None
        self._started: list[tuple[str, _Stoppable]] = []
        self._children: list[ChildProcess] = []
        self._stop_signal: str | None = None

    # -- signals -----------------------------------------------------------------------------

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler: remember the request; the main loop acts on it."""
        if self._stop_signal is None:
            self._stop_signal = signal.Signals(signum).name
            logger.info("dev: %s received, stopping", self._stop_signal)

    def _check_stop(self) -> None:
        if self._stop_signal is not None:
            raise _StopRequested

    # -- start ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Bring every piece up, write ``stack.json`` and print ``ready <api_url>``."""
        started = time.monotonic()
        logger.info("dev: starting the stack in %s", self.layout.data_dir)
        self.layout.create()
        self.layout.remove_stale_ready_files()
        env = self.env
        env[SECRET_KEY] = os.environ.get(SECRET_KEY) or self.layout.secret_key()
        env[DATABASE_URL] = self._external(DATABASE_URL) or self._start_postgres()
        env[REDIS_URL] = self._external(REDIS_URL) or self._start_redis()
        env[KAFKA_BOOTSTRAP_SERVERS] = (
            self._external(KAFKA_BOOTSTRAP_SERVERS) or self._start_kafka()
        )
        # A restarted local consumer rejoins its group in seconds instead of 45.
        env["KAFKA_SESSION_TIMEOUT_MS"] = os.environ.get("KAFKA_SESSION_TIMEOUT_MS") or str(
            LOCAL_KAFKA_SESSION_TIMEOUT_MS
        )
        env[SMTP_URL] = self._external(SMTP_URL) or self._start_mailsink()
        env[STORAGE_URL] = self._external(STORAGE_URL) or self.layout.storage_dir.as_uri()
        port = self.port or free_port(self.host)
        self.api_url = f"http://{_url_host(self.host)}:{port}"
        env[PUBLIC_URL] = self._external(PUBLIC_URL) or self.api_url
        env.update(_settings_from_environment(exclude=env.keys() | PER_SERVICE))
        with self._step("migrations"):
            migrate.upgrade(env[DATABASE_URL])
        self._check_stop()
        with self._step(f"demo data ({self.demo_orders} orders)"):
            ensure_demo_data(self._settings(), orders=self.demo_orders)
        for spec in self.services:
            self._check_stop()
            self._start_service(spec, port=port)
        self._check_stop()
        self._wait_for_consumers()
        self._check_stop()
        self.publish()
        logger.info("dev: ready in %.1fs, stop with Ctrl-C", time.monotonic() - started)
        print(f"ready {self.api_url}", flush=True)

    def publish(self) -> None:
        """Write ``stack.json``: it holds SECRET_KEY, so only its owner may read it."""
        write_atomic(
            self.layout.stack_file,
            json.dumps(self.description(), indent=2) + "\n",
            mode=SECRET_KEY_FILE_MODE,
        )

    def description(self) -> dict[str, object]:
        """The content of ``stack.json``."""
        return {
            "api_url": self.api_url,
            "mail_dir": str(self.layout.mail_dir),
            "env": self.env,
            "metrics": self.metrics,
        }

    def _external(self, name: str) -> str | None:
        value = os.environ.get(name)
        if value:
            logger.info("%s: taken from the environment", name)
        return value or None

    def _settings(self) -> Settings:
        env = self.env
        return Settings(
            database_url=env[DATABASE_URL],
            secret_key=env[SECRET_KEY],
            redis_url=env[REDIS_URL],
            kafka_bootstrap_servers=env[KAFKA_BOOTSTRAP_SERVERS],
            storage_url=env[STORAGE_URL],
            smtp_url=env[SMTP_URL],
            public_url=env[PUBLIC_URL],
        )

    @contextmanager
    def _step(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        logger.info("%s: starting", name)
        yield
        logger.info("%s: ready (%.1fs)", name, time.monotonic() - started)

    def _start_piece(self, name: str, piece: _Stoppable, start: Callable[[], str]) -> str:
        self._check_stop()
        self._started.append((name, piece))
        with self._step(name):
            value = start()
        child = getattr(piece, "child", None)
        if isinstance(child, ChildProcess):
            self._children.append(child)
        return value

    def _start_postgres(self) -> str:
        postgres = EmbeddedPostgres(pgdata=self.layout.pgdata)
        self._postgres = postgres
        self._start_piece("postgres", postgres, postgres.start)
        return postgres.ensure_database(DATABASE_NAME)

    def _start_redis(self) -> str:
        layout = self.layout
        redis = EmbeddedRedis(data_dir=layout.redis_dir, pid_file=layout.pid_file("redis"))
        return self._start_piece("redis", redis, redis.start)

    def _start_kafka(self) -> str:
        layout = self.layout
        broker = KafkaBroker(
            ready_file=layout.ready_file("kafka-broker"), pid_file=layout.pid_file("kafka-broker")
        )
        return self._start_piece("kafka-broker", broker, broker.start)

    def _start_mailsink(self) -> str:
        layout = self.layout
        sink = MailSink(
            mail_dir=layout.mail_dir,
            ready_file=layout.ready_file("mailsink"),
            pid_file=layout.pid_file("mailsink"),
        )
        return self._start_piece("mailsink", sink, sink.start)

    def _service_env(self, spec: ServiceSpec) -> dict[str, str]:
        """The shared environment plus the service's own metrics settings."""
        env = {**os.environ, **self.env}
        env[PROMETHEUS_MULTIPROC_DIR] = str(self.layout.fresh_metrics_dir(spec.name))
        if spec.metrics_port:
            metrics_port = free_port(self.host)
            env[METRICS_PORT] = str(metrics_port)
            env[METRICS_HOST] = self.host
            self.metrics[spec.name] = f"http://{_url_host(self.host)}:{metrics_port}/metrics"
        else:
            env.pop(METRICS_PORT, None)
            self.metrics[spec.name] = f"{self.api_url}/metrics"
        return env

    def _start_service(self, spec: ServiceSpec, *, port: int) -> None:
        child = ChildProcess(
            name=spec.name,
            argv=spec.argv(host=self.host, port=port),
            env=python_env(self._service_env(spec)),
            pid_file=self.layout.pid_file(spec.name),
        )
        self._started.append((spec.name, child))
        self._children.append(child)
        with self._step(spec.name):
            child.start()
            if spec.health_path is not None:
                url = f"http://{_url_host(self.host)}:{port}{spec.health_path}"

                def healthy_or_stopping() -> bool:
                    return self._stop_signal is not None or _http_ok(url)

                child.wait_until(
                    healthy_or_stopping, timeout=SERVICE_START_TIMEOUT, what=f"200 from {url}"
                )

    def _wait_for_consumers(self) -> None:
        """Until every Kafka-consuming service holds partitions (or CONSUMER_JOIN_TIMEOUT)."""
        waiting = [s.name for s in self.services if s.kafka_consumer and s.name in self.metrics]
        if not waiting:
            return
        with self._step("Kafka consumers' first group join"):
            deadline = time.monotonic() + CONSUMER_JOIN_TIMEOUT
            while self._stop_signal is None:
                waiting = [name for name in waiting if _assigned(self.metrics[name]) < 1]
                if not waiting or any(c.exit_code is not None for c in self._children):
                    return  # a service that died is reported by supervise()
                if time.monotonic() > deadline:
                    logger.warning(
                        "%s: no Kafka partitions assigned after %.0f s; ready anyway",
                        ", ".join(waiting),
                        CONSUMER_JOIN_TIMEOUT,
                    )
                    return
                time.sleep(SUPERVISE_INTERVAL)

    # -- supervise and stop ----------------------------------------------------------------------

    def supervise(self) -> int:
        """Wait for a stop signal (0) or a dead child / postgres (1)."""
        while self._stop_signal is None:
            for child in self._children:
                if child.exit_code is not None:
                    logger.error("%s: exited unexpectedly (status %s)", child.name, child.exit_code)
                    return EXIT_FAILURE
            if self._postgres is not None and self._postgres.pid is None:
                logger.error("postgres: the server is no longer running")
                return EXIT_FAILURE
            time.sleep(SUPERVISE_INTERVAL)
        return EXIT_OK

    def stop(self) -> bool:
        """Stop everything started, in reverse order; True if all of it stopped."""
        clean = True
        while self._started:
            name, piece = self._started.pop()
            started = time.monotonic()
            try:
                piece.stop()
            except Exception:
                logger.exception("%s: failed to stop", name)
                clean = False
            else:
                logger.info("%s: stopped (%.1fs)", name, time.monotonic() - started)
        self.layout.remove_stale_ready_files()
        return clean


def _url_host(host: str) -> str:
    """The host to put in URLs for a server bound to ``host``."""
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - mapped to loopback, never bound here
        return LOOPBACK
    return f"[{host}]" if ":" in host else host


def _http_ok(url: str) -> bool:
    """True if GET ``url`` answers 200 (no proxies: it is a local address)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=HEALTH_REQUEST_TIMEOUT) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _assigned(metrics_url: str) -> float:
    """Partitions the service's consumers hold, from its ``/metrics`` (0 when unreachable)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(metrics_url, timeout=HEALTH_REQUEST_TIMEOUT) as response:
            text = response.read().decode()
        prefix = ASSIGNED_PARTITIONS + "{"
        return sum(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
        )
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError):
        return 0.0


def _settings_from_environment(*, exclude: AbstractSet[str]) -> dict[str, str]:
    """Other settings set in our environment (``EXPORT_*`` etc.), passed on in ``stack.json``."""
    names = (name.upper() for name in Settings.model_fields)
    return {name: os.environ[name] for name in names if name in os.environ and name not in exclude}


@contextmanager
def _progress_logging() -> Iterator[None]:
    """Progress lines on stderr unless the caller configured logging already."""
    package = logging.getLogger("shared.devstack")
    if logging.getLogger().handlers or package.handlers:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    previous_level = package.level
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(previous_level)


@contextmanager
def _stop_signals(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    previous = {
        signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def run(
    *,
    host: str,
    port: int,
    data_dir: Path,
    demo_orders: int,
    services: Sequence[ServiceSpec] = SERVICES,
) -> int:
    """Run the stack in the foreground until SIGINT/SIGTERM (exit 0) or a failure (exit 1).

    ``port`` 0 picks a free port for the API. Must be called from the main thread.
    """
    stack = Stack(
        host=host, port=port, data_dir=data_dir, demo_orders=demo_orders, services=services
    )
    with _progress_logging(), _stop_signals(stack.request_stop):
        try:
            stack.start()
            status = stack.supervise()
        except _StopRequested:
            status = EXIT_OK
        except DevStackError as exc:
            logger.error("dev: %s", exc)
            status = EXIT_FAILURE
        except Exception:
            logger.exception("dev: failed to start")
            status = EXIT_FAILURE
        finally:
            clean = stack.stop()
    return status if clean else EXIT_FAILURE
