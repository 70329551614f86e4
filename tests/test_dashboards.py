"""Every panel of the usage dashboard runs against chdb holding aggregated events, with
Grafana's ClickHouse macros substituted the way the plugin expands them."""

import json
import random
import re
import time
import uuid
from pathlib import Path

import pytest

from ops.dev.loadgen import upgrade_to_v2
from sinks.clickhouse import ClickHouse, close_chdb, refresh_aggregates
from tests.test_aggregates import events

DASHBOARD = Path(__file__).resolve().parent.parent / "ops" / "grafana" / "gatewatch-usage.json"
PROVISIONING = DASHBOARD.parent / "provisioning" / "datasources" / "clickhouse.yml"


def expand(sql: str, database: str, from_s: int, to_s: int, interval_s: int = 3600) -> str:
    """The plugin's macros: $__timeFilter, $__dateFilter, $__timeInterval, $__fromTime, $__toTime."""
    sql = re.sub(r"\$__timeFilter\((\w+)\)",
                 lambda m: f"{m[1]} >= toDateTime({from_s}) AND {m[1]} <= toDateTime({to_s})", sql)
    sql = re.sub(r"\$__dateFilter\((\w+)\)",
                 lambda m: f"{m[1]} >= toDate(toDateTime({from_s})) AND {m[1]} <= toDate(toDateTime({to_s}))", sql)
    sql = re.sub(r"\$__timeInterval\((\w+)\)",
                 lambda m: f"toStartOfInterval(toDateTime({m[1]}), INTERVAL {interval_s} second)", sql)
    sql = sql.replace("$__fromTime", f"toDateTime({from_s})").replace("$__toTime", f"toDateTime({to_s})")
    assert "$__" not in sql, sql
    return sql.replace("gatewatch.", f"{database}.")


def panels() -> list[dict]:
    return json.loads(DASHBOARD.read_text())["panels"]


def test_the_dashboard_covers_the_usage_questions_on_the_clickhouse_plugin():
    titles = " ".join(p["title"].lower() for p in panels())
    for topic in ("org", "tokens by kind", "cost", "p50 / p95 / p99", "utilisation", "policy", "classification",
                  "experiment", "reasoning"):
        assert topic in titles, topic
    assert {p["datasource"]["type"] for p in panels()} == {"grafana-clickhouse-datasource"}
    assert "type: grafana-clickhouse-datasource" in PROVISIONING.read_text()
    assert all("events" not in t["rawSql"].replace("usage_", "") for p in panels() for t in p["targets"])


@pytest.fixture(scope="module")
def stored_events() -> list[dict]:
    """Three days of events, two in three of schema v2 (with reasoning tokens)."""
    rng = random.Random(11)
    return [{**event, **upgrade_to_v2(rng, event)} if n % 3 else event
            for n, event in enumerate(events(600, hours=72))]


@pytest.fixture(scope="module")
def aggregated(tmp_path_factory, stored_events):
    client = ClickHouse(f"chdb://{tmp_path_factory.mktemp('dash') / 'chdb'}", f"dash_{uuid.uuid4().hex[:8]}")
    client.migrate()
    client.insert_events(stored_events)
    refresh_aggregates(client)
    yield client
    close_chdb()


@pytest.mark.parametrize("panel", panels(), ids=lambda p: p["title"])
def test_every_panel_query_runs_on_the_aggregates(panel, aggregated):
    now = int(time.time())
    for target in panel["targets"]:
        got = aggregated.rows(expand(target["rawSql"], aggregated.database, now - 7 * 86400, now))
        assert got, panel["title"]
        numbers = [v for row in got for v in row if isinstance(v, (int, float))]
        assert numbers and all(v >= 0 for v in numbers), panel["title"]
    # Outside the time range a panel shows nothing: the macros really filter.
    for target in panel["targets"]:
        assert aggregated.rows(expand(target["rawSql"], aggregated.database, now - 90 * 86400, now - 80 * 86400)) == [], \
            panel["title"]


def test_the_reasoning_panel_sums_each_models_reasoning_tokens(aggregated, stored_events):
    want: dict[str, int] = {}
    for event in stored_events:
        want[event["model"]] = want.get(event["model"], 0) + event.get("reasoning_tokens", 0)
    panel, = [p for p in panels() if "reasoning" in p["title"].lower()]
    now = int(time.time())
    got: dict[str, int] = {}
    for _day, model, reasoning in aggregated.rows(expand(panel["targets"][0]["rawSql"], aggregated.database,
                                                         now - 7 * 86400, now)):
        got[model] = got.get(model, 0) + int(reasoning)
    assert got == want and sum(got.values()) > 0


def test_the_monthly_panel_holds_each_months_per_model_totals(aggregated, stored_events):
    from datetime import datetime, timezone

    want: dict[tuple, list] = {}
    for event in stored_events:
        month = datetime.fromtimestamp(event["event_time"] / 1000, tz=timezone.utc).date().replace(day=1)
        totals = want.setdefault((month, event["model"]), [0, 0])
        totals[0] += 1
        totals[1] += event["input_tokens"]
    panel, = [p for p in panels() if "per month" in p["title"].lower()]
    assert "usage_model_monthly" in panel["targets"][0]["rawSql"]
    now = int(time.time())
    got = {(month, model): [requests, input_tokens] for month, model, requests, _errors, input_tokens, *_rest
           in aggregated.rows(expand(panel["targets"][0]["rawSql"], aggregated.database, now - 7 * 86400, now))}
    assert got == want
