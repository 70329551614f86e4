"""Avro schema compatibility, by the rules of Avro schema resolution.

``can_read(reader, writer)`` lists why data written with ``writer`` cannot be read with
``reader`` (empty: it can). Compatibility modes, as in Confluent Schema Registry, compare
a new version with the one before:

* BACKWARD: the new schema reads data written with the previous one (consumers first);
* FORWARD: the previous schema reads data written with the new one (producers first);
* FULL: both.

Every problem names the field path, e.g. ``GatewayEvent.latency_ms``.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.registry import SchemaEntry, scan

MODES = ("BACKWARD", "FORWARD", "FULL", "NONE")
PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
PROMOTIONS = {
    "int": {"int", "long", "float", "double"},
    "long": {"long", "float", "double"},
    "float": {"float", "double"},
    "double": {"double"},
    "string": {"string", "bytes"},
    "bytes": {"bytes", "string"},
}


def _full(name: str, namespace: str | None) -> str:
    return name if "." in name or not namespace else f"{namespace}.{name}"


class _Names:
    """Named types of one raw schema, by full name."""

    def __init__(self, schema):
        self.types: dict[str, dict] = {}
        self._collect(schema, None)

    def _collect(self, schema, namespace):
        if isinstance(schema, list):
            for branch in schema:
                self._collect(branch, namespace)
        elif isinstance(schema, dict):
            kind = schema.get("type")
            if kind in ("record", "error", "enum", "fixed"):
                name = _full(schema["name"], schema.get("namespace") or namespace)
                self.types[name] = {**schema, "name": name}
                namespace = name.rpartition(".")[0] or None
                for field in schema.get("fields", []):
                    self._collect(field["type"], namespace)
            elif kind == "array":
                self._collect(schema["items"], namespace)
            elif kind == "map":
                self._collect(schema["values"], namespace)
            elif isinstance(kind, (dict, list)):
                self._collect(kind, namespace)

    def resolve(self, schema, namespace=None):
        """Dict form of a schema with named references replaced by their definitions."""
        if isinstance(schema, str):
            if schema in PRIMITIVES:
                return {"type": schema}
            for candidate in (schema, _full(schema, namespace)):
                if candidate in self.types:
                    return self.types[candidate]
            raise KeyError(f"unknown type {schema}")
        if isinstance(schema, list):
            return schema
        kind = schema.get("type")
        if isinstance(kind, (dict, list)) or (isinstance(kind, str) and kind not in PRIMITIVES
                                             and kind not in ("record", "error", "enum", "fixed", "array", "map")):
            return self.resolve(kind, namespace)
        if kind in ("record", "error", "enum", "fixed"):
            return self.types.get(_full(schema["name"], schema.get("namespace") or namespace), schema)
        return schema


def _kind(schema) -> str:
    if isinstance(schema, list):
        return "union"
    kind = schema["type"]
    return "record" if kind == "error" else kind


def _describe(schema) -> str:
    if isinstance(schema, list):
        return "union [" + ", ".join(_describe(b) if isinstance(b, (dict, list)) else str(b) for b in schema) + "]"
    kind = _kind(schema)
    if kind in ("record", "enum", "fixed"):
        return f"{kind} {schema['name'].rsplit('.', 1)[-1]}"
    if kind == "array":
        items = schema["items"]
        return f"array of {items if isinstance(items, str) else _describe(items)}"
    if kind == "map":
        values = schema["values"]
        return f"map of {values if isinstance(values, str) else _describe(values)}"
    return kind


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def can_read(reader, writer) -> list[str]:
    """Why data written with ``writer`` cannot be read with ``reader`` (raw schemas)."""
    reader_names, writer_names = _Names(reader), _Names(writer)
    problems: list[str] = []
    _check(reader, writer, reader_names, writer_names, "", problems, set())
    return problems


def _check(reader, writer, rn: _Names, wn: _Names, path: str, problems: list[str], seen: set) -> None:
    r, w = rn.resolve(reader), wn.resolve(writer)
    where = path or "the schema"
    if isinstance(w, list):
        # Every branch the writer may have written must be readable.
        for branch in w:
            sub: list[str] = []
            _check(r, branch, rn, wn, path, sub, seen)
            problems.extend(p for p in sub if p not in problems)
        return
    if isinstance(r, list):
        for branch in r:
            sub = []
            _check(branch, w, rn, wn, path, sub, seen)
            if not sub:
                return
        problems.append(f"{where}: type changed from {_describe(w)} to {_describe(r)}, which has no branch "
                        f"that can read a {_describe(w)}")
        return
    rk, wk = _kind(r), _kind(w)
    if wk in PROMOTIONS or wk == "null" or rk in PROMOTIONS or rk == "null":
        if rk == wk or rk in PROMOTIONS.get(wk, ()):
            return
        problems.append(f"{where}: type changed from {_describe(w)} to {_describe(r)}")
        return
    if rk != wk:
        problems.append(f"{where}: type changed from {_describe(w)} to {_describe(r)}")
        return
    if rk in ("record", "enum", "fixed"):
        r_name, w_name = r["name"], w["name"]
        r_aliases = {_full(a, r_name.rpartition(".")[0] or None) for a in r.get("aliases", [])}
        if _short(r_name) != _short(w_name) and w_name not in r_aliases and _short(w_name) not in {
                _short(a) for a in r_aliases}:
            problems.append(f"{where}: {rk} renamed from {_short(w_name)} to {_short(r_name)} without an alias")
            return
    if rk == "record":
        key = (r["name"], w["name"], id(rn), id(wn))
        if key in seen:
            return
        seen = seen | {key}
        prefix = f"{path}." if path else f"{_short(r['name'])}."
        writer_fields = {f["name"]: f for f in w["fields"]}
        for field in r["fields"]:
            names = [field["name"], *field.get("aliases", [])]
            match = next((writer_fields[n] for n in names if n in writer_fields), None)
            field_path = prefix + field["name"]
            if match is None:
                if "default" not in field:
                    problems.append(f"{field_path}: the reading schema needs this field, the writing schema does not "
                                    "have it, and it has no default")
                continue
            _check(field["type"], match["type"], rn, wn, field_path, problems, seen)
    elif rk == "enum":
        missing = [s for s in w["symbols"] if s not in r["symbols"]]
        if missing and "default" not in r:
            problems.append(f"{where}: enum symbols {', '.join(missing)} can be written but not read "
                            "(the reading enum has no default)")
    elif rk == "fixed":
        if r["size"] != w["size"]:
            problems.append(f"{where}: fixed size changed from {w['size']} to {r['size']}")
    elif rk == "array":
        _check(r["items"], w["items"], rn, wn, f"{path}[]", problems, seen)
    elif rk == "map":
        _check(r["values"], w["values"], rn, wn, f"{path}{{}}", problems, seen)


def compatibility(new, old, mode: str = "FULL") -> list[str]:
    """Problems of ``new`` against ``old`` under a mode, each naming the field."""
    mode = mode.upper()
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    problems = []
    if mode in ("BACKWARD", "FULL"):
        problems += [f"BACKWARD: {p} (the new schema cannot read data written with the previous one)"
                     for p in can_read(new, old)]
    if mode in ("FORWARD", "FULL"):
        problems += [f"FORWARD: {p} (the previous schema cannot read data written with the new one)"
                     for p in can_read(old, new)]
    return problems


def lint(entry: SchemaEntry) -> list[str]:
    """Rules of this project beyond Avro validity."""
    problems = []
    raw = entry.raw
    if not isinstance(raw, dict) or raw.get("type") != "record":
        problems.append(f"{entry.path.name}: the top-level schema must be a record")
        return problems
    if not raw.get("doc"):
        problems.append(f"{entry.path.name}: the record has no doc")
    for field in raw.get("fields", []):
        if field["name"] in ("event_time",) and not (
                isinstance(field["type"], dict) and field["type"].get("logicalType") == "timestamp-millis"):
            problems.append(f"{entry.path.name}: {field['name']} must be a long with logicalType timestamp-millis")
    return problems


@dataclass
class CheckResult:
    checked: list[str]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def check_directory(directory, mode: str = "FULL") -> CheckResult:
    """Check every schema of a directory: ids, names, and each version against the previous one."""
    by_name, problems = scan(directory)
    checked = []
    for name, versions in sorted(by_name.items()):
        for entry in versions:
            problems += lint(entry)
        for old, new in zip(versions, versions[1:]):
            checked.append(f"{name} v{old.version} -> v{new.version}")
            problems += [f"{new.path.name}: {p}" for p in compatibility(new.raw, old.raw, mode)]
            if (old.raw.get("name"), old.raw.get("namespace")) != (new.raw.get("name"), new.raw.get("namespace")):
                old_full = _full(old.raw.get("name", "?"), old.raw.get("namespace"))
                new_full = _full(new.raw.get("name", "?"), new.raw.get("namespace"))
                if old_full != new_full and old_full not in new.raw.get("aliases", []):
                    problems.append(f"{new.path.name}: record full name changed from {old_full} to {new_full}; "
                                    "keep it (Confluent subjects and Avro resolution use it)")
        if len(versions) == 1:
            checked.append(f"{name} v1")
    return CheckResult(checked, problems)
