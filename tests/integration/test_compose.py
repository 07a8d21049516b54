"""docker-compose.yml: it parses with docker-compose (v1, no engine needed), and it agrees with
the code: every variable the services get is a setting, Prometheus scrapes the ports the
services serve metrics on, the topics and the bucket rule are the ones the code uses."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from shared.events import TOPIC_DEAD_LETTER, TOPIC_LIFECYCLE, TOPIC_REQUESTED
from shared.settings import Settings
from shared.storage import DEFAULT_EXPIRE_DAYS
from shared.storage.s3 import LIFECYCLE_RULE_ID

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Services built from our Dockerfile.
APP_SERVICES = ("migrate", "api", "relay", "worker", "notifier")
#: Long-running services with a Prometheus endpoint.
SCRAPED = ("api", "relay", "worker", "notifier")
SECRET = "compose-test-secret-0123456789"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The stack as docker-compose resolves it (anchors merged, variables substituted)."""
    binary = shutil.which("docker-compose")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is missing (apt-get install docker-compose)")
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    done = subprocess.run(
        [binary, "--file", "docker-compose.yml", "config"],
        cwd=REPO_ROOT,
        env={**env, "SECRET_KEY": SECRET},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


@pytest.fixture(scope="module")
def prometheus() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((REPO_ROOT / "prometheus/prometheus.yml").read_text())
    return config


def test_without_a_secret_key_compose_refuses_to_start() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed")
    env = {k: v for k, v in os.environ.items() if k != "SECRET_KEY"}
    done = subprocess.run(
        [binary, "--file", "docker-compose.yml", "config"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0 and "SECRET_KEY" in done.stderr


def test_every_variable_of_our_services_is_a_setting(compose: dict[str, Any]) -> None:
    known = {name.upper() for name in Settings.model_fields}
    for name in APP_SERVICES:
        environment = compose["services"][name]["environment"]
        assert set(environment) <= known, (name, set(environment) - known)
        # And the values are valid settings
        Settings(**{key.lower(): value for key, value in environment.items()})


def test_prometheus_scrapes_the_metrics_port_of_every_service(
    compose: dict[str, Any], prometheus: dict[str, Any]
) -> None:
    services = compose["services"]
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    for name in SCRAPED:
        service = services[name]
        (discovery,) = jobs[f"orders-export-{name}"]["dns_sd_configs"]
        assert discovery["names"] == [name]
        environment = service["environment"]
        port = int(environment["METRICS_PORT"])
        assert environment["METRICS_HOST"] == "0.0.0.0"  # noqa: S104 - inside its container
        if name == "api":  # healthy when it serves requests; metrics are off its public port
            command = service["command"]
            http_port = int(command[command.index("--port") + 1])
            assert port != http_port
            assert all(str(port) not in str(entry) for entry in service["ports"])
        else:
            assert str(port) in shlex.join(service["healthcheck"]["test"])
        assert discovery["port"] == port, name
        # One empty multiprocess directory per container start
        assert environment["PROMETHEUS_MULTIPROC_DIR"] in service["tmpfs"]
    alertmanager = prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert alertmanager == ["alertmanager:9093"] and "alertmanager" in services


def test_the_metrics_ports_differ(compose: dict[str, Any]) -> None:
    ports = [compose["services"][name]["environment"]["METRICS_PORT"] for name in SCRAPED]
    assert len(set(ports)) == len(ports)


def test_the_production_example_is_hardened(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in APP_SERVICES:  # behind TLS: Secure session cookie and HSTS
        assert services[name]["environment"]["SESSION_COOKIE_SECURE"] == "true", name
    for name, service in services.items():  # every image pinned to a version
        if "image" in service:
            image = service["image"]
            assert ":" in image and not image.endswith((":latest", ":")), (name, image)
    api = services["api"]
    assert "--no-proxy-headers" in api["command"]  # X-Forwarded-For only via TRUSTED_PROXIES
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert '"--no-proxy-headers"' in dockerfile
    (base,) = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("FROM ")]
    assert base.count(".") >= 2, base  # the base image too: a patch version, not a series


def test_app_services_wait_for_their_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in SCRAPED:
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redpanda-init"]["condition"] == "service_completed_successfully"
        assert depends["minio-init"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"
        assert "healthcheck" in services[name]
    for name in ("postgres", "redis", "redpanda", "minio", "mailpit", "prometheus", "grafana"):
        assert "healthcheck" in services[name], name


def test_the_one_shot_services_create_our_topics_and_bucket_rule(compose: dict[str, Any]) -> None:
    services = compose["services"]
    topics_command = " ".join(services["redpanda-init"]["command"])
    for topic in (TOPIC_REQUESTED, TOPIC_LIFECYCLE, TOPIC_DEAD_LETTER):
        assert topic in topics_command
    bucket = urlsplit(services["api"]["environment"]["STORAGE_URL"]).path.strip("/")
    mc_script = " ".join(services["minio-init"]["command"])
    assert f"local/{bucket}" in mc_script
    assert f'"ID": "{LIFECYCLE_RULE_ID}"' in mc_script
    assert f'"Expiration": {{"Days": {DEFAULT_EXPIRE_DAYS}}}' in mc_script


def test_prometheus_alertmanager_and_grafana_get_the_repository_config(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]

    def mounts(name: str) -> dict[str, str]:
        found = {}
        for volume in services[name]["volumes"]:
            source, target = volume.split(":")[:2]
            found[target] = source
        return found

    assert mounts("prometheus")["/etc/prometheus"] == str(REPO_ROOT / "prometheus")
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert mounts("alertmanager")["/etc/alertmanager/alertmanager.yml"] == str(
        REPO_ROOT / "prometheus" / "alertmanager.yml"
    )
    grafana = mounts("grafana")
    assert grafana["/etc/grafana/provisioning"] == str(REPO_ROOT / "grafana" / "provisioning")
    provider = yaml.safe_load(
        (REPO_ROOT / "grafana/provisioning/dashboards/orders-export.yml").read_text()
    )["providers"][0]
    assert grafana[provider["options"]["path"]] == str(REPO_ROOT / "grafana" / "dashboards")
    datasource = yaml.safe_load(
        (REPO_ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
