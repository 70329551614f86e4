/* Native decoding of an OTLP ExportTraceServiceRequest (protobuf bytes) into the values
   `otlp.spans_of` builds through upb, without upb's per-field Python wrapper objects.

   `decode_spans(body, span_factory)` returns the list of `span_factory(trace_id, span_id,
   name, start_ns, end_ns, status_error, attributes, resource, events)`, one per span in wire
   order; the spans of one ResourceSpans share its resource dict. AnyValue becomes what
   `otlp.any_value` returns (unset -> None). Accepts and rejects what upb accepts and
   rejects: a known field with another wire type is an unknown field (skipped, groups
   included), strings of every known string field (also those not returned) must be valid
   UTF-8, nesting (submessages and groups) stops at upb's default depth of 100, a singular
   submessage given twice is merged (repeated fields appended, oneof members replaced).
   tests/test_otlp_native.py compares both on SDK-encoded and fuzzed requests: keep the two
   in step when the proto or `spans_of` changes.

   `map_span` is `otlp.python_span_to_event` and `messages_text` is `otlp.python_messages_text`
   (the references, compared on fuzzed spans and message values by the same tests); their
   attribute names and tables come from otlp.py through `configure`. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_DEPTH 100

enum { WT_VARINT = 0, WT_FIXED64 = 1, WT_LEN = 2, WT_START_GROUP = 3, WT_END_GROUP = 4, WT_FIXED32 = 5 };

static PyObject *DecodeError;

typedef struct {
    const uint8_t *p;
    const uint8_t *end;
} Cursor;

static const Cursor EMPTY = {(const uint8_t *)"", (const uint8_t *)""}; /* an unset string or bytes field */

static int fail(const char *reason) {
    if (!PyErr_Occurred())
        PyErr_SetString(DecodeError, reason);
    return -1;
}

/* ---- wire primitives --------------------------------------------------------------- */

static int read_varint(Cursor *c, uint64_t *out) {
    uint64_t value = 0;
    for (int i = 0; i < 10; i++) {
        if (c->p >= c->end)
            return fail("truncated varint");
        uint8_t byte = *c->p++;
        value |= (uint64_t)(byte & 0x7f) << (7 * i);
        if (!(byte & 0x80)) {
            *out = value;
            return 0;
        }
    }
    return fail("varint longer than 10 bytes");
}

/* A tag: a varint of at most 5 bytes below 2^32 with a non-zero field number. */
static int read_tag(Cursor *c, uint32_t *field, int *wire_type) {
    uint64_t value = 0;
    for (int i = 0; i < 5; i++) {
        if (c->p >= c->end)
            return fail("truncated tag");
        uint8_t byte = *c->p++;
        value |= (uint64_t)(byte & 0x7f) << (7 * i);
        if (!(byte & 0x80)) {
            if (value > UINT32_MAX || (value >> 3) == 0)
                return fail("invalid tag");
            *field = (uint32_t)(value >> 3);
            *wire_type = (int)(value & 7);
            return 0;
        }
    }
    return fail("invalid tag");
}

static int read_fixed64(Cursor *c, uint64_t *out) {
    if (c->end - c->p < 8)
        return fail("truncated fixed64");
    memcpy(out, c->p, 8); /* little-endian hosts only (x86-64, aarch64) */
    c->p += 8;
    return 0;
}

static int read_length_delimited(Cursor *c, Cursor *inner) {
    uint64_t length;
    if (read_varint(c, &length) < 0)
        return -1;
    if (length > (uint64_t)(c->end - c->p))
        return fail("length past the end");
    inner->p = c->p;
    inner->end = c->p + length;
    c->p += length;
    return 0;
}

static int enter(int depth) {
    return depth > MAX_DEPTH ? fail("nested too deeply") : 0;
}

static int skip_field(Cursor *c, uint32_t field, int wire_type, int depth);

static int skip_group(Cursor *c, uint32_t group_field, int depth) {
    if (enter(depth) < 0)
        return -1;
    for (;;) {
        uint32_t field;
        int wire_type;
        if (c->p >= c->end)
            return fail("unterminated group");
        if (read_tag(c, &field, &wire_type) < 0)
            return -1;
        if (wire_type == WT_END_GROUP)
            return field == group_field ? 0 : fail("mismatched end of group");
        if (skip_field(c, field, wire_type, depth) < 0)
            return -1;
    }
}

/* An unknown field (or a known one with another wire type), at nesting `depth`. */
static int skip_field(Cursor *c, uint32_t field, int wire_type, int depth) {
    uint64_t ignored;
    Cursor inner;
    switch (wire_type) {
    case WT_VARINT:
        return read_varint(c, &ignored);
    case WT_FIXED64:
        return read_fixed64(c, &ignored);
    case WT_LEN:
        return read_length_delimited(c, &inner);
    case WT_START_GROUP:
        return skip_group(c, field, depth + 1);
    case WT_FIXED32:
        if (c->end - c->p < 4)
            return fail("truncated fixed32");
        c->p += 4;
        return 0;
    default: /* an end of group outside a group, or wire types 6 and 7 */
        return fail("invalid wire type");
    }
}

/* Strict UTF-8 (no overlong forms, surrogates or code points above U+10FFFF), as upb checks. */
static int valid_utf8(const uint8_t *p, const uint8_t *end) {
    while (p < end) {
        uint8_t b = *p;
        if (b < 0x80) {
            p++;
            continue;
        }
        Py_ssize_t left = end - p;
        if (b >= 0xc2 && b <= 0xdf) {
            if (left < 2 || (p[1] & 0xc0) != 0x80)
                return 0;
            p += 2;
        } else if (b >= 0xe0 && b <= 0xef) {
            if (left < 3 || (p[1] & 0xc0) != 0x80 || (p[2] & 0xc0) != 0x80)
                return 0;
            if ((b == 0xe0 && p[1] < 0xa0) || (b == 0xed && p[1] > 0x9f))
                return 0;
            p += 3;
        } else if (b >= 0xf0 && b <= 0xf4) {
            if (left < 4 || (p[1] & 0xc0) != 0x80 || (p[2] & 0xc0) != 0x80 || (p[3] & 0xc0) != 0x80)
                return 0;
            if ((b == 0xf0 && p[1] < 0x90) || (b == 0xf4 && p[1] > 0x8f))
                return 0;
            p += 4;
        } else {
            return 0;
        }
    }
    return 1;
}

static int read_string_field(Cursor *c, Cursor *text) {
    if (read_length_delimited(c, text) < 0)
        return -1;
    return valid_utf8(text->p, text->end) ? 0 : fail("string field had bad UTF-8");
}

/* A singular string field given more than once: the earlier occurrences are checked
   here, the last one where it is decoded (`text_of`). */
static int read_last_string(Cursor *c, Cursor *last) {
    if (last->p != NULL && !valid_utf8(last->p, last->end))
        return fail("string field had bad UTF-8");
    return read_length_delimited(c, last);
}

/* Attribute names and short values repeat from span to span ("gen_ai.request.model",
   "chat", a model's name): the str of a recent one is reused (with its hash computed once)
   instead of a new allocation. ASCII only, so a cached str's data are its UTF-8 bytes. */
#define CACHE_SLOTS 1024
#define CACHED_BYTES 48
static PyObject *text_cache[CACHE_SLOTS];

static PyObject *text_of(const Cursor *text) {
    Py_ssize_t size = text->end - text->p;
    if (size > CACHED_BYTES)
        return PyUnicode_DecodeUTF8((const char *)text->p, size, NULL);
    uint32_t hash = 2166136261u ^ (uint32_t)size;
    for (const uint8_t *p = text->p; p < text->end; p++)
        hash = (hash ^ *p) * 16777619u;
    PyObject **slot = &text_cache[(hash ^ (hash >> 16)) & (CACHE_SLOTS - 1)];
    PyObject *seen = *slot;
    if (seen != NULL && PyUnicode_GET_LENGTH(seen) == size && memcmp(PyUnicode_DATA(seen), text->p, size) == 0)
        return Py_NewRef(seen);
    PyObject *made = PyUnicode_DecodeUTF8((const char *)text->p, size, NULL);
    if (made != NULL && PyUnicode_IS_ASCII(made))
        Py_XSETREF(*slot, Py_NewRef(made));
    return made;
}

