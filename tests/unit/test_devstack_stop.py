"""The dev stack and docker-compose wait for a worker's longest orderly stop before SIGKILL."""

from pathlib import Path

import yaml

from services.worker.main import HAND_BACK_SECONDS, THREAD_JOIN_SECONDS
from shared.devstack.children import STOP_TIMEOUT
from shared.settings import MAX_SHUTDOWN_GRACE_SECONDS

#: The grace at its maximum, handing exports back, then joining the worker's three threads (s).
LONGEST_WORKER_STOP = MAX_SHUTDOWN_GRACE_SECONDS + HAND_BACK_SECONDS + 3 * THREAD_JOIN_SECONDS


def test_the_dev_stack_outlasts_the_longest_worker_shutdown() -> None:
    assert LONGEST_WORKER_STOP < STOP_TIMEOUT


def test_docker_compose_gives_the_worker_as_long() -> None:
    compose = yaml.safe_load((Path(__file__).parents[2] / "docker-compose.yml").read_text())
    grace = compose["services"]["worker"]["stop_grace_period"]
    assert grace.endswith("s")
    assert int(grace.removesuffix("s")) > LONGEST_WORKER_STOP
