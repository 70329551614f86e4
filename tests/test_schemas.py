"""Shipped schemas, the local registry, the compatibility checker and `gatewatch schemas`."""

from __future__ import annotations

import copy
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import fastavro
import pytest
from click.testing import CliRunner

from ops.cli import cli
from schemas.compat import can_read, check_directory, compatibility
from schemas.registry import SCHEMA_DIR, LocalRegistry, RegistryError, registry_from_settings

FIXTURES = Path(__file__).parent / "fixtures" / "schemas"
ROOT = Path(__file__).resolve().parent.parent
GATEWAY_V1 = json.loads((SCHEMA_DIR / "gateway_event.v1.avsc").read_text())
# Ids are forever: a renumbering would make every message already in Kafka undecodable.
PINNED_IDS = {"gateway_event": 1, "dlq_record": 2, "quota_update": 3, "billing_event": 4,
              "feedback_event": 5, "quota_alert": 6}


def test_shipped_schemas_have_their_pinned_ids():
    registry = LocalRegistry()
    assert set(registry.names()) >= set(PINNED_IDS)
    for name, schema_id in PINNED_IDS.items():
        entry = registry.entry(name, 1)
        assert entry.schema_id == schema_id
        assert registry.by_id(schema_id) is entry.parsed
    latest_id, parsed = registry.latest("gateway_event")
    assert parsed["name"] == "io.gatewatch.v1.GatewayEvent" and latest_id == registry.entry("gateway_event").schema_id


def test_unknown_ids_and_names_raise_key_error():
    registry = LocalRegistry()
    with pytest.raises(KeyError):
        registry.by_id(32767)
    with pytest.raises(KeyError):
        registry.latest("no_such_schema")


def test_registry_from_settings_without_url_is_the_shipped_files():
    from ops.settings import SchemaSettings

    registry = registry_from_settings(SchemaSettings())
    assert isinstance(registry, LocalRegistry) and registry.directory == SCHEMA_DIR
    assert registry_from_settings(SchemaSettings()) is registry  # loaded once per process


def test_gateway_event_carries_the_issue_fields_and_token_semantics():
    fields = {f["name"]: f for f in GATEWAY_V1["fields"]}
    for name in ("event_id", "request_id", "user_id", "org_id", "event_time", "model", "model_version",
                 "schema_version", "latency_ms", "input_tokens", "output_tokens", "cache_read_tokens",
                 "cache_write_tokens", "prompt", "response", "policy_flags", "region", "provider", "endpoint",
                 "status_code", "error_code", "streaming", "time_to_first_token_ms", "experiment_id", "variant",
                 "conversation_id", "safety_decisions"):
        assert name in fields, name
    assert fields["event_time"]["type"] == {"type": "long", "logicalType": "timestamp-millis"}
    doc = GATEWAY_V1["doc"]
    assert "UNCACHED" in doc and "input_tokens + output_tokens + cache_read_tokens + cache_write_tokens" in doc
    assert "UNCACHED" in fields["input_tokens"]["doc"]
    for kind in ("cache_read_tokens", "cache_write_tokens"):
        assert fields[kind]["default"] == 0 and "Not part of input_tokens" in fields[kind]["doc"]


def test_pipeline_record_schemas_have_the_fields_the_flow_writes():
    registry = LocalRegistry()
    names = {name: {f["name"] for f in registry.raw(name)["fields"]} for name in PINNED_IDS}
    assert {"stage", "code", "reason", "original", "payload_redacted", "text_withheld", "topic", "partition",
            "offset", "schema_id", "first_seen_ms", "attempts", "event_id", "request_id"} <= names["dlq_record"]
    assert {"request_id", "rating", "comment"} <= names["feedback_event"]
    feedback = {f["name"]: f for f in registry.raw("feedback_event")["fields"]}
    assert feedback["rating"]["type"]["symbols"] == ["THUMBS_UP", "THUMBS_DOWN"]
    assert feedback["comment"]["default"] is None
    assert {"alert_id", "subject", "tier", "metric", "period", "threshold", "limit", "usage"} <= names["quota_alert"]
    assert {"billing_id", "version", "cost_usd", "price_version", "cache_read_tokens",
            "cache_write_tokens"} <= names["billing_event"]