/* ---- messages that are validated only (nothing of them is returned) ---------------- */

enum { K_VARINT, K_FIXED64, K_FIXED32, K_STRING, K_BYTES, K_MESSAGE };

typedef struct MessageSpec MessageSpec;
typedef struct {
    uint32_t number;
    int kind;
    const MessageSpec *message;
} FieldSpec;
struct MessageSpec {
    const FieldSpec *fields;
    int count;
};

static const MessageSpec ANY_VALUE_SPEC, KEY_VALUE_SPEC;
static const FieldSpec ARRAY_VALUE_FIELDS[] = {{1, K_MESSAGE, &ANY_VALUE_SPEC}};
static const MessageSpec ARRAY_VALUE_SPEC = {ARRAY_VALUE_FIELDS, 1};
static const FieldSpec KEY_VALUE_LIST_FIELDS[] = {{1, K_MESSAGE, &KEY_VALUE_SPEC}};
static const MessageSpec KEY_VALUE_LIST_SPEC = {KEY_VALUE_LIST_FIELDS, 1};
static const FieldSpec ANY_VALUE_FIELDS[] = {
    {1, K_STRING, NULL}, {2, K_VARINT, NULL}, {3, K_VARINT, NULL}, {4, K_FIXED64, NULL},
    {5, K_MESSAGE, &ARRAY_VALUE_SPEC}, {6, K_MESSAGE, &KEY_VALUE_LIST_SPEC}, {7, K_BYTES, NULL},
    {8, K_VARINT, NULL}};
static const MessageSpec ANY_VALUE_SPEC = {ANY_VALUE_FIELDS, 8};
static const FieldSpec KEY_VALUE_FIELDS[] = {{1, K_STRING, NULL}, {2, K_MESSAGE, &ANY_VALUE_SPEC},
                                             {3, K_VARINT, NULL}};
static const MessageSpec KEY_VALUE_SPEC = {KEY_VALUE_FIELDS, 3};
static const FieldSpec SCOPE_FIELDS[] = {{1, K_STRING, NULL}, {2, K_STRING, NULL},
                                         {3, K_MESSAGE, &KEY_VALUE_SPEC}, {4, K_VARINT, NULL}};
static const MessageSpec SCOPE_SPEC = {SCOPE_FIELDS, 4};
static const FieldSpec LINK_FIELDS[] = {{1, K_BYTES, NULL}, {2, K_BYTES, NULL}, {3, K_STRING, NULL},
                                        {4, K_MESSAGE, &KEY_VALUE_SPEC}, {5, K_VARINT, NULL},
                                        {6, K_FIXED32, NULL}};
static const MessageSpec LINK_SPEC = {LINK_FIELDS, 6};
static const FieldSpec ENTITY_REF_FIELDS[] = {{1, K_STRING, NULL}, {2, K_STRING, NULL}, {3, K_STRING, NULL},
                                              {4, K_STRING, NULL}};
static const MessageSpec ENTITY_REF_SPEC = {ENTITY_REF_FIELDS, 4};

static int expected_wire_type(int kind) {
    switch (kind) {
    case K_VARINT:
        return WT_VARINT;
    case K_FIXED64:
        return WT_FIXED64;
    case K_FIXED32:
        return WT_FIXED32;
    default:
        return WT_LEN;
    }
}

static int validate_message(const MessageSpec *spec, Cursor c, int depth) {
    if (enter(depth) < 0)
        return -1;
    while (c.p < c.end) {
        uint32_t number;
        int wire_type;
        if (read_tag(&c, &number, &wire_type) < 0)
            return -1;
        const FieldSpec *known = NULL;
        for (int i = 0; i < spec->count; i++)
            if (spec->fields[i].number == number && expected_wire_type(spec->fields[i].kind) == wire_type)
                known = &spec->fields[i];
        if (known == NULL) {
            if (skip_field(&c, number, wire_type, depth) < 0)
                return -1;
            continue;
        }
        Cursor inner;
        switch (known->kind) {
        case K_STRING:
            if (read_string_field(&c, &inner) < 0)
                return -1;
            break;
        case K_MESSAGE:
            if (read_length_delimited(&c, &inner) < 0 || validate_message(known->message, inner, depth + 1) < 0)
                return -1;
            break;
        default:
            if (skip_field(&c, number, wire_type, depth) < 0)
                return -1;
        }
    }
    return 0;
}

static int validate_field(const MessageSpec *spec, Cursor *c, int depth) {
    Cursor inner;
    if (read_length_delimited(c, &inner) < 0)
        return -1;
    return validate_message(spec, inner, depth + 1);
}

/* ---- AnyValue and KeyValue ---------------------------------------------------------- */

enum { V_UNSET, V_SCALAR, V_ARRAY, V_KVLIST };

/* One AnyValue being read: occurrences of a singular AnyValue field merge into it. */
typedef struct {
    int kind;
    PyObject *value; /* owned; NULL while unset */
} AnyValue;

static int read_key_value(PyObject *dict, Cursor c, int depth);
static int read_any_value(AnyValue *any, Cursor c, int depth);

static void set_value(AnyValue *any, int kind, PyObject *value) {
    Py_XSETREF(any->value, value);
    any->kind = kind;
}

static int read_array(AnyValue *any, Cursor c, int depth) {
    if (enter(depth) < 0)
        return -1;
    if (any->kind != V_ARRAY) {
        PyObject *list = PyList_New(0);
        if (list == NULL)
            return -1;
        set_value(any, V_ARRAY, list);
    }
    while (c.p < c.end) {
        uint32_t number;
        int wire_type;
        if (read_tag(&c, &number, &wire_type) < 0)
            return -1;
        if (number != 1 || wire_type != WT_LEN) {
            if (skip_field(&c, number, wire_type, depth) < 0)
                return -1;
            continue;
        }
        Cursor inner;
        AnyValue item = {V_UNSET, NULL};
        if (read_length_delimited(&c, &inner) < 0 || read_any_value(&item, inner, depth + 1) < 0) {
            Py_XDECREF(item.value);
            return -1;
        }
        int appended = PyList_Append(any->value, item.value ? item.value : Py_None);
        Py_XDECREF(item.value);
        if (appended < 0)
            return -1;
    }
    return 0;
}

static int read_kvlist(AnyValue *any, Cursor c, int depth) {
    if (enter(depth) < 0)
        return -1;
    if (any->kind != V_KVLIST) {
        PyObject *dict = PyDict_New();
        if (dict == NULL)
            return -1;
        set_value(any, V_KVLIST, dict);
    }
    while (c.p < c.end) {
        uint32_t number;
        int wire_type;
        if (read_tag(&c, &number, &wire_type) < 0)
            return -1;
        if (number != 1 || wire_type != WT_LEN) {
            if (skip_field(&c, number, wire_type, depth) < 0)
                return -1;
            continue;
        }
        Cursor inner;
        if (read_length_delimited(&c, &inner) < 0 || read_key_value(any->value, inner, depth + 1) < 0)
            return -1;
    }
    return 0;
}

