"""The ingestion API's wiring: compose service, Prometheus target, settings."""

from __future__ import annotations

import yaml

from ops.settings import load_settings
from tests.test_compose import COMPOSE, ROOT, gatewatch_env


def test_compose_serve_uses_valid_settings_and_prometheus_scrapes_it():
    settings = load_settings(environ=gatewatch_env("serve"), use_service_state=False)
    assert (settings.api.host, settings.api.port) == ("0.0.0.0", 4318)
    assert f"{settings.api.port}:{settings.api.port}" in COMPOSE["services"]["serve"]["ports"]
    scrape = yaml.safe_load((ROOT / "ops/prometheus/prometheus.yml").read_text())
    targets = [t for job in scrape["scrape_configs"] for cfg in job["static_configs"] for t in cfg["targets"]]
    assert f"serve:{settings.api.port}" in targets


def test_api_settings_reject_bad_values():
    import pytest

    from ops.settings import SettingsError

    with pytest.raises(SettingsError, match="api.max_pending"):
        load_settings(environ={"GATEWATCH_API__MAX_PENDING": "0"}, use_service_state=False)