# -- the compatibility checker ------------------------------------------------------------

def _mutated(change) -> dict:
    schema = copy.deepcopy(GATEWAY_V1)
    change(schema)
    return schema


def _field(schema: dict, name: str) -> dict:
    return next(f for f in schema["fields"] if f["name"] == name)


def _add(field: dict):
    return lambda s: s["fields"].append(field)


def _drop(name: str):
    return lambda s: s["fields"].remove(_field(s, name))


def _retype(name: str, new_type):
    return lambda s: _field(s, name).update(type=new_type)


# (description, change to v1 giving v2, problems expected in BACKWARD, in FORWARD)
CHANGES = [
    ("optional field added", _add({"name": "tenant", "type": ["null", "string"], "default": None}), [], []),
    ("required field added", _add({"name": "tenant", "type": "string"}), ["GatewayEvent.tenant"], []),
    ("field with default removed", _drop("provider"), [], []),
    ("required field removed", _drop("request_id"), [], ["GatewayEvent.request_id"]),
    ("int widened to long", _retype("latency_ms", "long"), [], ["GatewayEvent.latency_ms"]),
    ("long narrowed to int", _retype("input_tokens", "int"), ["GatewayEvent.input_tokens"], []),
    ("string to int", _retype("model", "int"), ["GatewayEvent.model"], ["GatewayEvent.model"]),
    ("nullable made required", lambda s: _field(s, "model_version").update(type="string", default=""),
     ["GatewayEvent.model_version"], []),
    ("required made nullable", _retype("model", ["null", "string"]), [], ["GatewayEvent.model"]),
    ("array items changed", _retype("policy_flags", {"type": "array", "items": "int"}),
     ["GatewayEvent.policy_flags[]"], ["GatewayEvent.policy_flags[]"]),
    ("record renamed", lambda s: s.update(name="LlmEvent"), ["renamed"], ["renamed"]),
    ("renamed with alias", lambda s: s.update(name="LlmEvent", aliases=["io.gatewatch.v1.GatewayEvent"]), [], ["renamed"]),
]


@pytest.mark.parametrize("description,change,backward,forward", CHANGES, ids=[c[0] for c in CHANGES])
def test_compatibility_names_the_offending_field(description, change, backward, forward):
    new = _mutated(change)
    found_backward = compatibility(new, GATEWAY_V1, "BACKWARD")
    found_forward = compatibility(new, GATEWAY_V1, "FORWARD")
    assert len(found_backward) == len(backward), found_backward
    assert len(found_forward) == len(forward), found_forward
    for expected, found in zip(backward + forward, found_backward + found_forward):
        assert expected in found
    assert len(compatibility(new, GATEWAY_V1, "FULL")) == len(backward) + len(forward)


def test_enum_evolution():
    old = {"type": "record", "name": "R", "fields": [
        {"name": "rating", "type": {"type": "enum", "name": "Rating", "symbols": ["UP", "DOWN"]}}]}
    more = copy.deepcopy(old)
    more["fields"][0]["type"]["symbols"].append("MEH")
    assert compatibility(more, old, "BACKWARD") == []
    [problem] = compatibility(more, old, "FORWARD")
    assert "MEH" in problem and "R.rating" in problem
    more["fields"][0]["type"]["default"] = "UP"
    old["fields"][0]["type"]["default"] = "UP"
    assert compatibility(more, old, "FULL") == []


def _sample(schema):
    """A value of the type; unions take their first branch (null where there is one),
    which is the branch that breaks a reader that is no longer nullable."""
    if isinstance(schema, list):
        return _sample(schema[0])
    if isinstance(schema, dict):
        if schema["type"] == "array":
            return [_sample(schema["items"])]
        return _sample(schema["type"])
    return {"null": None, "string": "s", "int": 1, "long": 1, "boolean": True, "double": 1.0}[schema]