static int read_any_value(AnyValue *any, Cursor c, int depth) {
    if (enter(depth) < 0)
        return -1;
    while (c.p < c.end) {
        uint32_t number;
        int wire_type;
        uint64_t bits;
        Cursor inner;
        PyObject *value = NULL;
        if (read_tag(&c, &number, &wire_type) < 0)
            return -1;
        if (number == 1 && wire_type == WT_LEN) {
            if (read_length_delimited(&c, &inner) < 0)
                return -1;
            if ((value = text_of(&inner)) == NULL)
                return fail("string field had bad UTF-8");
        } else if ((number == 2 || number == 3 || number == 8) && wire_type == WT_VARINT) {
            if (read_varint(&c, &bits) < 0)
                return -1;
            if (number == 2)
                value = PyBool_FromLong(bits != 0);
            else if (number == 3)
                value = PyLong_FromLongLong((int64_t)bits);
            else /* string_value_strindex, an int32 */
                value = PyLong_FromLong((int32_t)(uint32_t)bits);
        } else if (number == 4 && wire_type == WT_FIXED64) {
            double real;
            if (read_fixed64(&c, &bits) < 0)
                return -1;
            memcpy(&real, &bits, 8);
            value = PyFloat_FromDouble(real);
        } else if (number == 7 && wire_type == WT_LEN) {
            if (read_length_delimited(&c, &inner) < 0)
                return -1;
            value = PyBytes_FromStringAndSize((const char *)inner.p, inner.end - inner.p);
        } else if ((number == 5 || number == 6) && wire_type == WT_LEN) {
            if (read_length_delimited(&c, &inner) < 0)
                return -1;
            if ((number == 5 ? read_array(any, inner, depth + 1) : read_kvlist(any, inner, depth + 1)) < 0)
                return -1;
            continue;
        } else {
            if (skip_field(&c, number, wire_type, depth) < 0)
                return -1;
            continue;
        }
        if (value == NULL)
            return -1;
        set_value(any, V_SCALAR, value);
    }
    return 0;
}

/* One KeyValue into `dict` (a later one with the same key replaces the value, as in a dict
   built from the repeated field). */
static int read_key_value(PyObject *dict, Cursor c, int depth) {
    if (enter(depth) < 0)
        return -1;
    Cursor key = {NULL, NULL};
    AnyValue any = {V_UNSET, NULL};
    while (c.p < c.end) {
        uint32_t number;
        int wire_type;
        Cursor inner;
        if (read_tag(&c, &number, &wire_type) < 0)
            goto error;
        if (number == 1 && wire_type == WT_LEN) {
            if (read_last_string(&c, &key) < 0)
                goto error;
        } else if (number == 2 && wire_type == WT_LEN) {
            if (read_length_delimited(&c, &inner) < 0 || read_any_value(&any, inner, depth + 1) < 0)
                goto error;
        } else if (skip_field(&c, number, wire_type, depth) < 0) {
            goto error;
        }
    }
    PyObject *name = text_of(key.p ? &key : &EMPTY);
    if (name == NULL)
        goto error;
    int stored = PyDict_SetItem(dict, name, any.value ? any.value : Py_None);
    Py_DECREF(name);
    Py_XDECREF(any.value);
    return stored;
error:
    Py_XDECREF(any.value);
    return -1;
}

/* A repeated KeyValue field's element at the cursor, into `*dict` (created on first use). */
static int read_attribute(PyObject **dict, Cursor *c, int depth) {
    Cursor inner;
    if (*dict == NULL && (*dict = PyDict_New()) == NULL)
        return -1;
    if (read_length_delimited(c, &inner) < 0)
        return -1;
    return read_key_value(*dict, inner, depth + 1);
}

/* ---- Span ------------------------------------------------------------------------ */

static PyObject *hex_of(const Cursor *bytes) {
    static const char digits[] = "0123456789abcdef";
    Py_ssize_t size = bytes->end - bytes->p;
    PyObject *text = PyUnicode_New(2 * size, 127);
    if (text == NULL)
        return NULL;
    Py_UCS1 *out = PyUnicode_1BYTE_DATA(text);
    for (Py_ssize_t i = 0; i < size; i++) {
        out[2 * i] = digits[bytes->p[i] >> 4];
        out[2 * i + 1] = digits[bytes->p[i] & 15];
    }
    return text;
}

static int read_event(PyObject *events, Cursor c, int depth) {
    if (enter(depth) < 0)
        return -1;
    Cursor name = {NULL, NULL};
    PyObject *attributes = NULL;
    while (c.p < c.end) {
        uint32_t number;
        int wire_type;
        if (read_tag(&c, &number, &wire_type) < 0)
            goto error;
        if (number == 2 && wire_type == WT_LEN) {
            if (read_last_string(&c, &name) < 0)
                goto error;
        } else if (number == 3 && wire_type == WT_LEN) {
            if (read_attribute(&attributes, &c, depth) < 0)
                goto error;
        } else if (skip_field(&c, number, wire_type, depth) < 0) {
            goto error;
        }
    }
    if (attributes == NULL && (attributes = PyDict_New()) == NULL)
        goto error;
    PyObject *text = text_of(name.p ? &name : &EMPTY);
    if (text == NULL)
        goto error;
    PyObject *event = PyTuple_Pack(2, text, attributes);
    Py_DECREF(text);
    Py_DECREF(attributes);
    if (event == NULL)
        return -1;
    int appended = PyList_Append(events, event);
    Py_DECREF(event);
    return appended;
error:
    Py_XDECREF(attributes);
    return -1;
}

static int read_status(int32_t *code, Cursor c, int depth) {
    if (enter(depth) < 0)
        return -1;
    while (c.p < c.end) {
        uint32_t number;
        int wire_type;
        uint64_t bits;
        Cursor message;
        if (read_tag(&c, &number, &wire_type) < 0)
            return -1;
        if (number == 3 && wire_type == WT_VARINT) {
            if (read_varint(&c, &bits) < 0)
                return -1;
            *code = (int32_t)(uint32_t)bits;
        } else if (number == 2 && wire_type == WT_LEN) {
            if (read_string_field(&c, &message) < 0)
                return -1;
        } else if (skip_field(&c, number, wire_type, depth) < 0) {
            return -1;
        }
    }
    return 0;
}

#define STATUS_CODE_ERROR 2

static int read_span(PyObject *out, PyObject *factory, PyObject *resource, Cursor c, int depth) {
    if (enter(depth) < 0)
        return -1;
    Cursor trace_id = {NULL, NULL}, span_id = {NULL, NULL}, name = {NULL, NULL}, skipped;
    uint64_t start_ns = 0, end_ns = 0;
    int32_t status_code = 0;
    PyObject *attributes = NULL, *events = PyList_New(0);
    PyObject *args[9] = {NULL};
    if (events == NULL)
        return -1;
    while (c.p < c.end) {
        uint32_t number;
        int wire_type;
        if (read_tag(&c, &number, &wire_type) < 0)
            goto error;
        int failed = 0;
        if (wire_type == WT_LEN && (number == 1 || number == 2 || number == 4)) {
            failed = read_length_delimited(&c, number == 1 ? &trace_id : number == 2 ? &span_id : &skipped);
        } else if (wire_type == WT_LEN && number == 5) {
            failed = read_last_string(&c, &name);
        } else if (wire_type == WT_LEN && number == 3) {
            failed = read_string_field(&c, &skipped);
        } else if (wire_type == WT_FIXED64 && (number == 7 || number == 8)) {
            failed = read_fixed64(&c, number == 7 ? &start_ns : &end_ns);
        } else if (wire_type == WT_LEN && number == 9) {
            failed = read_attribute(&attributes, &c, depth);
        } else if (wire_type == WT_LEN && number == 11) {
            failed = read_length_delimited(&c, &skipped) || read_event(events, skipped, depth + 1);
        } else if (wire_type == WT_LEN && number == 13) {
            failed = validate_field(&LINK_SPEC, &c, depth);
        } else if (wire_type == WT_LEN && number == 15) {
            failed = read_length_delimited(&c, &skipped) || read_status(&status_code, skipped, depth + 1);
        } else {
            failed = skip_field(&c, number, wire_type, depth);
        }
        if (failed)
            goto error;
    }
    if (attributes == NULL && (attributes = PyDict_New()) == NULL)
        goto error;
    args[0] = hex_of(trace_id.p ? &trace_id : &EMPTY);
    args[1] = hex_of(span_id.p ? &span_id : &EMPTY);
    args[2] = text_of(name.p ? &name : &EMPTY);
    args[3] = PyLong_FromUnsignedLongLong(start_ns);
    args[4] = PyLong_FromUnsignedLongLong(end_ns);
    args[5] = Py_NewRef(status_code == STATUS_CODE_ERROR ? Py_True : Py_False);
    args[6] = attributes;
    args[7] = Py_NewRef(resource);
    args[8] = events;
    attributes = events = NULL;
    for (int i = 0; i < 9; i++)
        if (args[i] == NULL)
            goto error;
    PyObject *span = PyObject_Vectorcall(factory, args, 9, NULL);
    for (int i = 0; i < 9; i++)
        Py_DECREF(args[i]);
    if (span == NULL)
        return -1;
    int appended = PyList_Append(out, span);
    Py_DECREF(span);
    return appended;
error:
    for (int i = 0; i < 9; i++)
        Py_XDECREF(args[i]);
    Py_XDECREF(attributes);
    Py_XDECREF(events);
    return -1;
}

