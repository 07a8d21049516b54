"""Fixtures shared by integration test modules: a real Redis and the Dramatiq actors on it, and
a Kafka-protocol broker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from services.worker.actors import Actors, declare_actors, make_broker
from shared.devstack.kafka_broker import KafkaBroker
from shared.devstack.redis import EmbeddedRedis
from shared.settings import Settings


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
