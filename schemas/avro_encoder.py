"""A generated Avro binary encoder for EventProducer's hot path.

fastavro's schemaless writer was the largest single cost of `gatewatch serve` under load
(about a quarter of the server's CPU in a py-spy profile): for every field it dispatches on
the schema at run time, and for every ``["null", X]`` union it validates the value against
each branch. ``compile_python_writer`` turns one parsed schema into Python source that computes
each field's encoded pieces in a straight line (no dispatch, a ``None`` test per nullable
field) and joins them, behind an optional wire-format header, with one ``b"".join``
(about 40% less time per event than fastavro; the join about 12% less again than growing
a bytearray piece by piece). ``compile_encoder`` is the same as ``encode(record, out)``.

It covers what event schemas use: records, enums, ``null``/``boolean``/``int``/``long``/
``float``/``double``/``string``/``bytes``, arrays and ``["null", X]`` unions. Anything else raises
``Unsupported`` and the caller keeps fastavro. Input must be a canonical record (what
``EventCodec.check`` returns: every field present with its Avro type); the output is
byte-identical to fastavro's (tests/test_avro_encoder.py).

Where schemas/_avro_native.c is built, ``compile_writer`` returns its C writer, which
runs a small program of field steps (``native_program``) instead of the generated source
(about 7 us less per event) and hands any record it does not take (a value of another type,
an int beyond 64 bits, text that is not UTF-8) to the generated writer, so both give the
same bytes and raise the same exceptions (tests/test_avro_native.py).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

try:
    from schemas import _avro_native
except ImportError:  # not built (no C compiler): the generated Python writer alone
    _avro_native = None

__all__ = ["Unsupported", "compile_encoder", "compile_python_writer", "compile_writer", "native_program"]

_PRIMITIVES = ("null", "boolean", "int", "long", "float", "double", "string", "bytes")


class Unsupported(ValueError):
    """The schema uses an Avro feature this encoder does not generate code for."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _long(value: int) -> bytes:
    """Zig-zag varint of a long (the range was checked by normalisation).

    Above 14 bits the low two bytes are computed and the rest comes from a small cache:
    the large longs of an event are mostly timestamps, whose high bits change every few
    seconds, and the byte loop cost 2 us per event_time."""
    value = (value << 1) ^ (value >> 63)
    if value < 0x4000:
        return bytes((value,)) if value < 0x80 else bytes(((value & 0x7F) | 0x80, value >> 7))
    high = value >> 14
    rest = _HIGH_BITS.get(high)
    if rest is None:
        if len(_HIGH_BITS) >= 4096:
            _HIGH_BITS.clear()
        rest = _HIGH_BITS[high] = _varint(high)
    return bytes(((value & 0x7F) | 0x80, ((value >> 7) & 0x7F) | 0x80)) + rest


_HIGH_BITS: dict[int, bytes] = {}


# Values up to 2047 (most token counts, latencies and string lengths): a dict
# hit instead of the loop above (0.9 MB per process).
_SMALL = {value: _long(value) for value in range(-2048, 2048)}


class _Source:
    """Python source of one writer: statements that compute each field's pieces, and the
    list of expressions joined into the body, in field order."""

    def __init__(self):
        self.lines: list[str] = []
        self.names = 0
        self.constants: dict[str, dict] = {}

    def name(self, prefix: str) -> str:
        self.names += 1
        return f"{prefix}{self.names}"

    def emit(self, schema, value: str, depth: int) -> list[str]:
        """Statements (at ``depth``) that prepare ``value`` of type ``schema``; returns the
        expressions of its encoded pieces."""
        pad = "    " * depth
        add = self.lines.append
        if isinstance(schema, dict):
            kind = schema.get("type")
            if kind == "record":
                pieces = []
                for field in schema["fields"]:
                    name = self.name("v")
                    add(f"{pad}{name} = {value}[{field['name']!r}]")
                    pieces += self.emit(field["type"], name, depth)
                return pieces
            if kind == "array":
                return [self.array(schema["items"], value, depth)]
            if kind == "enum":
                symbols = self.name("ENUM")
                self.constants[symbols] = {symbol: _long(index) for index, symbol in enumerate(schema["symbols"])}
                return [f"{symbols}[{value}]"]
            if kind in _PRIMITIVES and not schema.get("logicalType"):
                return self.emit(kind, value, depth)
            raise Unsupported(f"Avro type {kind!r}" + (f" ({schema['logicalType']})" if schema.get("logicalType")
                                                      else ""))
        if isinstance(schema, list):
            if len(schema) == 2 and schema[0] == "null" and not isinstance(schema[1], list):
                return self.nullable(schema[1], value, depth)
            raise Unsupported(f"union {schema!r}")
        if schema in ("int", "long"):
            return [f"(small.get({value}) or long({value}))"]
        if schema == "string":
            encoded = self.name("s")
            add(f"{pad}{encoded} = {value}.encode()")
            return [f"(small.get(len({encoded})) or long(len({encoded})))", encoded]
        if schema == "bytes":
            return [f"long(len({value}))", value]
        if schema == "boolean":
            return [f"(b'\\x01' if {value} else b'\\x00')"]
        if schema == "double":
            return [f"double({value})"]
        if schema == "float":
            return [f"single({value})"]
        if schema == "null":
            return []
        raise Unsupported(f"Avro type {schema!r}")

    def nullable(self, schema, value: str, depth: int) -> list[str]:
        """``["null", X]``: a branch byte, then X's pieces (each empty when the value is None)."""
        pad = "    " * depth
        branch = self.name("b")
        self.lines.append(f"{pad}if {value} is not None:")
        self.lines.append(f"{pad}    {branch} = b'\\x02'")
        pieces = []
        for expression in self.emit(schema, value, depth + 1):
            piece = self.name("p")
            self.lines.append(f"{pad}    {piece} = {expression}")
            pieces.append(piece)
        self.lines.append(f"{pad}else:")
        self.lines.append(f"{pad}    {branch} = b'\\x00'")
        if pieces:
            self.lines.append(f"{pad}    {' = '.join(pieces)} = b''")
        return [branch, *pieces]

    def array(self, items_schema, value: str, depth: int) -> str:
        """An array as one piece: its blocks joined (a count, the items, the 0 that ends it)."""
        pad = "    " * depth
        encoded, item = self.name("a"), self.name("x")
        add = self.lines.append
        add(f"{pad}if {value}:")
        add(f"{pad}    {encoded} = [long(len({value}))]")
        add(f"{pad}    for {item} in {value}:")
        pieces = self.emit(items_schema, item, depth + 2)
        add(f"{pad}        {encoded} += ({', '.join(pieces)}{',' if len(pieces) == 1 else ''})" if pieces else
            f"{pad}        pass")
        add(f"{pad}    {encoded}.append(b'\\x00')")
        add(f"{pad}    {encoded} = join({encoded})")
        add(f"{pad}else:")
        add(f"{pad}    {encoded} = b'\\x00'")
        return encoded