/* ---- request ------------------------------------------------------------------------ */

static int read_resource(PyObject *resource, Cursor c, int depth) {
    if (enter(depth) < 0)
        return -1;
    while (c.p < c.end) {
        uint32_t number;
        int wire_type;
        Cursor inner;
        if (read_tag(&c, &number, &wire_type) < 0)
            return -1;
        int failed;
        if (number == 1 && wire_type == WT_LEN)
            failed = read_length_delimited(&c, &inner) || read_key_value(resource, inner, depth + 1);
        else if (number == 3 && wire_type == WT_LEN)
            failed = validate_field(&ENTITY_REF_SPEC, &c, depth);
        else
            failed = skip_field(&c, number, wire_type, depth);
        if (failed)
            return -1;
    }
    return 0;
}

static int read_scope_spans(PyObject *out, PyObject *factory, PyObject *resource, Cursor c, int depth) {
    if (enter(depth) < 0)
        return -1;
    while (c.p < c.end) {
        uint32_t number;
        int wire_type;
        Cursor inner;
        if (read_tag(&c, &number, &wire_type) < 0)
            return -1;
        int failed;
        if (number == 2 && wire_type == WT_LEN)
            failed = read_length_delimited(&c, &inner) || read_span(out, factory, resource, inner, depth + 1);
        else if (number == 1 && wire_type == WT_LEN)
            failed = validate_field(&SCOPE_SPEC, &c, depth);
        else if (number == 3 && wire_type == WT_LEN)
            failed = read_string_field(&c, &inner);
        else
            failed = skip_field(&c, number, wire_type, depth);
        if (failed)
            return -1;
    }
    return 0;
}

/* The resource dict is created before the spans that share it and filled wherever its
   field stands in the message (occurrences merge), so every span sees the whole resource. */
static int read_resource_spans(PyObject *out, PyObject *factory, Cursor c, int depth) {
    if (enter(depth) < 0)
        return -1;
    PyObject *resource = PyDict_New();
    if (resource == NULL)
        return -1;
    int failed = 0;
    while (!failed && c.p < c.end) {
        uint32_t number;
        int wire_type;
        Cursor inner;
        if (read_tag(&c, &number, &wire_type) < 0) {
            failed = 1;
            break;
        }
        if (number == 1 && wire_type == WT_LEN)
            failed = read_length_delimited(&c, &inner) || read_resource(resource, inner, depth + 1);
        else if (number == 2 && wire_type == WT_LEN)
            failed = read_length_delimited(&c, &inner) || read_scope_spans(out, factory, resource, inner, depth + 1);
        else if (number == 3 && wire_type == WT_LEN)
            failed = read_string_field(&c, &inner);
        else
            failed = skip_field(&c, number, wire_type, depth);
    }
    Py_DECREF(resource);
    return failed ? -1 : 0;
}

static PyObject *decode_spans(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "decode_spans(body, span_factory)");
        return NULL;
    }
    Py_buffer body;
    if (PyObject_GetBuffer(args[0], &body, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *factory = args[1];
    PyObject *out = PyList_New(0);
    Cursor c = {(const uint8_t *)body.buf, (const uint8_t *)body.buf + body.len};
    int failed = out == NULL;
    while (!failed && c.p < c.end) {
        uint32_t number;
        int wire_type;
        Cursor inner;
        if (read_tag(&c, &number, &wire_type) < 0)
            failed = 1;
        else if (number == 1 && wire_type == WT_LEN)
            failed = read_length_delimited(&c, &inner) || read_resource_spans(out, factory, inner, 1);
        else
            failed = skip_field(&c, number, wire_type, 0);
    }
    PyBuffer_Release(&body);
    if (failed) {
        Py_XDECREF(out);
        if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear();
            PyErr_SetString(DecodeError, "string field had bad UTF-8");
        }
        return NULL;
    }
    return out;
}

/* ---- Span -> gateway event: `otlp.span_to_event` for the spans the decoders make ------ */

/* The constants and the Python helpers the mapping uses, given once by `configure` from
   otlp.py (one source for the attribute names, provider and endpoint tables). */
static struct {
    PyObject *genai_markers, *openinference_kind, *openinference_llm_kinds, *request_model, *model_attributes,
        *response_model_attributes, *provider_attributes, *providers, *endpoints, *operation, *error_type,
        *http_status, *stream, *request_id_attributes, *user_attributes, *conversation_attributes,
        *token_conventions, *span_rejected, *prompt_and_response, *invocation_model, *error_code, *default_user,
        *unknown_provider, *default_endpoint, *plain_error, *ns_per_ms, *json_loads, *json_decode_error,
        *input_messages, *output_messages;
} config;
static int configured = 0;

static PyObject *S_parts, *S_content, *S_message, *S_role, *S_text, *S_result, *S_response, *S_newline;
static PyObject *S_trace_id, *S_span_id, *S_start_ns, *S_end_ns, *S_status_error, *S_attributes, *S_resource,
    *S_lower, *S_empty, *I_zero, *I_100, *I_599, *I_200, *I_500;

enum { F_EVENT_ID, F_REQUEST_ID, F_EVENT_TIME, F_USER_ID, F_ORG_ID, F_REGION, F_PROVIDER, F_ENDPOINT, F_MODEL,
       F_MODEL_VERSION, F_STATUS_CODE, F_ERROR_CODE, F_STREAMING, F_LATENCY_MS, F_INPUT_TOKENS, F_OUTPUT_TOKENS,
       F_CACHE_READ_TOKENS, F_CACHE_WRITE_TOKENS, F_REASONING_TOKENS, F_PROMPT, F_RESPONSE, F_CONVERSATION_ID,
       F_TRACE_ID, F_SPAN_ID, F_COUNT };
static const char *const FIELD_NAMES[F_COUNT] = {
    "event_id", "request_id", "event_time", "user_id", "org_id", "region", "provider", "endpoint", "model",
    "model_version", "status_code", "error_code", "streaming", "latency_ms", "input_tokens", "output_tokens",
    "cache_read_tokens", "cache_write_tokens", "reasoning_tokens", "prompt", "response", "conversation_id",
    "trace_id", "span_id"};
static PyObject *field_keys[F_COUNT];

typedef struct {
    PyObject *attributes, *resource; /* borrowed, both exact dicts */
} Sources;

static int rejected(PyObject *field, const char *rule) {
    PyObject *error = PyObject_CallFunction(config.span_rejected, "Os", field, rule);
    if (error != NULL) {
        PyErr_SetObject(config.span_rejected, error);
        Py_DECREF(error);
    }
    return -1;
}

