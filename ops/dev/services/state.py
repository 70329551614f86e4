"""The dev CLI's state file (``services.json``): the servers ``up`` started, and the
setting defaults (``load_addresses``) that ``ops.settings`` reads from it.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from ops.dev.services.supervision import Service

STATE_FILE = "services.json"


def state_dir_default() -> Path:
    """``$GATEWATCH_STATE_DIR`` or ``~/.gatewatch``."""
    return Path(os.environ.get("GATEWATCH_STATE_DIR") or Path.home() / ".gatewatch").expanduser()


def _state_path(state_dir: str | os.PathLike | None) -> Path:
    return Path(state_dir or state_dir_default()).expanduser() / STATE_FILE


def load_state(state_dir: str | os.PathLike | None = None) -> dict[str, Service]:
    """The services recorded by ``up`` (alive or not); {} without a readable state file."""
    path = _state_path(state_dir)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    services: dict[str, Service] = {}
    for name, entry in (data.get("services", {}) if isinstance(data, dict) else {}).items():
        with contextlib.suppress(TypeError, KeyError, AttributeError):
            services[name] = Service.from_json({"name": name, **entry})
    return services


def _save_state(state_dir: str | os.PathLike | None, services: dict[str, Service]) -> None:
    path = _state_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"version": 1, "services": {
        name: {k: v for k, v in service.to_json().items() if k != "name"}
        for name, service in services.items()}}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def load_addresses(state_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Setting defaults from the services ``up`` recorded and that still run:
    ``kafka_bootstrap``, ``redis_url``, ``s3_endpoint_url``, ``clickhouse_url``, ``postgres_url``."""
    keys = {"kafka": "kafka_bootstrap", "redis": "redis_url", "s3": "s3_endpoint_url",
            "clickhouse": "clickhouse_url", "postgres": "postgres_url"}
    return {keys[name]: service.address for name, service in load_state(state_dir).items()
            if name in keys and service.alive()}
