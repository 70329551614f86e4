"""Schema registries: the .avsc files shipped in schemas/avro, or a Confluent Schema Registry.

Local registry: every schema is a file ``<name>.v<N>.avsc``; its id comes from ``ids.json``
in the same directory (checked in, append-only, so an id means the same schema forever).
``gatewatch schemas register`` gives new files an id; ``gatewatch schemas check`` fails
when one has none, or when a version breaks compatibility with the one before.

Both registries answer the same two questions the codecs ask:

* ``latest(name) -> (schema_id, parsed schema)``: what to write with (and read into);
* ``by_id(schema_id) -> parsed schema``: the writer schema of a Confluent wire-format
  message. Unknown ids raise ``KeyError``; a registry that cannot be reached raises
  ``RegistryUnavailable`` (never ``KeyError``: a message is not bad because the registry
  is down).

Parsed schemas are fastavro's (``fastavro.parse_schema``), each version parsed with its
own named-type table, with logical types as written in the file. The codecs strip logical
types themselves so that timestamps stay int epoch milliseconds.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro

SCHEMA_DIR = Path(__file__).resolve().parent / "avro"
IDS_FILE = "ids.json"
FILE_RE = re.compile(r"^(?P<name>[a-z][a-z0-9_]*)\.v(?P<version>[1-9][0-9]*)\.avsc$")


class RegistryError(ValueError):
    """A schema directory that is not usable: bad file name, bad JSON, bad schema, missing id."""


class RegistryUnavailable(RuntimeError):
    """The schema registry server could not answer (network, auth, 5xx)."""


def parse(raw: dict) -> dict:
    """fastavro-parse a schema with a fresh named-type table (versions share full names)."""
    return fastavro.parse_schema(copy.deepcopy(raw), named_schemas={})


def full_name(schema: Any) -> str | None:
    """Full name of a named (record/enum/fixed) schema, parsed or raw."""
    if not isinstance(schema, dict) or "name" not in schema:
        return None
    name = schema["name"]
    if "." in name or not schema.get("namespace"):
        return name
    return f"{schema['namespace']}.{name}"


@dataclass(frozen=True)
class SchemaEntry:
    name: str
    version: int
    schema_id: int | None
    path: Path
    raw: dict
    parsed: dict


def read_ids(directory: Path) -> dict[str, int]:
    path = directory / IDS_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path}: not valid JSON: {exc}") from None
    ids = {key: value for key, value in data.items() if not key.startswith("_")}
    bad = [key for key, value in ids.items() if not isinstance(value, int) or isinstance(value, bool) or value < 1]
    if bad:
        raise RegistryError(f"{path}: ids must be positive integers: {', '.join(bad)}")
    seen: dict[int, str] = {}
    for key, value in ids.items():
        if value in seen:
            raise RegistryError(f"{path}: id {value} is given to both {seen[value]} and {key}")
        seen[value] = key
    return ids


def write_ids(directory: Path, ids: dict[str, int]) -> None:
    path = directory / IDS_FILE
    doc = {}
    if path.exists():
        doc = {k: v for k, v in json.loads(path.read_text()).items() if k.startswith("_")}
    ordered = dict(sorted(ids.items(), key=lambda item: item[1]))
    path.write_text(json.dumps({**doc, **ordered}, indent=2) + "\n")


def scan(directory: str | Path, *, require_ids: bool = True) -> tuple[dict[str, list[SchemaEntry]], list[str]]:
    """All schema files of a directory by name (versions ascending) and the problems found.

    A file that cannot be loaded is reported and skipped; with ``require_ids`` a file
    without an id in ids.json is a problem too (it is still returned, with id None)."""
    directory = Path(directory)
    problems: list[str] = []
    try:
        ids = read_ids(directory)
    except RegistryError as exc:
        ids, problems = {}, [str(exc)]
    by_name: dict[str, list[SchemaEntry]] = {}
    if not directory.is_dir():
        return {}, [f"{directory}: not a directory"]
    for path in sorted(directory.glob("*.avsc")):
        match = FILE_RE.match(path.name)
        if not match:
            problems.append(f"{path.name}: schema files are named <name>.v<N>.avsc (lowercase name, N >= 1)")
            continue
        name, version = match["name"], int(match["version"])
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            problems.append(f"{path.name}: not valid JSON: {exc}")
            continue
        try:
            parsed = parse(raw)
        except Exception as exc:  # noqa: BLE001 - fastavro raises several kinds
            problems.append(f"{path.name}: not a valid Avro schema: {exc}")
            continue
        key = f"{name}.v{version}"
        schema_id = ids.get(key)
        if schema_id is None and require_ids:
            problems.append(f"{path.name}: has no id in {IDS_FILE} (run `gatewatch schemas register`)")
        by_name.setdefault(name, []).append(SchemaEntry(name, version, schema_id, path, raw, parsed))
    files = {f"{n}.v{e.version}" for n, entries in by_name.items() for e in entries}
    for key in sorted(set(ids) - files):
        problems.append(f"{IDS_FILE}: {key} (id {ids[key]}) has no schema file; ids are never removed, "
                        "restore the file")
    for name, entries in by_name.items():
        entries.sort(key=lambda e: e.version)
        versions = [e.version for e in entries]
        if versions != list(range(1, len(versions) + 1)):
            problems.append(f"{name}: versions must be 1..N without gaps, found {versions}")
    return by_name, problems


class LocalRegistry:
    """The schema files of one directory (default: the ones shipped in schemas/avro)."""

    def __init__(self, directory: str | Path = SCHEMA_DIR):
        self.directory = Path(directory)
        entries, problems = scan(self.directory)
        if problems:
            raise RegistryError(f"schema directory {self.directory}:\n  " + "\n  ".join(problems))
        self._by_name = entries
        self._by_id = {e.schema_id: e for versions in entries.values() for e in versions}

    def __repr__(self) -> str:
        return f"LocalRegistry({str(self.directory)!r})"

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def versions(self, name: str) -> list[SchemaEntry]:
        try:
            return list(self._by_name[name])
        except KeyError:
            raise KeyError(f"no schema named {name!r} in {self.directory}") from None

    def entry(self, name: str, version: int | None = None) -> SchemaEntry:
        versions = self.versions(name)
        if version is None:
            return versions[-1]
        for found in versions:
            if found.version == version:
                return found
        raise KeyError(f"no version {version} of schema {name!r} in {self.directory}")

    def latest(self, name: str) -> tuple[int, dict]:
        found = self.entry(name)
        return found.schema_id, found.parsed

    def by_id(self, schema_id: int) -> dict:
        return self._by_id[schema_id].parsed

    def entry_by_id(self, schema_id: int) -> SchemaEntry:
        return self._by_id[schema_id]

    def raw(self, name: str, version: int | None = None) -> dict:
        return self.entry(name, version).raw


def record_name_subject(name: str, raw: dict) -> str:
    """Confluent's RecordNameStrategy: the subject is the record's full name."""
    return full_name(raw) or name


class ConfluentRegistry:
    """The same questions answered by a Confluent Schema Registry.

    The reader side stays the shipped .avsc files (code is written against them); the
    registry supplies writer schemas by id, and the id under which the shipped latest
    schema is registered (looked up, or registered when ``auto_register``). Subjects
    follow RecordNameStrategy (``io.gatewatch.v1.GatewayEvent``) unless ``subject_for``
    says otherwise. DLQ, billing and alert records keep using the local ids (see
    schemas.records)."""

    def __init__(self, url: str | None = None, *, client=None, local: LocalRegistry | None = None,
                 auto_register: bool = True, subject_for=record_name_subject, conf: dict | None = None):
        from confluent_kafka.schema_registry import SchemaRegistryClient

        if client is None:
            config = {"url": url, **(conf or {})}
            factory = getattr(SchemaRegistryClient, "new_client", None)  # mock:// URLs -> mock client
            client = factory(config) if factory else SchemaRegistryClient(config)
        self.client = client
        self.url = url
        self.local = local or default_local_registry()
        self.auto_register = auto_register
        self.subject_for = subject_for
        self._latest: dict[str, tuple[int, dict]] = {}
        self._by_id: dict[int, dict] = {}
        self._unknown: dict[int, float] = {}
        self.unknown_ttl_s = 60.0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ConfluentRegistry({self.url!r})"

    def latest(self, name: str) -> tuple[int, dict]:
        with self._lock:
            if name in self._latest:
                return self._latest[name]
        from confluent_kafka.schema_registry import Schema
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        entry = self.local.entry(name)
        subject = self.subject_for(name, entry.raw)
        schema = Schema(json.dumps(entry.raw), "AVRO")
        try:
            if self.auto_register:
                schema_id = self.client.register_schema(subject, schema)
            else:
                schema_id = self.client.lookup_schema(subject, schema).schema_id
        except SchemaRegistryError as exc:
            if exc.http_status_code == 409:
                raise RegistryError(f"{subject}: the registry rejects {entry.path.name} as incompatible: "
                                    f"{exc.error_message}") from None
            if exc.http_status_code == 404:
                raise KeyError(f"{subject}: {entry.path.name} is not registered ({exc.error_message})") from None
            raise RegistryUnavailable(f"schema registry {self.url}: {exc}") from exc
        except Exception as exc:
            raise RegistryUnavailable(f"schema registry {self.url}: {exc!r}") from exc
        with self._lock:
            self._latest[name] = (schema_id, entry.parsed)
            self._by_id.setdefault(schema_id, entry.parsed)
        return schema_id, entry.parsed

    def by_id(self, schema_id: int) -> dict:
        with self._lock:
            if schema_id in self._by_id:
                return self._by_id[schema_id]
            if self._unknown.get(schema_id, 0) > time.monotonic():
                raise KeyError(schema_id)
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            schema = self.client.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                # Garbage with random ids must not cost a registry round trip each.
                with self._lock:
                    if len(self._unknown) > 10_000:
                        self._unknown.clear()
                    self._unknown[schema_id] = time.monotonic() + self.unknown_ttl_s
                raise KeyError(schema_id) from None
            raise RegistryUnavailable(f"schema registry {self.url}: {exc}") from exc
        except Exception as exc:
            raise RegistryUnavailable(f"schema registry {self.url}: {exc!r}") from exc
        if (schema.schema_type or "AVRO") != "AVRO":
            raise KeyError(schema_id)
        parsed = parse(json.loads(schema.schema_str))
        with self._lock:
            self._by_id[schema_id] = parsed
        return parsed


@functools.cache
def default_local_registry() -> LocalRegistry:
    """The shipped schemas, loaded once per process."""
    return LocalRegistry(SCHEMA_DIR)


def registry_from_settings(schema_settings=None) -> LocalRegistry | ConfluentRegistry:
    """A Confluent registry when ``schema_settings.registry_url`` is set, else the shipped files."""
    url = getattr(schema_settings, "registry_url", None)
    if url:
        return ConfluentRegistry(url)
    return default_local_registry()