/* `value is not None and value != ""`, or -1 on an error. */
static int usable(PyObject *value) {
    if (value == NULL || value == Py_None)
        return 0;
    if (PyUnicode_CheckExact(value))
        return PyUnicode_GET_LENGTH(value) != 0;
    if (PyLong_CheckExact(value) || PyFloat_CheckExact(value) || PyBool_Check(value))
        return 1;
    return PyObject_RichCompareBool(value, S_empty, Py_NE);
}

static int first_in(PyObject *dict, PyObject *const *names, Py_ssize_t count, PyObject **found) {
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *value = PyDict_GetItemWithError(dict, names[i]);
        if (value == NULL && PyErr_Occurred())
            return -1;
        int ok = usable(value);
        if (ok < 0)
            return -1;
        if (ok) {
            *found = Py_NewRef(value);
            return 1;
        }
    }
    return 0;
}

/* Span.get(*names): a new reference to the first usable value on the span, else on its
   resource, else to None; NULL on an error. */
static PyObject *get_any(const Sources *from, PyObject *const *names, Py_ssize_t count) {
    PyObject *found = NULL;
    int hit = first_in(from->attributes, names, count, &found);
    if (hit == 0 && PyDict_GET_SIZE(from->resource))
        hit = first_in(from->resource, names, count, &found);
    if (hit < 0)
        return NULL;
    return hit ? found : Py_NewRef(Py_None);
}

static PyObject *get_names(const Sources *from, PyObject *names) {
    return get_any(from, &PyTuple_GET_ITEM(names, 0), PyTuple_GET_SIZE(names));
}

/* `_text(value)`: str(value), None stays None; steals `value`. */
static PyObject *as_text(PyObject *value) {
    if (value == NULL || value == Py_None || PyUnicode_CheckExact(value))
        return value;
    PyObject *text = PyObject_Str(value);
    Py_DECREF(value);
    return text;
}

static PyObject *text_of_names(const Sources *from, PyObject *names) {
    return as_text(get_names(from, names));
}

/* `_count`: the token count under `name`, 0 when unset. */
static PyObject *count_of(const Sources *from, PyObject *name) {
    PyObject *value = get_any(from, &name, 1);
    if (value == NULL)
        return NULL;
    if (value == Py_None) {
        Py_DECREF(value);
        return Py_NewRef(I_zero);
    }
    if (!PyLong_CheckExact(value)) {
        int bad = PyBool_Check(value) || !(PyLong_Check(value) || PyFloat_Check(value));
        if (!bad) {
            PyObject *differs = PyObject_RichCompare(value, value, Py_NE); /* NaN; no identity shortcut */
            bad = differs == NULL ? -1 : PyObject_IsTrue(differs);
            Py_XDECREF(differs);
        }
        if (bad) {
            Py_DECREF(value);
            return bad < 0 ? NULL : (rejected(name, "must be a number"), NULL);
        }
    }
    int negative = PyObject_RichCompareBool(value, I_zero, Py_LT);
    if (negative) {
        Py_DECREF(value);
        return negative < 0 ? NULL : (rejected(name, "must not be negative"), NULL);
    }
    PyObject *count = PyNumber_Long(value);
    Py_DECREF(value);
    return count;
}

/* `_first_count`: the count of the first of `names` that is set. */
static PyObject *first_count(const Sources *from, PyObject *names) {
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(names); i++) {
        PyObject *value = get_any(from, &PyTuple_GET_ITEM(names, i), 1);
        if (value == NULL)
            return NULL;
        int set = value != Py_None;
        Py_DECREF(value);
        if (set)
            return count_of(from, PyTuple_GET_ITEM(names, i));
    }
    return Py_NewRef(I_zero);
}

/* `_token_counts` into counts[0..4]: uncached input, output, cache read, cache write, reasoning. */
static int token_counts(const Sources *from, PyObject **counts) {
    for (Py_ssize_t c = 0; c < PyTuple_GET_SIZE(config.token_conventions); c++) {
        PyObject *convention = PyTuple_GET_ITEM(config.token_conventions, c);
        PyObject *total_in = PyTuple_GET_ITEM(convention, 1), *out = PyTuple_GET_ITEM(convention, 2),
                 *cache_read = PyTuple_GET_ITEM(convention, 3), *cache_write = PyTuple_GET_ITEM(convention, 4);
        PyObject *any = get_any(from, &PyTuple_GET_ITEM(convention, 1), 4);
        if (any == NULL)
            return -1;
        int present = any != Py_None;
        Py_DECREF(any);
        if (!present)
            continue;
        PyObject *prompt = NULL, *read = NULL, *write = NULL, *cached = NULL, *uncached = NULL, *output = NULL,
                 *reasoning = NULL;
        if ((prompt = count_of(from, total_in)) == NULL || (read = count_of(from, cache_read)) == NULL ||
            (write = count_of(from, cache_write)) == NULL || (cached = PyNumber_Add(read, write)) == NULL)
            goto error;
        int exclusive = PyObject_RichCompareBool(prompt, cached, Py_LT);
        if (exclusive < 0)
            goto error;
        uncached = exclusive ? Py_NewRef(prompt) : PyNumber_Subtract(prompt, cached);
        if (uncached == NULL || (output = count_of(from, out)) == NULL ||
            (reasoning = first_count(from, PyTuple_GET_ITEM(convention, 5))) == NULL)
            goto error;
        int output_excludes = PyObject_RichCompareBool(output, reasoning, Py_LT);
        if (output_excludes < 0)
            goto error;
        if (output_excludes) {
            Py_SETREF(output, PyNumber_Add(output, reasoning));
            if (output == NULL)
                goto error;
        }
        Py_DECREF(prompt);
        Py_DECREF(cached);
        counts[0] = uncached;
        counts[1] = output;
        counts[2] = read;
        counts[3] = write;
        counts[4] = reasoning;
        return 0;
    error:
        Py_XDECREF(prompt);
        Py_XDECREF(read);
        Py_XDECREF(write);
        Py_XDECREF(cached);
        Py_XDECREF(uncached);
        Py_XDECREF(output);
        Py_XDECREF(reasoning);
        return -1;
    }
    for (int i = 0; i < 5; i++)
        counts[i] = Py_NewRef(I_zero);
    return 0;
}

static PyObject *messages_text(PyObject *module, PyObject *value);

/* `prompt_and_response(span)`: the semconv message attributes when both give a text (the
   usual span), else the Python function, which also reads events and older conventions. */
static PyObject *prompt_and_response(PyObject *span, PyObject *attributes) {
    PyObject *texts[2] = {NULL, NULL};
    PyObject *const names[2] = {config.input_messages, config.output_messages};
    int complete = 1;
    for (int i = 0; i < 2 && complete; i++) {
        PyObject *value = PyDict_GetItemWithError(attributes, names[i]);
        if (value == NULL && PyErr_Occurred())
            goto error;
        Py_XINCREF(value);
        texts[i] = messages_text(NULL, value ? value : Py_None);
        Py_XDECREF(value);
        if (texts[i] == NULL)
            goto error;
        complete = PyObject_IsTrue(texts[i]);
        if (complete < 0)
            goto error;
    }
    if (complete) {
        PyObject *pair = PyTuple_Pack(2, texts[0], texts[1]);
        Py_DECREF(texts[0]);
        Py_DECREF(texts[1]);
        return pair;
    }
    Py_XDECREF(texts[0]);
    Py_XDECREF(texts[1]);
    return PyObject_CallOneArg(config.prompt_and_response, span);
error:
    Py_XDECREF(texts[0]);
    Py_XDECREF(texts[1]);
    return NULL;
}

static int is_genai(PyObject *attributes) {
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(config.genai_markers); i++) {
        int has = PyDict_Contains(attributes, PyTuple_GET_ITEM(config.genai_markers, i));
        if (has)
            return has;
    }
    PyObject *kind = PyDict_GetItemWithError(attributes, config.openinference_kind);
    if (kind == NULL && PyErr_Occurred())
        return -1;
    return PySequence_Contains(config.openinference_llm_kinds, kind ? kind : Py_None);
}

