"""Fixtures shared by integration test modules: a real Redis and the Dramatiq actors on it, a
Kafka-protocol broker, an S3 server, a test's own storage and SMTP sink, a real worker process,
and the API app of a module (its settings and a client)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from services.api.app import create_app
from services.worker.actors import Actors, declare_actors, make_broker
from shared.devstack.kafka_broker import KafkaBroker
from shared.devstack.mailsink import MailSink
from shared.devstack.redis import EmbeddedRedis
from shared.settings import Settings
from tests.integration.s3server import S3TestServer
from tests.support.processes import WorkerProcess, start_worker
from tests.support.storage import FaultyStorage, local_storage


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedRedis(data_dir=Path(tmp_path_factory.mktemp("redis")))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def actors(settings: Settings, redis_url: str, sessions: sessionmaker[Session]) -> Iterator[Actors]:
    broker = make_broker(settings.model_copy(update={"redis_url": redis_url}))
    try:
        yield declare_actors(broker, runner=None, sessions=sessions)
    finally:
        broker.close()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Kafka-protocol broker for the module; its bootstrap address."""
    root = tmp_path_factory.mktemp("kafka")
    kafka = KafkaBroker(ready_file=root / "kafka.ready", pid_file=root / "kafka.pid")
    try:
        yield kafka.start()
    finally:
        kafka.stop()


@pytest.fixture
def storage(tmp_path: Path) -> FaultyStorage:
    """The test's own local storage, which it can slow down or make fail."""
    return FaultyStorage(local_storage(tmp_path / "files"))


@pytest.fixture(scope="module")
def app_settings(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Settings:
    """The settings of the module's app: a fresh local storage directory, and the changes of the
    module's ``APP_SETTINGS`` (a dict of settings fields)."""
    storage = Path(tmp_path_factory.mktemp("storage")).as_uri()
    changes = getattr(request.module, "APP_SETTINGS", {})
    return settings.model_copy(update={"storage_url": storage, **changes})


@pytest.fixture(scope="module")
def client(app_settings: Settings, population: object) -> Iterator[TestClient]:
    """A client of the module's app, started (lifespan) after the module's ``population``; a
    server error is a 500 answer, as a real client sees it."""
    with TestClient(
        create_app(app_settings), base_url="http://127.0.0.1", raise_server_exceptions=False
    ) as client:
        yield client


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3TestServer]:
    """A real S3-protocol server (moto, expiring presigned URLs) on a free loopback port."""
    server = S3TestServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[MailSink]:
    """The test's own SMTP sink (it keeps every message as a file)."""
    mail = MailSink(mail_dir=tmp_path / "mail", ready_file=tmp_path / "mail.ready")
    mail.start()
    try:
        yield mail
    finally:
        mail.stop()


@pytest.fixture
def run_worker(settings: Settings, redis_url: str, broker: str, tmp_path: Path) -> WorkerProcess:
    """A real worker process on the module's database, Redis and Kafka broker; the test stops
    it (``tests.support.processes.terminate``)."""

    def start(**env: str) -> subprocess.Popen[bytes]:
        base = {
            "DATABASE_URL": settings.database_url,
            "SECRET_KEY": settings.secret_key,
            "REDIS_URL": redis_url,
            "KAFKA_BOOTSTRAP_SERVERS": broker,
            "KAFKA_SESSION_TIMEOUT_MS": "6000",
            "STORAGE_URL": (tmp_path / "files").as_uri(),
        }
        return start_worker({**os.environ, **base, **env}, tmp_path / "worker.log")

    return start
