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


def test_each_worker_takes_its_own_spool_slot_and_a_restart_reuses_it(tmp_path):
    from ops.api import open_producer

    settings = load_settings(environ={"GATEWATCH_KAFKA__BOOTSTRAP": "127.0.0.1:1",
                                      "GATEWATCH_API__SPOOL_DIR": str(tmp_path / "spool")}, use_service_state=False)
    first, second = open_producer(settings), open_producer(settings)
    try:
        assert (first.spool.directory.name, second.spool.directory.name) == ("w0", "w1")
    finally:
        second.close(0)
    third = open_producer(settings)
    try:
        assert third.spool.directory.name == "w1"
    finally:
        first.close(0)
        third.close(0)


def test_serve_producers_are_durable_unless_opted_out(tmp_path):
    from ops.api import open_producer

    env = {"GATEWATCH_KAFKA__BOOTSTRAP": "127.0.0.1:1", "GATEWATCH_API__SPOOL_DIR": str(tmp_path / "spool")}
    default = open_producer(load_settings(environ=env, use_service_state=False))
    try:
        assert default.durable
    finally:
        default.close(0)
    opted_out = open_producer(load_settings(environ={**env, "GATEWATCH_API__DURABLE": "false"},
                                            use_service_state=False))
    try:
        assert not opted_out.durable
    finally:
        opted_out.close(0)