/* 1 for an id of `digits` hex digits that is not all zeros, 0 otherwise (int(id, 16)'s
   verdict, which it gives for ids that are not plain lowercase hex), -1 on an error. */
static int nonzero_id(PyObject *id, Py_ssize_t digits) {
    if (PyUnicode_GET_LENGTH(id) != digits)
        return 0;
    if (PyUnicode_IS_ASCII(id)) {
        const char *text = (const char *)PyUnicode_1BYTE_DATA(id);
        int hex = 1, nonzero = 0;
        for (Py_ssize_t i = 0; i < digits; i++) {
            char ch = text[i];
            hex &= (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f');
            nonzero |= ch != '0';
        }
        if (hex)
            return nonzero;
    }
    PyObject *number = PyLong_FromUnicodeObject(id, 16);
    if (number == NULL)
        return -1;
    int truth = PyObject_IsTrue(number);
    Py_DECREF(number);
    return truth;
}

static PyObject *span_attribute(PyObject *span, PyObject *name, PyObject **out) {
    return *out = PyObject_GetAttr(span, name);
}

static PyObject *map_span(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "map_span(span, org_id, region, defaults)");
        return NULL;
    }
    if (!configured) {
        PyErr_SetString(PyExc_RuntimeError, "map_span before configure");
        return NULL;
    }
    PyObject *span = args[0], *defaults = args[3];
    PyObject *trace_id = NULL, *span_id = NULL, *attributes = NULL, *resource = NULL, *start_ns = NULL,
             *end_ns = NULL, *status_error = NULL, *event = NULL;
    PyObject *values[F_COUNT] = {NULL};
    PyObject *counts[5] = {NULL};
    PyObject *error_type = NULL, *http_status = NULL, *pair = NULL, *stream = NULL, *result = NULL;
    if (span_attribute(span, S_attributes, &attributes) == NULL || span_attribute(span, S_resource, &resource) == NULL ||
        span_attribute(span, S_trace_id, &trace_id) == NULL || span_attribute(span, S_span_id, &span_id) == NULL)
        goto done;
    if (!PyDict_CheckExact(attributes) || !PyDict_CheckExact(resource) || !PyUnicode_CheckExact(trace_id) ||
        !PyUnicode_CheckExact(span_id) || (defaults != Py_None && !PyDict_CheckExact(defaults))) {
        result = Py_NewRef(Py_NotImplemented); /* not what the decoders make: the Python mapping */
        goto done;
    }
    Sources from = {attributes, resource};
    int genai = is_genai(attributes);
    if (genai <= 0) {
        result = genai < 0 ? NULL : Py_NewRef(Py_None);
        goto done;
    }
    int ok = PyUnicode_GET_LENGTH(trace_id) == 32 && PyUnicode_GET_LENGTH(span_id) == 16;
    if (ok > 0)
        ok = nonzero_id(trace_id, 32);
    if (ok > 0)
        ok = nonzero_id(span_id, 16);
    if (ok <= 0) {
        if (ok == 0) {
            PyObject *field = PyUnicode_FromString("trace_id/span_id");
            if (field != NULL) {
                rejected(field, "must be a non-zero 16-byte trace id and 8-byte span id");
                Py_DECREF(field);
            }
        }
        goto done;
    }
    PyObject *model = text_of_names(&from, config.request_model);
    for (int step = 0; model != NULL && step < 2; step++) {
        int truth = PyObject_IsTrue(model);
        if (truth) {
            if (truth < 0)
                Py_CLEAR(model);
            break;
        }
        Py_SETREF(model, step == 0 ? PyObject_CallOneArg(config.invocation_model, span)
                                   : text_of_names(&from, config.model_attributes));
    }
    if ((values[F_MODEL] = model) == NULL)
        goto done;
    int has_model = PyObject_IsTrue(model);
    if (has_model <= 0) {
        if (has_model == 0)
            rejected(PyTuple_GET_ITEM(config.request_model, 0), "required (or gen_ai.response.model)");
        goto done;
    }
    if (span_attribute(span, S_start_ns, &start_ns) == NULL || span_attribute(span, S_end_ns, &end_ns) == NULL)
        goto done;
    int bad = PyObject_RichCompareBool(start_ns, I_zero, Py_LE);
    if (bad) {
        if (bad > 0) {
            PyObject *field = PyUnicode_FromString("start_time_unix_nano");
            if (field != NULL) {
                rejected(field, "must be set");
                Py_DECREF(field);
            }
        }
        goto done;
    }
    bad = PyObject_RichCompareBool(end_ns, start_ns, Py_LT);
    if (bad) {
        if (bad > 0) {
            PyObject *field = PyUnicode_FromString("end_time_unix_nano");
            if (field != NULL) {
                rejected(field, "must not be before start_time_unix_nano");
                Py_DECREF(field);
            }
        }
        goto done;
    }
    /* provider: (text or "unknown").lower(), then its name in our tables */
    PyObject *provider = text_of_names(&from, config.provider_attributes);
    if (provider == NULL)
        goto done;
    int named = PyObject_IsTrue(provider);
    if (named <= 0) {
        Py_DECREF(provider);
        if (named < 0)
            goto done;
        provider = Py_NewRef(config.unknown_provider);
    }
    Py_SETREF(provider, PyObject_CallMethodNoArgs(provider, S_lower));
    if (provider == NULL)
        goto done;
    PyObject *known = PyDict_GetItemWithError(config.providers, provider);
    if (known == NULL && PyErr_Occurred()) {
        Py_DECREF(provider);
        goto done;
    }
    values[F_PROVIDER] = known ? Py_NewRef(known) : Py_NewRef(provider);
    Py_DECREF(provider);
    PyObject *operation = text_of_names(&from, config.operation);
    if (operation == NULL)
        goto done;
    PyObject *endpoint = PyDict_GetItemWithError(config.endpoints, operation);
    if (endpoint == NULL && PyErr_Occurred()) {
        Py_DECREF(operation);
        goto done;
    }
    if (endpoint == NULL) {
        int truth = PyObject_IsTrue(operation);
        endpoint = truth > 0 ? operation : truth == 0 ? config.default_endpoint : NULL;
    }
    values[F_ENDPOINT] = Py_XNewRef(endpoint);
    Py_DECREF(operation);
    if (values[F_ENDPOINT] == NULL)
        goto done;
    if ((error_type = text_of_names(&from, config.error_type)) == NULL ||
        (http_status = get_names(&from, config.http_status)) == NULL ||
        span_attribute(span, S_status_error, &status_error) == NULL)
        goto done;
    int failed = PyObject_IsTrue(status_error);
    if (failed < 0)
        goto done;
    failed = failed || error_type != Py_None;
    int in_range = PyLong_Check(http_status);
    if (in_range > 0)
        in_range = PyObject_RichCompareBool(I_100, http_status, Py_LE);
    if (in_range > 0)
        in_range = PyObject_RichCompareBool(http_status, I_599, Py_LE);
    if (in_range < 0)
        goto done;
    values[F_STATUS_CODE] = in_range ? PyNumber_Long(http_status) : Py_NewRef(failed ? I_500 : I_200);
    if (values[F_STATUS_CODE] == NULL)
        goto done;
    PyObject *response_model = text_of_names(&from, config.response_model_attributes);
    if (response_model == NULL)
        goto done;
    int versioned = PyObject_IsTrue(response_model);
    if (versioned > 0)
        versioned = PyObject_RichCompareBool(response_model, model, Py_NE);
    values[F_MODEL_VERSION] = versioned > 0 ? Py_NewRef(response_model) : versioned == 0 ? Py_NewRef(Py_None) : NULL;
    Py_DECREF(response_model);
    if (values[F_MODEL_VERSION] == NULL)
        goto done;
    pair = prompt_and_response(span, attributes);
    if (pair == NULL)
        goto done;
    if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2) {
        PyErr_SetString(PyExc_TypeError, "prompt_and_response must return a pair");
        goto done;
    }
    values[F_PROMPT] = Py_NewRef(PyTuple_GET_ITEM(pair, 0));
    values[F_RESPONSE] = Py_NewRef(PyTuple_GET_ITEM(pair, 1));
    if ((stream = get_names(&from, config.stream)) == NULL)
        goto done;
    values[F_STREAMING] = Py_NewRef(PyBool_Check(stream) ? stream : Py_False);
    if (token_counts(&from, counts) < 0)
        goto done;
    for (int i = 0; i < 5; i++) {
        values[F_INPUT_TOKENS + i] = counts[i];
        counts[i] = NULL;
    }
    values[F_EVENT_ID] = PyUnicode_FromFormat("otel-%U-%U", trace_id, span_id);
    values[F_REQUEST_ID] = text_of_names(&from, config.request_id_attributes);
    if (values[F_EVENT_ID] == NULL || values[F_REQUEST_ID] == NULL)
        goto done;
    int given = PyObject_IsTrue(values[F_REQUEST_ID]);
    if (given <= 0) {
        Py_SETREF(values[F_REQUEST_ID], given < 0 ? NULL : PyUnicode_FromFormat("%U-%U", trace_id, span_id));
        if (values[F_REQUEST_ID] == NULL)
            goto done;
    }
    if ((values[F_EVENT_TIME] = PyNumber_FloorDivide(start_ns, config.ns_per_ms)) == NULL ||
        (values[F_USER_ID] = text_of_names(&from, config.user_attributes)) == NULL)
        goto done;
    given = PyObject_IsTrue(values[F_USER_ID]);
    if (given <= 0) {
        Py_SETREF(values[F_USER_ID], given < 0 ? NULL : Py_NewRef(config.default_user));
        if (values[F_USER_ID] == NULL)
            goto done;
    }
    values[F_ORG_ID] = Py_NewRef(args[1]);
    values[F_REGION] = Py_NewRef(args[2]);
    int typed_error = failed ? PyObject_IsTrue(error_type) : 0;
    if (typed_error < 0)
        goto done;
    values[F_ERROR_CODE] = typed_error ? PyObject_CallOneArg(config.error_code, error_type)
                                       : Py_NewRef(failed ? config.plain_error : Py_None);
    if (values[F_ERROR_CODE] == NULL)
        goto done;
    PyObject *latency = PyNumber_Subtract(end_ns, start_ns);
    if (latency == NULL)
        goto done;
    values[F_LATENCY_MS] = PyNumber_FloorDivide(latency, config.ns_per_ms);
    Py_DECREF(latency);
    if (values[F_LATENCY_MS] == NULL ||
        (values[F_CONVERSATION_ID] = text_of_names(&from, config.conversation_attributes)) == NULL)
        goto done;
    values[F_TRACE_ID] = Py_NewRef(trace_id);
    values[F_SPAN_ID] = Py_NewRef(span_id);
    event = defaults == Py_None ? PyDict_New() : PyDict_Copy(defaults);
    if (event == NULL)
        goto done;
    for (int i = 0; i < F_COUNT; i++)
        if (PyDict_SetItem(event, field_keys[i], values[i]) < 0)
            goto done;
    result = event;
    event = NULL;
