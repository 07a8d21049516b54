"""The long-running services of the local stack, as data: one :class:`ServiceSpec` each."""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ServiceSpec:
    """A service run as ``python -m <args>``; ``{host}`` and ``{port}`` in ``args`` are the
    API's address. With ``health_path`` the stack waits for HTTP 200 there before going on.
    ``metrics_port``: the service gets a METRICS_PORT of its own (the API serves ``/metrics``
    on its HTTP port). ``kafka_consumer``: the stack is ready only once the service's Kafka
    consumer holds its partitions (its metrics say so), so the first export after ``ready``
    does not wait seconds for the group's first join."""

    name: str
    args: tuple[str, ...]
    health_path: str | None = None
    metrics_port: bool = False
    kafka_consumer: bool = False

    def argv(self, *, host: str, port: int) -> list[str]:
        """The command line for this service."""
        return [sys.executable, "-m", *(arg.format(host=host, port=port) for arg in self.args)]


#: Started in this order, stopped in reverse.
SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec(
        name="api",
        args=("uvicorn", "services.api.app:create_app", "--factory", "--host", "{host}",
              "--port", "{port}", "--no-access-log", "--no-proxy-headers"),
        health_path="/healthz",
    ),
    ServiceSpec(name="relay", args=("services.relay",), metrics_port=True),
    ServiceSpec(name="worker", args=("services.worker",), metrics_port=True, kafka_consumer=True),
    ServiceSpec(name="notifier", args=("services.notifier",), metrics_port=True,
                kafka_consumer=True),
)  # fmt: skip
