"""A generated Avro binary reader for the flow's hot path (the reading twin of
``schemas.avro_encoder``).

fastavro's ``schemaless_reader`` dispatches on the schema for every field of every message;
on loadgen events it was most of ``EventCodec.decode``. ``compile_reader`` turns one
(writer, reader) pair of parsed, logical-type-free schemas into Python source with one
straight block per writer field: fields the reader lacks are skipped, reader fields the
writer lacks get their defaults, the rest are read in writer order (fastavro's order).

The generated reader is strict and only ever the fast path: it covers records whose fields
are ``null``/``boolean``/``int``/``long``/``float``/``double``/``string``/``bytes``, enums,
``["null", X]`` unions and arrays of those, with the same type in writer and reader; any
other schema pair raises ``Unsupported`` (the caller keeps fastavro). Anything unusual in
the bytes (a varint longer than 10 bytes, a boolean byte other than 0/1, an int outside
32 bits, bad UTF-8, a union branch or enum index out of range, a short body) raises, and
the caller decodes the same bytes with fastavro, so that errors (and whatever fastavro
tolerates) stay exactly what they were (tests/test_avro_reader.py compares both on
mutated messages).

Where schemas/_avro_native.c is built, ``compile_reader`` returns its C reader, which runs a
step program of the same pair (``native_reader_program``) instead of the generated source
(18 us -> about 3 us per loadgen event) and hands whatever it does not read as it is to the
generated reader, so records and exceptions stay the generated reader's own
(tests/test_avro_reader_native.py); ``compile_python_reader`` is the generated reader.
"""

from __future__ import annotations

import copy
import struct
from collections.abc import Callable
from typing import Any

try:
    from schemas import _avro_native
except ImportError:  # not built (no C compiler): the generated Python reader alone
    _avro_native = None
if not hasattr(_avro_native, "Reader"):  # built before it had the reader
    _avro_native = None

__all__ = ["CHECK_HEX_ID", "CHECK_IDENTIFIER", "CHECK_TEXT", "CHECK_TEXT_LIST", "Unsupported", "compile_python_reader",
           "compile_reader", "native_reader_program"]

CHECK_IDENTIFIER, CHECK_TEXT, CHECK_TEXT_LIST, CHECK_HEX_ID = 1, 2, 3, 4
"""What the C reader's ``read_checked`` tests a field's value for, as ``(kind, limit, item
limit)``: IDENTIFIER null, empty, or printable ASCII without spaces of at most ``limit``
characters; TEXT null or ASCII of at most ``limit``; TEXT_LIST a list of at most ``limit``
ASCII strings of at most ``item limit`` each; HEX_ID null or exactly ``limit`` lower-case hex
digits, not all zero. It tests while the bytes are at hand, so that a codec skips its own
string rules for the records that pass (schemas.codec.EventCodec)."""

_SIMPLE = ("null", "boolean", "int", "long", "float", "double", "string", "bytes")
_DOUBLE = struct.Struct("<d").unpack_from
_FLOAT = struct.Struct("<f").unpack_from
_INT_RANGE = (-(2**31), 2**31 - 1)
_ZIGZAG = tuple((byte >> 1) ^ -(byte & 1) for byte in range(0x80))


class Unsupported(ValueError):
    """The schema pair uses an Avro feature (or a resolution) this reader does not generate."""


class _Corrupt(Exception):
    """The bytes are not what the fast path reads; the caller asks fastavro."""


def _varint_tail(data: bytes, pos: int, first: int) -> tuple[int, int]:
    """The rest of a zig-zag varint whose first byte ``first`` had its high bit set:
    (decoded long, position after it). At most 10 bytes, as a 64-bit long needs."""
    value = first & 0x7F
    shift = 7
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift > 63:
            raise _Corrupt("varint longer than 10 bytes")
    if value >> 64:
        raise _Corrupt("varint above 64 bits")
    return (value >> 1) ^ -(value & 1), pos


def _type_key(schema: Any) -> Any:
    """A schema reduced to what the binary encoding depends on (docs and defaults dropped)."""
    if isinstance(schema, list):
        return tuple(_type_key(branch) for branch in schema)
    if isinstance(schema, dict):
        kind = schema["type"]
        if kind == "array":
            return ("array", _type_key(schema["items"]))
        if kind == "enum":
            return ("enum", schema["name"], tuple(schema["symbols"]))
        if kind in _SIMPLE:
            return kind
        raise Unsupported(f"{kind} fields")
    if schema in _SIMPLE:
        return schema
    raise Unsupported(f"named type {schema}")


