"""A live stack for end-to-end and fault tests: real servers and real service processes.

Unlike ``orders-export dev`` (which stops everything when one child dies), each service here
can be stopped, killed and restarted on its own, and the infrastructure can be taken away.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx2
import psycopg
from moto.server import ThreadedMotoServer

from shared.devstack.children import ChildProcess, python_env
from shared.devstack.kafka_broker import KafkaBroker
from shared.devstack.mailsink import MailSink
from shared.devstack.ports import free_port
from shared.devstack.postgres import EmbeddedPostgres
from shared.devstack.redis import EmbeddedRedis
from shared.devstack.services import SERVICES as PRODUCT_SERVICES
from shared.devstack.services import ServiceSpec
from shared.migrate import upgrade
from shared.seeding import ensure_demo_data
from shared.settings import Settings
from shared.storage import storage_from_url
from tests.support.waiting import wait_for

#: The product's services (shared/devstack/services.py), by name, in their start order.
SERVICES: dict[str, ServiceSpec] = {spec.name: spec for spec in PRODUCT_SERVICES}
#: Settings that make faults show within seconds instead of minutes.
FAST_FAILURE_ENV = {
    "EXPORT_LEASE_SECONDS": "3",
    "EXPORT_RETRY_BACKOFF_SECONDS": "0.5",
    "EXPORT_MAX_ATTEMPTS": "2",
    "EXPORT_REQUEUE_AFTER_SECONDS": "3600",  # prove the Kafka path, not the safety net
    "KAFKA_SESSION_TIMEOUT_MS": "6000",
}
S3_KEYS = ("stack-access", "stack-secret-key-0123456789")
#: Services with a Prometheus endpoint of their own (the API serves /metrics on its port).
METRICS_SERVICES = tuple(spec.name for spec in PRODUCT_SERVICES if spec.metrics_port)


class LiveStack:
    """PostgreSQL, Redis, the Kafka-protocol broker, an SMTP sink, S3 (moto) and the services."""

    def __init__(self, root: Path, *, orders: int, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.orders = orders
        self.extra_env = {**FAST_FAILURE_ENV, **(env or {})}
        self.postgres = EmbeddedPostgres(pgdata=root / "pg")
        self.redis = EmbeddedRedis(data_dir=root / "redis")
        self.broker: KafkaBroker | None = None
        self.mail = MailSink(mail_dir=root / "mail", ready_file=root / "run" / "mail.ready")
        self.s3: ThreadedMotoServer | None = None
        self.s3_port = free_port()
        self.api_port = free_port()
        #: Service -> its METRICS_PORT (kept across restarts, so Prometheus keeps scraping it).
        self.metrics_ports = {name: free_port() for name in METRICS_SERVICES}
        self.env: dict[str, str] = {}
        self.services: dict[str, ChildProcess] = {}

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def metrics_url(self, name: str) -> str:
        port = self.api_port if name == "api" else self.metrics_ports[name]
        return f"http://127.0.0.1:{port}/metrics"

    @property
    def database_url(self) -> str:
        return self.env["DATABASE_URL"]

    # -- infrastructure ------------------------------------------------------------------------

    def start(self) -> LiveStack:
        self.postgres.start()
        database_url = self.postgres.ensure_database()
        self.start_s3()
        self.env = {
            **self.extra_env,
            "DATABASE_URL": database_url,
            "REDIS_URL": self.redis.start(),
            "KAFKA_BOOTSTRAP_SERVERS": self.start_broker(),
            "SMTP_URL": self.mail.start(),
            "STORAGE_URL": f"s3://{S3_KEYS[0]}:{S3_KEYS[1]}@127.0.0.1:{self.s3_port}/exports",
            "SECRET_KEY": "live-stack-secret-key-0123456789",
            "PUBLIC_URL": self.api_url,
        }
        upgrade(database_url)
        ensure_demo_data(self.settings(), orders=self.orders)
        for name in SERVICES:
            self.start_service(name)
        wait_for(self._api_up, timeout=30, what="the API")
        return self

    def settings(self) -> Settings:
        return Settings(**{k.lower(): v for k, v in self.env.items()})

    def start_broker(self) -> str:
        self.broker = KafkaBroker(
            ready_file=self.root / "run" / f"kafka-{time.monotonic_ns()}.ready"
        )
        return self.broker.start()

    def stop_broker(self) -> None:
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    def start_s3(self) -> None:
        self.s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=self.s3_port, verbose=False)
        self.s3.start()
        if self.env:  # a restarted moto server forgets everything: make the bucket again
            storage_from_url(self.env["STORAGE_URL"]).prepare()

    def stop_s3(self) -> None:
        if self.s3 is not None:
            self.s3.stop()
            self.s3 = None

    # -- services ------------------------------------------------------------------------------

    def start_service(self, name: str) -> ChildProcess:
        argv = SERVICES[name].argv(host="127.0.0.1", port=self.api_port)
        env = python_env({**os.environ, **self.env, **self._metrics_env(name)})
        child = ChildProcess(name=name, argv=argv, env=env)
        child.start()
        self.services[name] = child
        return child

    def _metrics_env(self, name: str) -> dict[str, str]:
        """An empty multiprocess directory per start, and the service's metrics port."""
        directory = self.root / "metrics" / name
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        env = {"PROMETHEUS_MULTIPROC_DIR": str(directory)}
        if name in self.metrics_ports:
            env["METRICS_PORT"] = str(self.metrics_ports[name])
        return env

    def kill_service(self, name: str, signum: int = signal.SIGKILL) -> None:
        child = self.services[name]
        assert child.pid is not None
        os.kill(child.pid, signum)
        wait_for(lambda: not child.running, timeout=30, what=f"{name} to exit")

    def restart_service(self, name: str) -> None:
        self.services[name].stop()
        self.start_service(name)

    def stop(self) -> None:
        for child in reversed(list(self.services.values())):
            child.stop()
        self.stop_broker()
        self.mail.stop()
        self.redis.stop()
        self.stop_s3()
        self.postgres.stop()

    def _api_up(self) -> bool:
        try:
            return httpx2.get(f"{self.api_url}/readyz", timeout=2).status_code == 200
        except httpx2.HTTPError:
            return False

    # -- observations --------------------------------------------------------------------------

    def sql(self, query: str, *params: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.database_url) as conn:
            return conn.execute(query, params).fetchall()  # type: ignore[arg-type]

    def token(self, email_address: str = "admin@acme.test") -> str:
        from shared.db import make_engine, make_sessionmaker, transaction
        from shared.identity import create_token, find_user

        engine = make_engine(self.database_url, pool_size=1)
        try:
            with transaction(make_sessionmaker(engine)) as session:
                user = find_user(session, email_address)
                assert user is not None
                return create_token(session, user)
        finally:
            engine.dispose()

    def emails(self) -> list[EmailMessage]:
        messages = []
        for path in self.mail.messages():
            parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            assert isinstance(parsed, EmailMessage)
            messages.append(parsed)
        return messages

    def emails_about(self, export_id: str) -> list[EmailMessage]:
        return [m for m in self.emails() if export_id in body_text(m)]


def body_text(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    return part.get_content() if part is not None else ""  # type: ignore[no-any-return]


def link_in(message: EmailMessage) -> str:
    match = re.search(r"https?://\S+/exports/[0-9a-f-]+/download\?\S+", body_text(message))
    assert match, "no download link in the email"
    return match.group(0)


def running(live: LiveStack) -> Iterator[LiveStack]:
    """Start ``live``, hand it out, stop it whatever happens (``yield from`` in a fixture)."""
    try:
        yield live.start()
    finally:
        live.stop()


def api_client(stack: LiveStack, extra: dict[str, str] | None = None) -> Iterator[httpx2.Client]:
    """An HTTP client of the stack's API with the demo admin's bearer token (``yield from``)."""
    headers = {"Authorization": f"Bearer {stack.token()}", **(extra or {})}
    with httpx2.Client(
        base_url=stack.api_url, headers=headers, timeout=30, trust_env=False
    ) as client:
        yield client
