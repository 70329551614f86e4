"""docker-compose.yml cannot run here; check that it agrees with the settings instead."""

from pathlib import Path
from urllib.parse import urlparse

import yaml

from ops.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def gatewatch_env(service: str) -> dict[str, str]:
    env = COMPOSE["services"][service]["environment"]
    return {k: str(v) for k, v in env.items() if k.startswith("GATEWATCH_")}


def test_compose_settings_are_valid_settings():
    for service in ("migrate", "ingest"):
        load_settings(environ=gatewatch_env(service), use_service_state=False)


def test_every_server_the_settings_name_is_a_compose_service():
    settings = load_settings(environ=gatewatch_env("ingest"), use_service_state=False)
    hosts = {broker.split(":")[0] for broker in settings.kafka.brokers}
    hosts |= {urlparse(settings.clickhouse.url).hostname, urlparse(settings.redis.url).hostname,
              urlparse(settings.parquet.s3_endpoint_url).hostname}
    assert hosts <= set(COMPOSE["services"]), hosts - set(COMPOSE["services"])


def test_ingest_serves_metrics_where_prometheus_scrapes():
    settings = load_settings(environ=gatewatch_env("ingest"), use_service_state=False)
    scrape = yaml.safe_load((ROOT / "ops/prometheus/prometheus.yml").read_text())
    targets = [t for job in scrape["scrape_configs"] for cfg in job["static_configs"] for t in cfg["targets"]]
    assert f"ingest:{settings.metrics.port}" in targets
    assert settings.metrics.host == "0.0.0.0"  # reachable from the prometheus container
    for mount in COMPOSE["services"]["prometheus"]["volumes"] + COMPOSE["services"]["grafana"]["volumes"]:
        assert (ROOT / mount.split(":")[0]).exists(), mount