class _Source:
    """Python source of one reader, built line by line."""

    def __init__(self):
        self.lines: list[str] = []
        self.namespace: dict[str, Any] = {"_varint_tail": _varint_tail, "_Corrupt": _Corrupt, "_DOUBLE": _DOUBLE,
                                          "_FLOAT": _FLOAT, "_ZIGZAG": _ZIGZAG}
        self.temp = 0

    def fresh(self, stem: str) -> str:
        self.temp += 1
        return f"{stem}{self.temp}"

    def emit(self, indent: int, *lines: str) -> None:
        self.lines.extend("    " * indent + line for line in lines)

    def long(self, indent: int, target: str) -> None:
        """One- and two-byte varints (small numbers, string lengths below 8 KiB) inline,
        longer ones (timestamps) through _varint_tail."""
        self.emit(indent, "b = data[pos]",
                  "if b < 0x80:", f"    {target} = _ZIGZAG[b]", "    pos += 1",
                  "else:", "    c = data[pos + 1]",
                  "    if c < 0x80:", "        c = (b & 0x7F) | (c << 7)",
                  f"        {target} = (c >> 1) ^ -(c & 1)", "        pos += 2",
                  "    else:", f"        {target}, pos = _varint_tail(data, pos + 1, b)")

    def value(self, indent: int, key: Any, target: str) -> None:
        """Lines that read one value of type ``key`` into ``target``."""
        if key == "null":
            self.emit(indent, f"{target} = None")
        elif key == "boolean":
            self.emit(indent, "b = data[pos]", "pos += 1", "if b > 1:", "    raise _Corrupt('boolean')",
                      f"{target} = b == 1")
        elif key in ("int", "long"):
            self.long(indent, target)
            if key == "int":
                self.emit(indent, f"if not {_INT_RANGE[0]} <= {target} <= {_INT_RANGE[1]}:",
                          "    raise _Corrupt('int')")
        elif key in ("float", "double"):
            size, unpack = (8, "_DOUBLE") if key == "double" else (4, "_FLOAT")
            self.emit(indent, f"if pos + {size} > size:", "    raise _Corrupt('short')",
                      f"{target} = {unpack}(data, pos)[0]", f"pos += {size}")
        elif key in ("string", "bytes"):
            self.long(indent, "n")
            decode = ".decode()" if key == "string" else ""
            self.emit(indent, "end = pos + n", "if n < 0 or end > size:", "    raise _Corrupt('short')",
                      f"{target} = data[pos:end]{decode}", "pos = end")
        elif isinstance(key, tuple) and key[0] == "enum":
            symbols = self.fresh("symbols")
            self.namespace[symbols] = key[2]
            self.long(indent, "n")
            self.emit(indent, f"if not 0 <= n < {len(key[2])}:", "    raise _Corrupt('enum')",
                      f"{target} = {symbols}[n]")
        elif isinstance(key, tuple) and key[0] == "array":
            self.array(indent, key[1], target)
        elif isinstance(key, tuple) and all(isinstance(branch, str) for branch in key):
            self.union(indent, key, target)
        else:
            raise Unsupported(f"type {key!r}")

    def union(self, indent: int, branches: tuple, target: str) -> None:
        index = self.fresh("branch")
        self.long(indent, index)
        for number, branch in enumerate(branches):
            self.emit(indent, f"{'if' if number == 0 else 'elif'} {index} == {number}:")
            self.value(indent + 1, branch, target)
        self.emit(indent, "else:", "    raise _Corrupt('union')")

    def array(self, indent: int, items: Any, target: str) -> None:
        count, item = self.fresh("count"), self.fresh("item")
        self.emit(indent, f"{target} = []")
        self.long(indent, count)
        self.emit(indent, f"while {count}:")
        self.emit(indent + 1, f"if {count} < 0:", f"    {count} = -{count}")
        self.long(indent + 2, "n")  # the block's size in bytes, which a reader may ignore
        self.emit(indent + 1, f"for _ in range({count}):")
        self.value(indent + 2, items, item)
        self.emit(indent + 2, f"{target}.append({item})")
        self.long(indent + 1, count)


def _resolution(writer: dict, reader: dict | None) -> tuple[list[tuple[str | None, Any]], list[tuple[str, Any]]]:
    """What reading ``writer``'s bodies as ``reader`` takes: the writer's fields in order as
    (name the record keeps it under or None where the reader drops it, type key), then the
    reader's fields the writer lacks as (name, default). Raises Unsupported for the rest."""
    reader = writer if reader is None else reader
    if writer.get("type") != "record" or reader.get("type") != "record":
        raise Unsupported("not a record")
    wanted = {field["name"]: field for field in reader["fields"]}
    if any(field.get("aliases") for field in reader["fields"]):
        raise Unsupported("reader field aliases")
    fields: list[tuple[str | None, Any]] = []
    for field in writer["fields"]:
        name = field["name"]
        key = _type_key(field["type"])
        if name in wanted and _type_key(wanted[name]["type"]) != key:
            raise Unsupported(f"field {name} changes type (fastavro resolves it)")
        fields.append((name if name in wanted else None, key))
    written = {name for name, _key in fields if name is not None}
    defaults: list[tuple[str, Any]] = []
    for name, field in wanted.items():
        if name in written:
            continue
        if "default" not in field:
            raise Unsupported(f"reader field {name} has no default")
        if "bytes" in repr(_type_key(field["type"])):
            raise Unsupported(f"reader field {name} defaults a bytes value (fastavro converts it)")
        defaults.append((name, field["default"]))
    return fields, defaults