done:
    for (int i = 0; i < F_COUNT; i++)
        Py_XDECREF(values[i]);
    for (int i = 0; i < 5; i++)
        Py_XDECREF(counts[i]);
    Py_XDECREF(trace_id);
    Py_XDECREF(span_id);
    Py_XDECREF(attributes);
    Py_XDECREF(resource);
    Py_XDECREF(start_ns);
    Py_XDECREF(end_ns);
    Py_XDECREF(status_error);
    Py_XDECREF(error_type);
    Py_XDECREF(http_status);
    Py_XDECREF(pair);
    Py_XDECREF(stream);
    Py_XDECREF(event);
    return result;
}

/* ---- GenAI messages -> text: `otlp.python_messages_text` ------------------------------ */

static int add_parts(PyObject *texts, PyObject *parts);

/* `_text_of_parts` for one part: its text, or the texts of the parts or message inside it. */
static int add_part(PyObject *texts, PyObject *part) {
    if (PyUnicode_Check(part))
        return PyList_Append(texts, part);
    if (!PyDict_Check(part))
        return 0;
    PyObject *const text_keys[] = {S_content, S_text, S_result, S_response};
    for (int i = 0; i < 4; i++) {
        PyObject *text = PyDict_GetItemWithError(part, text_keys[i]);
        if (text == NULL && PyErr_Occurred())
            return -1;
        if (text != NULL && PyUnicode_Check(text))
            return PyList_Append(texts, text);
    }
    PyObject *inner = PyDict_GetItemWithError(part, S_parts);
    if (inner == NULL) {
        if (PyErr_Occurred())
            return -1;
        inner = PyDict_GetItemWithError(part, S_message);
        if (inner == NULL || !PyDict_Check(inner))
            return PyErr_Occurred() ? -1 : 0;
    }
    Py_INCREF(inner);
    int failed = add_parts(texts, inner);
    Py_DECREF(inner);
    return failed;
}

static int add_parts(PyObject *texts, PyObject *parts) {
    if (Py_EnterRecursiveCall(" in messages_text"))
        return -1;
    int failed = 0;
    if (PyList_Check(parts)) {
        for (Py_ssize_t i = 0; !failed && i < PyList_GET_SIZE(parts); i++) {
            PyObject *part = Py_NewRef(PyList_GET_ITEM(parts, i));
            failed = add_part(texts, part);
            Py_DECREF(part);
        }
    } else {
        failed = add_part(texts, parts);
    }
    Py_LeaveRecursiveCall();
    return failed;
}

/* One message as its line: "role: text", or the text without a role. */
static PyObject *message_line(PyObject *message) {
    PyObject *const body_keys[] = {S_parts, S_content, S_message};
    PyObject *body = message;
    for (int i = 0; i < 3; i++) {
        PyObject *found = PyDict_GetItemWithError(message, body_keys[i]);
        if (found == NULL && PyErr_Occurred())
            return NULL;
        if (found != NULL) {
            body = found;
            break;
        }
    }
    PyObject *texts = PyList_New(0), *text = NULL, *role = NULL, *line = NULL;
    if (texts == NULL)
        return NULL;
    Py_INCREF(body);
    int failed = add_parts(texts, body);
    Py_DECREF(body);
    if (failed || (text = PyUnicode_Join(S_newline, texts)) == NULL)
        goto done;
    role = Py_XNewRef(PyDict_GetItemWithError(message, S_role));
    int named = role == NULL ? (PyErr_Occurred() ? -1 : 0) : PyObject_IsTrue(role);
    if (named == 0) {
        PyObject *inner = PyDict_GetItemWithError(message, S_message);
        if (inner != NULL && PyDict_Check(inner)) {
            Py_XSETREF(role, Py_XNewRef(PyDict_GetItemWithError(inner, S_role)));
            named = role == NULL ? (PyErr_Occurred() ? -1 : 0) : PyObject_IsTrue(role);
        } else if (inner == NULL && PyErr_Occurred()) {
            named = -1;
        }
    }
    if (named < 0)
        goto done;
    if (named) {
        PyObject *shown = PyObject_Format(role, S_empty);
        if (shown != NULL) {
            line = PyUnicode_FromFormat("%U: %U", shown, text);
            Py_DECREF(shown);
        }
    } else {
        line = Py_NewRef(text);
    }
done:
    Py_DECREF(texts);
    Py_XDECREF(text);
    Py_XDECREF(role);
    return line;
}