# opcodes of schemas/_avro_native.c
(_OP_NULL, _OP_BOOLEAN, _OP_LONG, _OP_FLOAT, _OP_DOUBLE, _OP_STRING, _OP_BYTES,
 _OP_ENUM, _OP_NULLABLE, _OP_ARRAY, _OP_RECORD) = range(11)
_PRIMITIVE_OPS = {"null": _OP_NULL, "boolean": _OP_BOOLEAN, "int": _OP_LONG, "long": _OP_LONG, "float": _OP_FLOAT,
                  "double": _OP_DOUBLE, "string": _OP_STRING, "bytes": _OP_BYTES}


def native_program(schema) -> tuple:
    """The step tuple the C writer runs for ``schema``: ``(opcode, operand)``, where the
    operand of a record is its ``(field name, step)`` pairs, of an enum its symbol -> index
    dict, of an array or nullable union its inner step. Covers what ``compile_writer``'s
    generated source covers and raises Unsupported for the rest."""
    if isinstance(schema, dict):
        kind = schema.get("type")
        if kind == "record":
            return (_OP_RECORD, tuple((field["name"], native_program(field["type"])) for field in schema["fields"]))
        if kind == "array":
            return (_OP_ARRAY, native_program(schema["items"]))
        if kind == "enum":
            return (_OP_ENUM, {symbol: index for index, symbol in enumerate(schema["symbols"])})
        if kind in _PRIMITIVES and not schema.get("logicalType"):
            return native_program(kind)
        raise Unsupported(f"Avro type {kind!r}")
    if isinstance(schema, list):
        if len(schema) == 2 and schema[0] == "null" and not isinstance(schema[1], list):
            return (_OP_NULLABLE, native_program(schema[1]))
        raise Unsupported(f"union {schema!r}")
    if schema in _PRIMITIVE_OPS:
        return (_PRIMITIVE_OPS[schema],)
    raise Unsupported(f"Avro type {schema!r}")


def compile_writer(schema: dict, prefix: bytes = b"") -> Callable[[dict], bytes]:
    """``write(record) -> bytes``: ``prefix`` (a wire-format header), then the Avro body of
    ``record``: the C writer where schemas/_avro_native.c is built (it also has
    ``encode_many(records)``), else ``compile_python_writer``'s. Raises Unsupported for a
    schema outside the covered subset."""
    python_writer = compile_python_writer(schema, prefix)
    if _avro_native is None:
        return python_writer
    return _avro_native.Writer(native_program(schema), bytes(prefix), python_writer)


def compile_python_writer(schema: dict, prefix: bytes = b"") -> Callable[[dict], bytes]:
    """``write(record) -> bytes``: ``prefix`` (a wire-format header), then the Avro body of
    ``record``, built as one ``b"".join`` of the fields' pieces (a bytearray grown by ``+=``
    ninety times per event cost twice as much). Raises Unsupported for a schema outside the
    covered subset."""
    source = _Source()
    pieces = source.emit(schema, "record", 1)
    body = ", ".join(["PREFIX", *pieces])
    code = "def write(record):\n" + "\n".join(source.lines) + f"\n    return join(({body},))\n"
    namespace = {"long": _long, "small": _SMALL, "double": struct.Struct("<d").pack,
                 "single": struct.Struct("<f").pack, "join": b"".join, "PREFIX": bytes(prefix), **source.constants}
    exec(compile(code, f"<avro writer {schema.get('name', '')}>", "exec"), namespace)  # noqa: S102 - our own source
    return namespace["write"]


def compile_encoder(schema: dict) -> Callable[[dict, bytearray], None]:
    """``encode(record, out)`` appending the Avro body of ``record`` to ``out`` (the
    ``compile_writer`` of the schema); raises Unsupported for a schema outside the covered subset."""
    write = compile_writer(schema)

    def encode(record: dict, out: bytearray) -> None:
        out += write(record)
    return encode