@pytest.mark.parametrize("description,change,backward,forward", CHANGES, ids=[c[0] for c in CHANGES])
def test_checker_agrees_with_fastavro_resolution(description, change, backward, forward):
    """What the checker calls compatible, fastavro can actually read, and vice versa."""
    new = _mutated(change)
    for reader, writer in ((new, GATEWAY_V1), (GATEWAY_V1, new)):
        writer_parsed = fastavro.parse_schema(copy.deepcopy(writer), named_schemas={})
        reader_parsed = fastavro.parse_schema(copy.deepcopy(reader), named_schemas={})
        record = {f["name"]: _sample(f["type"]) for f in writer["fields"]}
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, writer_parsed, record)
        try:
            fastavro.schemaless_reader(io.BytesIO(buffer.getvalue()), writer_parsed, reader_parsed)
            readable = True
        except Exception:  # noqa: BLE001 - SchemaResolutionError and friends
            readable = False
        assert readable == (can_read(reader, writer) == []), (reader is new, can_read(reader, writer))


def test_shipped_directory_passes_the_check():
    result = check_directory(SCHEMA_DIR)
    assert result.ok, result.problems
    assert any("gateway_event" in line for line in result.checked)


def test_a_directory_with_a_bad_file_is_refused_by_the_registry(tmp_path):
    shutil.copytree(FIXTURES / "compatible", tmp_path / "s")
    (tmp_path / "s" / "gateway_event.v3.avsc").write_text("{not json")
    with pytest.raises(RegistryError, match="gateway_event.v3.avsc: not valid JSON"):
        LocalRegistry(tmp_path / "s")


# -- the CLI --------------------------------------------------------------------------------

def _check(*args: str):
    return CliRunner().invoke(cli, ["schemas", "check", *args])


def test_cli_check_passes_on_the_shipped_schemas():
    result = _check()
    assert result.exit_code == 0, result.output
    assert "FULL compatible" in result.output


def test_cli_check_passes_on_a_compatible_new_version():
    result = _check("--dir", str(FIXTURES / "compatible"))
    assert result.exit_code == 0, result.output
    assert "gateway_event v1 -> v2" in result.output


def test_cli_check_fails_naming_the_field():
    result = _check("--dir", str(FIXTURES / "incompatible"))
    assert result.exit_code == 1
    assert "gateway_event.v2.avsc: BACKWARD: GatewayEvent.tenant_id" in result.output


def test_cli_check_modes():
    forward_only = str(FIXTURES / "incompatible_forward")
    full = _check("--dir", forward_only)
    assert full.exit_code == 1
    assert "FORWARD: GatewayEvent.request_id" in full.output and "FORWARD: GatewayEvent.latency_ms" in full.output
    assert _check("--dir", forward_only, "--mode", "backward").exit_code == 0
    assert _check("--dir", forward_only, "--mode", "forward").exit_code == 1


def test_cli_check_fails_on_a_file_without_id_and_register_fixes_it(tmp_path):
    directory = tmp_path / "schemas"
    shutil.copytree(FIXTURES / "missing_id", directory)
    result = _check("--dir", str(directory))
    assert result.exit_code == 1 and "gateway_event.v2.avsc: has no id" in result.output
    registered = CliRunner().invoke(cli, ["schemas", "register", "--dir", str(directory)])
    assert registered.exit_code == 0, registered.output
    assert json.loads((directory / "ids.json").read_text())["gateway_event.v2"] == 2
    assert _check("--dir", str(directory)).exit_code == 0
    assert LocalRegistry(directory).latest("gateway_event")[0] == 2


def test_cli_list_and_show():
    listed = CliRunner().invoke(cli, ["schemas", "list"])
    assert listed.exit_code == 0 and "   1  gateway_event v1" in listed.output
    shown = CliRunner().invoke(cli, ["schemas", "show", "feedback_event"])
    assert json.loads(shown.output)["name"] == "FeedbackEvent"


def test_gatewatch_schemas_check_exit_status_in_a_real_process():
    """What a CI step sees: the process exit status."""
    command = [sys.executable, "-c", "from ops.cli import main; main()", "schemas", "check", "--dir"]
    ok = subprocess.run(command + [str(SCHEMA_DIR)], check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
    bad = subprocess.run(command + [str(FIXTURES / "incompatible")], check=False, cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert bad.returncode == 1 and "tenant_id" in bad.stderr