static PyObject *messages_text(PyObject *module, PyObject *value) {
    if (!configured) {
        PyErr_SetString(PyExc_RuntimeError, "messages_text before configure");
        return NULL;
    }
    if (value == Py_None)
        Py_RETURN_NONE;
    PyObject *parsed = NULL, *lines = NULL, *result = NULL;
    if (PyUnicode_Check(value)) {
        Py_UCS4 first = PyUnicode_GET_LENGTH(value) ? PyUnicode_READ_CHAR(value, 0) : 0;
        if (first != '[' && first != '{')
            return Py_NewRef(value);
        parsed = PyObject_CallOneArg(config.json_loads, value);
        if (parsed == NULL) {
            if (!PyErr_ExceptionMatches(config.json_decode_error))
                return NULL;
            PyErr_Clear();
            return Py_NewRef(value);
        }
        value = parsed;
    }
    if ((lines = PyList_New(0)) == NULL)
        goto done;
    Py_ssize_t count = PyList_Check(value) ? PyList_GET_SIZE(value) : 1;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *message = PyList_Check(value) ? PyList_GET_ITEM(value, i) : value;
        if (PyDict_Check(message)) {
            Py_INCREF(message);
            PyObject *line = message_line(message);
            Py_DECREF(message);
            int appended = line == NULL ? -1 : PyList_Append(lines, line);
            Py_XDECREF(line);
            if (appended < 0)
                goto done;
        } else if (PyUnicode_Check(message) && PyList_Append(lines, message) < 0) {
            goto done;
        }
        if (PyList_Check(value))
            count = PyList_GET_SIZE(value);
    }
    result = PyList_GET_SIZE(lines) ? PyUnicode_Join(S_newline, lines) : Py_NewRef(Py_None);
done:
    Py_XDECREF(lines);
    Py_XDECREF(parsed);
    return result;
}

static PyObject *configure(PyObject *module, PyObject *kwargs_dict) {
    static const char *const names[] = {
        "genai_markers", "openinference_kind", "openinference_llm_kinds", "request_model", "model_attributes",
        "response_model_attributes", "provider_attributes", "providers", "endpoints", "operation", "error_type",
        "http_status", "stream", "request_id_attributes", "user_attributes", "conversation_attributes",
        "token_conventions", "span_rejected", "prompt_and_response", "invocation_model", "error_code",
        "default_user", "unknown_provider", "default_endpoint", "plain_error", "ns_per_ms", "json_loads",
        "json_decode_error", "input_messages", "output_messages"};
    PyObject **slots = (PyObject **)&config;
    _Static_assert(sizeof config == sizeof names / sizeof *names * sizeof(PyObject *), "a name per setting");
    configured = 0; /* until every setting is in and checked */
    if (!PyDict_Check(kwargs_dict) || PyDict_GET_SIZE(kwargs_dict) != (Py_ssize_t)(sizeof names / sizeof *names)) {
        PyErr_SetString(PyExc_TypeError, "configure(dict) takes every setting of the mapping");
        return NULL;
    }
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        PyObject *value = PyDict_GetItemString(kwargs_dict, names[i]);
        if (value == NULL) {
            PyErr_Format(PyExc_TypeError, "configure: %s missing", names[i]);
            return NULL;
        }
        Py_XSETREF(slots[i], Py_NewRef(value));
    }
    /* map_span reads these without further checks */
    PyObject *tuples[] = {config.genai_markers, config.openinference_llm_kinds, config.request_model,
                          config.model_attributes, config.response_model_attributes, config.provider_attributes,
                          config.operation, config.error_type, config.http_status, config.stream,
                          config.request_id_attributes, config.user_attributes, config.conversation_attributes,
                          config.token_conventions};
    for (size_t i = 0; i < sizeof tuples / sizeof *tuples; i++)
        if (!PyTuple_CheckExact(tuples[i]) || PyTuple_GET_SIZE(tuples[i]) == 0)
            return PyErr_Format(PyExc_TypeError, "configure: a setting that must be a non-empty tuple is not");
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(config.token_conventions); i++) {
        PyObject *convention = PyTuple_GET_ITEM(config.token_conventions, i);
        if (!PyTuple_CheckExact(convention) || PyTuple_GET_SIZE(convention) != 6 ||
            !PyTuple_CheckExact(PyTuple_GET_ITEM(convention, 5)))
            return PyErr_Format(PyExc_TypeError, "configure: token_conventions are (name, 4 names, names tuple)");
    }
    if (!PyDict_CheckExact(config.providers) || !PyDict_CheckExact(config.endpoints))
        return PyErr_Format(PyExc_TypeError, "configure: providers and endpoints must be dicts");
    configured = 1;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode_spans", (PyCFunction)(void (*)(void))decode_spans, METH_FASTCALL,
     "decode_spans(body, span_factory) -> list: span_factory(trace_id, span_id, name, start_ns, end_ns, "
     "status_error, attributes, resource, events) per span of an ExportTraceServiceRequest."},
    {"map_span", (PyCFunction)(void (*)(void))map_span, METH_FASTCALL,
     "map_span(span, org_id, region, defaults) -> dict | None | NotImplemented: otlp.span_to_event's event "
     "(NotImplemented for a span the decoders do not make: the Python mapping takes it)."},
    {"messages_text", (PyCFunction)messages_text, METH_O,
     "messages_text(value) -> str | None: otlp.python_messages_text's text of GenAI messages."},
    {"configure", (PyCFunction)configure, METH_O, "configure(settings: dict): map_span's constants and helpers."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef otlp_module = {PyModuleDef_HEAD_INIT, "connectors.ingest_api._otlp_native",
                                         "Native OTLP ExportTraceServiceRequest decoding (see _otlp_native.c).",
                                         -1, methods};

PyMODINIT_FUNC PyInit__otlp_native(void) {
    PyObject *module = PyModule_Create(&otlp_module);
    if (module == NULL)
        return NULL;
    DecodeError = PyErr_NewException("connectors.ingest_api._otlp_native.DecodeError", PyExc_ValueError, NULL);
    if (DecodeError == NULL || PyModule_AddObjectRef(module, "DecodeError", DecodeError) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    S_parts = PyUnicode_InternFromString("parts");
    S_content = PyUnicode_InternFromString("content");
    S_message = PyUnicode_InternFromString("message");
    S_role = PyUnicode_InternFromString("role");
    S_text = PyUnicode_InternFromString("text");
    S_result = PyUnicode_InternFromString("result");
    S_response = PyUnicode_InternFromString("response");
    S_newline = PyUnicode_FromString("\n");
    S_trace_id = PyUnicode_InternFromString("trace_id");
    S_span_id = PyUnicode_InternFromString("span_id");
    S_start_ns = PyUnicode_InternFromString("start_ns");
    S_end_ns = PyUnicode_InternFromString("end_ns");
    S_status_error = PyUnicode_InternFromString("status_error");
    S_attributes = PyUnicode_InternFromString("attributes");
    S_resource = PyUnicode_InternFromString("resource");
    S_lower = PyUnicode_InternFromString("lower");
    S_empty = PyUnicode_FromString("");
    I_zero = PyLong_FromLong(0);
    I_100 = PyLong_FromLong(100);
    I_599 = PyLong_FromLong(599);
    I_200 = PyLong_FromLong(200);
    I_500 = PyLong_FromLong(500);
    for (int i = 0; i < F_COUNT; i++)
        if ((field_keys[i] = PyUnicode_InternFromString(FIELD_NAMES[i])) == NULL) {
            Py_DECREF(module);
            return NULL;
        }
    if (!S_parts || !S_content || !S_message || !S_role || !S_text || !S_result || !S_response || !S_newline ||
        !S_trace_id || !S_span_id || !S_start_ns || !S_end_ns || !S_status_error || !S_attributes || !S_resource ||
        !S_lower || !S_empty || !I_zero || !I_100 || !I_599 || !I_200 || !I_500) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
