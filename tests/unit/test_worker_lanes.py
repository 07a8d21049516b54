"""The worker process's two Dramatiq workers (the exports queue and the fast lane)."""

from __future__ import annotations

import logging

import pytest
from dramatiq.brokers.stub import StubBroker

from services.worker.actors import EXPORTS_QUEUE, FAST_QUEUE
from services.worker.main import lane_workers
from shared.settings import Settings


def test_each_lane_consumes_its_own_queue_and_starting_them_warns_of_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = StubBroker()
    broker.declare_queue(EXPORTS_QUEUE)
    broker.declare_queue(FAST_QUEUE)
    settings = Settings.model_construct(export_worker_threads=2, export_fast_lane_threads=1)
    with caplog.at_level(logging.WARNING):
        worker, fast_worker = lane_workers(broker, settings)
    # Both lanes' middleware is on the one broker on purpose: no "same type twice" warning
    assert [record.getMessage() for record in caplog.records] == []
    assert (worker.consumer_whitelist, fast_worker.consumer_whitelist) == (
        {EXPORTS_QUEUE},
        {FAST_QUEUE},
    )
    assert (worker.worker_threads, fast_worker.worker_threads) == (2, 1)