def compile_python_reader(writer: dict, reader: dict | None = None) -> Callable[[bytes], tuple[dict, int]]:
    """A function ``read(data, start) -> (record, end)`` reading the body that starts at
    ``start`` of ``data`` (no copy of a header's tail) for plain (logical-type-free) parsed
    record schemas: ``writer`` wrote the body, ``reader`` (None: the writer) is what the
    record must look like. Raises Unsupported for what it does not cover; the function
    raises (any exception) for bytes the fast path does not read."""
    fields, defaults = _resolution(writer, reader)
    source = _Source()
    source.emit(0, "def read(data, pos=0):", "    size = len(data)")
    written: dict[str, str] = {}
    """Field name -> the local variable its value is read into (the record is built at the
    end, in writer order then the reader's defaults: fastavro's order)."""
    for name, key in fields:
        target = "_"
        if name is not None:
            target = written[name] = source.fresh("field")
        source.value(1, key, target)
    for name, default in defaults:
        if isinstance(default, (list, dict)):
            holder = source.fresh("default")
            source.namespace[holder] = default
            source.namespace["_deepcopy"] = copy.deepcopy
            written[name] = f"_deepcopy({holder})"
        else:
            written[name] = repr(default)
    source.emit(1, "return {" + ", ".join(f"{name!r}: {value}" for name, value in written.items()) + "}, pos")
    text = "\n".join(source.lines) + "\n"
    exec(compile(text, f"<avro reader {writer.get('name', '')}>", "exec"), source.namespace)  # noqa: S102
    return source.namespace["read"]


# opcodes of the reader in schemas/_avro_native.c
(_READ_NULL, _READ_BOOLEAN, _READ_INT, _READ_LONG, _READ_FLOAT, _READ_DOUBLE, _READ_STRING, _READ_BYTES,
 _READ_ENUM, _READ_UNION, _READ_ARRAY) = range(11)
_SIMPLE_OPS = dict(zip(_SIMPLE, (_READ_NULL, _READ_BOOLEAN, _READ_INT, _READ_LONG, _READ_FLOAT, _READ_DOUBLE,
                                 _READ_STRING, _READ_BYTES)))


def _native_step(key: Any) -> tuple:
    if isinstance(key, str):
        return (_SIMPLE_OPS[key],)
    if key[0] == "enum":
        return (_READ_ENUM, key[2])
    if key[0] == "array":
        return (_READ_ARRAY, _native_step(key[1]))
    if all(isinstance(branch, str) for branch in key):
        return (_READ_UNION, tuple(_native_step(branch) for branch in key))
    raise Unsupported(f"type {key!r}")


def native_reader_program(writer: dict, reader: dict | None = None) -> tuple[tuple, tuple]:
    """The (fields, defaults) the C reader runs for the pair: fields as (name or None where
    the reader drops it, step), a step ``(opcode,)`` or ``(opcode, operand)`` (an enum's
    symbols, an array's item step, a union's branch steps); defaults as (name, value,
    whether each record gets its own deep copy). Raises Unsupported as compile_python_reader does."""
    fields, defaults = _resolution(writer, reader)
    return (tuple((name, _native_step(key)) for name, key in fields),
            tuple((name, default, isinstance(default, (list, dict))) for name, default in defaults))


def compile_reader(writer: dict, reader: dict | None = None, checks: dict[str, tuple[int, int, int]] | None = None
                   ) -> Callable[[bytes], tuple[dict, int]]:
    """``read(data, start=0) -> (record, end)`` for the pair, as compile_python_reader's: the
    C reader where schemas/_avro_native.c is built (it hands the bytes it does not read as
    they are to the Python reader, which returns or raises what it always did), else the
    generated Python reader alone. Raises Unsupported for what neither covers.

    The C reader also has ``read_checked(data, start=0) -> (record, end, passed)``: passed
    is true when every written field named in ``checks`` ({field: (CHECK_..., limit, item
    limit)}) passed its check, false where one did not or the Python reader read the record.
    Fields the writer lacks (defaults) are not checked."""
    python_reader = compile_python_reader(writer, reader)
    if _avro_native is None:
        return python_reader
    fields, defaults = native_reader_program(writer, reader)
    if not hasattr(_avro_native.Reader, "read_checked"):  # built before it had the checks
        return _avro_native.Reader(fields, defaults, python_reader, copy.deepcopy)
    field_checks = tuple((checks or {}).get(name) if name is not None else None for name, _step in fields)
    return _avro_native.Reader(fields, defaults, python_reader, copy.deepcopy, field_checks)
