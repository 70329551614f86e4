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
   in step when the proto or `spans_of` changes. */

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

static PyMethodDef methods[] = {
    {"decode_spans", (PyCFunction)(void (*)(void))decode_spans, METH_FASTCALL,
     "decode_spans(body, span_factory) -> list: span_factory(trace_id, span_id, name, start_ns, end_ns, "
     "status_error, attributes, resource, events) per span of an ExportTraceServiceRequest."},
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
    return module;
}
