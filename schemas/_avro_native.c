/* The Avro writer of schemas/avro_encoder.py (`compile_writer`) and the Avro reader of
   schemas/avro_reader.py (`compile_reader`) in C, for the hot paths of EventProducer and of
   the flow's decode: the generated Python writer was ~17% of an ingestion request's CPU
   (~7 us/event), the generated Python reader 18 us of decode_record's 21 us per event.

   `Writer(program, prefix, fallback)` is callable as `write(record) -> bytes`: `prefix` (the
   wire-format header), then the Avro body of `record` as the program describes it.
   avro_encoder.native_program builds the program once per schema from the same subset the
   generated writer covers; each step is a tuple whose first item is an opcode below.

   Only exact built-in types take the C path (dict, str, int, float, bool, bytes, list, tuple,
   None). Any other value, a missing key, an int beyond 64 bits or text that is not valid
   UTF-8 sends the whole record to `fallback` (the generated Python writer), so the bytes and
   the exception of every odd record are the Python writer's own (tests/test_avro_native.py).

   `Reader(fields, defaults, fallback, deepcopy)` is callable as `read(data, pos=0) ->
   (record, end)`, like the generated Python reader it stands for (avro_reader.native_reader_program
   builds its program from the same (writer, reader) pair). Whatever the Python reader would
   not read as it is (a varint above 10 bytes or 64 bits, a boolean byte other than 0/1, an
   int outside 32 bits, text that is not strict UTF-8, a union branch or enum index out of
   range, a short body) and anything but exact bytes and an int position are handed to
   `fallback` (the Python reader), so the record, or the exception, is always its own
   (tests/test_avro_reader_native.py). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum { OP_NULL = 0, OP_BOOLEAN = 1, OP_LONG = 2, OP_FLOAT = 3, OP_DOUBLE = 4, OP_STRING = 5, OP_BYTES = 6,
       OP_ENUM = 7, OP_NULLABLE = 8, OP_ARRAY = 9, OP_RECORD = 10 };

/* a value the C path does not take: the record goes to the fallback writer */
#define FALLBACK (-2)

/* most events fit the stack buffer a write starts with; a larger one moves to the heap */
#define STACK_BYTES 4096

typedef struct {
    char *data;
    Py_ssize_t len;
    Py_ssize_t cap;
    int on_heap;
} Buffer;

static int reserve(Buffer *buffer, Py_ssize_t extra) {
    if (buffer->len + extra <= buffer->cap)
        return 0;
    Py_ssize_t cap = buffer->cap * 2;
    while (cap < buffer->len + extra)
        cap *= 2;
    char *data = buffer->on_heap ? PyMem_Realloc(buffer->data, cap) : PyMem_Malloc(cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (!buffer->on_heap)
        memcpy(data, buffer->data, buffer->len);
    buffer->on_heap = 1;
    buffer->data = data;
    buffer->cap = cap;
    return 0;
}

static int put_long(Buffer *buffer, int64_t value) {
    if (reserve(buffer, 10) < 0)
        return -1;
    uint64_t zigzag = ((uint64_t)value << 1) ^ (uint64_t)(value >> 63);
    unsigned char *out = (unsigned char *)buffer->data + buffer->len;
    while (zigzag >= 0x80) {
        *out++ = (unsigned char)((zigzag & 0x7F) | 0x80);
        zigzag >>= 7;
    }
    *out++ = (unsigned char)zigzag;
    buffer->len = (char *)out - buffer->data;
    return 0;
}

static int put_bytes(Buffer *buffer, const char *data, Py_ssize_t size) {
    if (put_long(buffer, size) < 0 || reserve(buffer, size) < 0)
        return -1;
    memcpy(buffer->data + buffer->len, data, size);
    buffer->len += size;
    return 0;
}

static int put_byte(Buffer *buffer, unsigned char byte) {
    if (reserve(buffer, 1) < 0)
        return -1;
    buffer->data[buffer->len++] = (char)byte;
    return 0;
}

static int put_little_endian(Buffer *buffer, const void *value, Py_ssize_t size) {
    if (reserve(buffer, size) < 0)
        return -1;
#if PY_LITTLE_ENDIAN
    memcpy(buffer->data + buffer->len, value, size);
#else
    for (Py_ssize_t i = 0; i < size; i++)
        buffer->data[buffer->len + i] = ((const char *)value)[size - 1 - i];
#endif
    buffer->len += size;
    return 0;
}

static int write_value(Buffer *buffer, PyObject *step, PyObject *value);

static int write_record(Buffer *buffer, PyObject *fields, PyObject *value) {
    if (!PyDict_CheckExact(value))
        return FALLBACK;
    Py_ssize_t count = PyTuple_GET_SIZE(fields);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *field = PyTuple_GET_ITEM(fields, i);
        PyObject *item = PyDict_GetItemWithError(value, PyTuple_GET_ITEM(field, 0));
        if (item == NULL)
            return PyErr_Occurred() ? -1 : FALLBACK;
        int status = write_value(buffer, PyTuple_GET_ITEM(field, 1), item);
        if (status != 0)
            return status;
    }
    return 0;
}

static int write_array(Buffer *buffer, PyObject *items, PyObject *value) {
    if (!PyList_CheckExact(value) && !PyTuple_CheckExact(value))
        return FALLBACK;
    PyObject *sequence = value;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(sequence);
    if (count > 0) {
        if (put_long(buffer, count) < 0)
            return -1;
        /* write_value runs no Python code, so the list cannot change while it is written */
        for (Py_ssize_t i = 0; i < count; i++) {
            int status = write_value(buffer, items, PySequence_Fast_ITEMS(sequence)[i]);
            if (status != 0)
                return status;
        }
    }
    return put_byte(buffer, 0);
}

static int write_value(Buffer *buffer, PyObject *step, PyObject *value) {
    long op = PyLong_AsLong(PyTuple_GET_ITEM(step, 0));
    switch (op) {
    case OP_NULL:
        return 0;
    case OP_BOOLEAN:
        if (value == Py_True)
            return put_byte(buffer, 1);
        if (value == Py_False)
            return put_byte(buffer, 0);
        return FALLBACK;
    case OP_LONG: {
        if (!PyLong_CheckExact(value))
            return FALLBACK;
        int overflow = 0;
        long long number = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (overflow)
            return FALLBACK;
        return put_long(buffer, number);
    }
    case OP_FLOAT:
    case OP_DOUBLE: {
        double number;
        if (PyFloat_CheckExact(value))
            number = PyFloat_AS_DOUBLE(value);
        else if (PyLong_CheckExact(value)) {
            number = PyLong_AsDouble(value);
            if (number == -1.0 && PyErr_Occurred()) {
                PyErr_Clear();
                return FALLBACK;
            }
        } else
            return FALLBACK;
        if (op == OP_DOUBLE)
            return put_little_endian(buffer, &number, 8);
        /* struct's "<f" refuses a double beyond float's range: leave that to it */
        if (number > 3.4028234663852886e38 || number < -3.4028234663852886e38)
            if (!isinf(number))
                return FALLBACK;
        float single = (float)number;
        return put_little_endian(buffer, &single, 4);
    }
    case OP_STRING: {
        if (!PyUnicode_CheckExact(value))
            return FALLBACK;
        Py_ssize_t size;
        const char *text = PyUnicode_AsUTF8AndSize(value, &size);
        if (text == NULL) { /* lone surrogates: the fallback raises encode()'s error */
            PyErr_Clear();
            return FALLBACK;
        }
        return put_bytes(buffer, text, size);
    }
    case OP_BYTES:
        if (!PyBytes_CheckExact(value))
            return FALLBACK;
        return put_bytes(buffer, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value));
    case OP_ENUM: {
        if (!PyUnicode_CheckExact(value))
            return FALLBACK;
        PyObject *index = PyDict_GetItemWithError(PyTuple_GET_ITEM(step, 1), value);
        if (index == NULL)
            return PyErr_Occurred() ? -1 : FALLBACK;
        return put_long(buffer, PyLong_AsLongLong(index));
    }
    case OP_NULLABLE:
        if (value == Py_None)
            return put_byte(buffer, 0);
        if (put_byte(buffer, 2) < 0)
            return -1;
        return write_value(buffer, PyTuple_GET_ITEM(step, 1), value);
    case OP_ARRAY:
        return write_array(buffer, PyTuple_GET_ITEM(step, 1), value);
    case OP_RECORD:
        return write_record(buffer, PyTuple_GET_ITEM(step, 1), value);
    }
    PyErr_Format(PyExc_SystemError, "avro program: unknown opcode %ld", op);
    return -1;
}

typedef struct {
    PyObject_HEAD
    PyObject *program;
    PyObject *prefix;
    PyObject *fallback;
    vectorcallfunc vectorcall;
} Writer;

static PyObject *write_one(Writer *writer, PyObject *record) {
    char stack[STACK_BYTES];
    Buffer buffer = {stack, 0, STACK_BYTES, 0};
    int status = reserve(&buffer, PyBytes_GET_SIZE(writer->prefix));
    if (status == 0) {
        memcpy(buffer.data, PyBytes_AS_STRING(writer->prefix), PyBytes_GET_SIZE(writer->prefix));
        buffer.len = PyBytes_GET_SIZE(writer->prefix);
        status = write_value(&buffer, writer->program, record);
    }
    PyObject *result = NULL;
    if (status == 0)
        result = PyBytes_FromStringAndSize(buffer.data, buffer.len);
    if (buffer.on_heap)
        PyMem_Free(buffer.data);
    if (status == FALLBACK)
        return PyObject_CallOneArg(writer->fallback, record);
    return result;
}

static PyObject *Writer_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    if (PyVectorcall_NARGS(nargsf) != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
        PyErr_SetString(PyExc_TypeError, "write(record) takes exactly one argument");
        return NULL;
    }
    return write_one((Writer *)self, args[0]);
}

static PyObject *Writer_encode_many(Writer *self, PyObject *records) {
    PyObject *sequence = PySequence_Fast(records, "encode_many(records) needs a sequence");
    if (sequence == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(sequence);
    PyObject *result = PyList_New(count);
    for (Py_ssize_t i = 0; result != NULL && i < count; i++) {
        PyObject *encoded = write_one(self, PySequence_Fast_ITEMS(sequence)[i]);
        if (encoded == NULL)
            Py_CLEAR(result);
        else
            PyList_SET_ITEM(result, i, encoded);
    }
    Py_DECREF(sequence);
    return result;
}

static int Writer_init(Writer *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"program", "prefix", "fallback", NULL};
    PyObject *program, *prefix, *fallback;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O!O:Writer", keywords, &PyTuple_Type, &program,
                                     &PyBytes_Type, &prefix, &fallback))
        return -1;
    if (PyTuple_GET_SIZE(program) < 1) {
        PyErr_SetString(PyExc_ValueError, "empty avro program");
        return -1;
    }
    Py_INCREF(program);
    Py_INCREF(prefix);
    Py_INCREF(fallback);
    Py_XSETREF(self->program, program);
    Py_XSETREF(self->prefix, prefix);
    Py_XSETREF(self->fallback, fallback);
    self->vectorcall = Writer_vectorcall;
    return 0;
}

static int Writer_traverse(Writer *self, visitproc visit, void *arg) {
    Py_VISIT(self->program);
    Py_VISIT(self->prefix);
    Py_VISIT(self->fallback);
    return 0;
}

static int Writer_clear(Writer *self) {
    Py_CLEAR(self->program);
    Py_CLEAR(self->prefix);
    Py_CLEAR(self->fallback);
    return 0;
}

static void Writer_dealloc(Writer *self) {
    PyObject_GC_UnTrack(self);
    Writer_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Writer_call(PyObject *self, PyObject *args, PyObject *kwargs) {
    return PyVectorcall_Call(self, args, kwargs);
}

static PyMethodDef Writer_methods[] = {
    {"encode_many", (PyCFunction)Writer_encode_many, METH_O, "encode_many(records) -> list of bytes, one per record"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject WriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "schemas._avro_native.Writer",
    .tp_basicsize = sizeof(Writer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Writer(program, prefix, fallback): write(record) -> prefix + Avro body",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Writer_init,
    .tp_dealloc = (destructor)Writer_dealloc,
    .tp_traverse = (traverseproc)Writer_traverse,
    .tp_clear = (inquiry)Writer_clear,
    .tp_call = Writer_call,
    .tp_vectorcall_offset = offsetof(Writer, vectorcall),
    .tp_methods = Writer_methods,
};

/* ---- the reader ------------------------------------------------------------------------ */

enum { READ_NULL = 0, READ_BOOLEAN = 1, READ_INT = 2, READ_LONG = 3, READ_FLOAT = 4, READ_DOUBLE = 5,
       READ_STRING = 6, READ_BYTES = 7, READ_ENUM = 8, READ_UNION = 9, READ_ARRAY = 10 };

/* bytes the C reader does not read as they are: the call goes to the fallback reader */
#define DECLINE (-2)

typedef struct Step {
    int op;
    Py_ssize_t count;      /* enum: symbols; union: branches */
    PyObject *symbols;     /* enum: the symbol tuple (owned by the program the Reader holds) */
    struct Step *children; /* union: one step per branch; array: the item step */
} Step;

/* What `read_checked` tests a field's value for (see avro_reader.STRING_CHECKS): the codec's
   string rules change nothing in a record whose checked fields all pass. */
enum { CHECK_NONE = 0, CHECK_IDENTIFIER = 1, CHECK_TEXT = 2, CHECK_TEXT_LIST = 3, CHECK_HEX_ID = 4 };

typedef struct {
    PyObject *name; /* NULL: a writer field the reader does not have (read, then dropped) */
    Step step;
    int check;
    Py_ssize_t limit, item_limit;
} Field;

typedef struct {
    const unsigned char *data;
    Py_ssize_t pos;
    Py_ssize_t size;
} Cursor;

static void free_step(Step *step) {
    if (step->children == NULL)
        return;
    Py_ssize_t children = step->op == READ_UNION ? step->count : 1;
    for (Py_ssize_t i = 0; i < children; i++)
        free_step(&step->children[i]);
    PyMem_Free(step->children);
    step->children = NULL;
}

/* `step` from its program tuple (opcode, operand); 0, or -1 with ValueError */
static int build_step(Step *step, PyObject *spec) {
    memset(step, 0, sizeof(*step));
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) < 1) {
        PyErr_SetString(PyExc_ValueError, "avro reader program: a step is an (opcode, operand) tuple");
        return -1;
    }
    long op = PyLong_AsLong(PyTuple_GET_ITEM(spec, 0));
    if (op == -1 && PyErr_Occurred())
        return -1;
    step->op = (int)op;
    if (op >= READ_NULL && op <= READ_BYTES)
        return 0;
    PyObject *operand = PyTuple_GET_SIZE(spec) > 1 ? PyTuple_GET_ITEM(spec, 1) : NULL;
    if (op == READ_ENUM && operand != NULL && PyTuple_Check(operand)) {
        step->symbols = operand;
        step->count = PyTuple_GET_SIZE(operand);
        return 0;
    }
    if (op == READ_ARRAY && operand != NULL) {
        step->children = PyMem_Calloc(1, sizeof(Step));
        if (step->children == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        return build_step(step->children, operand);
    }
    if (op == READ_UNION && operand != NULL && PyTuple_Check(operand)) {
        step->count = PyTuple_GET_SIZE(operand);
        step->children = PyMem_Calloc(step->count ? step->count : 1, sizeof(Step));
        if (step->children == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < step->count; i++)
            if (build_step(&step->children[i], PyTuple_GET_ITEM(operand, i)) < 0)
                return -1;
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "avro reader program: bad step with opcode %ld", op);
    return -1;
}

/* A zig-zag varint as the Python reader reads it: at most 10 bytes, at most 64 bits
   (non-minimal encodings are read, as there). */
static int read_long(Cursor *cursor, int64_t *out) {
    if (cursor->pos >= cursor->size)
        return DECLINE;
    unsigned char byte = cursor->data[cursor->pos++];
    uint64_t value = byte & 0x7F;
    int shift = 7;
    while (byte & 0x80) {
        if (shift > 63 || cursor->pos >= cursor->size)
            return DECLINE;
        byte = cursor->data[cursor->pos++];
        if (shift == 63 && (byte & 0x7F) > 1)
            return DECLINE;
        value |= (uint64_t)(byte & 0x7F) << shift;
        shift += 7;
    }
    *out = (int64_t)(value >> 1) ^ -(int64_t)(value & 1);
    return 0;
}

static int read_fixed(Cursor *cursor, void *out, Py_ssize_t size) {
    if (cursor->size - cursor->pos < size)
        return DECLINE;
#if PY_LITTLE_ENDIAN
    memcpy(out, cursor->data + cursor->pos, size);
#else
    for (Py_ssize_t i = 0; i < size; i++)
        ((unsigned char *)out)[i] = cursor->data[cursor->pos + size - 1 - i];
#endif
    cursor->pos += size;
    return 0;
}

static int read_value(Cursor *cursor, const Step *step, PyObject **out);

static int read_array(Cursor *cursor, const Step *items, PyObject **out) {
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return -1;
    int64_t count;
    int status = read_long(cursor, &count);
    while (status == 0 && count != 0) {
        if (count < 0) {
            int64_t block_bytes; /* the block's size, which a reader may ignore */
            if (count == INT64_MIN) { /* 2**63 items: more than any body holds */
                status = DECLINE;
                break;
            }
            if ((status = read_long(cursor, &block_bytes)) != 0)
                break;
            count = -count;
        }
        /* every item but a null takes a byte: more items than bytes left is a short body
           (and arrays of nulls that long are left to the Python reader) */
        if (count > cursor->size - cursor->pos) {
            status = DECLINE;
            break;
        }
        for (int64_t i = 0; status == 0 && i < count; i++) {
            PyObject *item;
            status = read_value(cursor, items, &item);
            if (status == 0) {
                status = PyList_Append(list, item);
                Py_DECREF(item);
            }
        }
        if (status == 0)
            status = read_long(cursor, &count);
    }
    if (status != 0) {
        Py_DECREF(list);
        return status;
    }
    *out = list;
    return 0;
}

static int read_value(Cursor *cursor, const Step *step, PyObject **out) {
    int64_t number;
    int status;
    switch (step->op) {
    case READ_NULL:
        *out = Py_NewRef(Py_None);
        return 0;
    case READ_BOOLEAN: {
        if (cursor->pos >= cursor->size)
            return DECLINE;
        unsigned char byte = cursor->data[cursor->pos++];
        if (byte > 1)
            return DECLINE;
        *out = Py_NewRef(byte ? Py_True : Py_False);
        return 0;
    }
    case READ_INT:
    case READ_LONG:
        if ((status = read_long(cursor, &number)) != 0)
            return status;
        if (step->op == READ_INT && (number < INT32_MIN || number > INT32_MAX))
            return DECLINE;
        *out = PyLong_FromLongLong(number);
        return *out == NULL ? -1 : 0;
    case READ_FLOAT: {
        float single;
        if ((status = read_fixed(cursor, &single, 4)) != 0)
            return status;
        *out = PyFloat_FromDouble((double)single);
        return *out == NULL ? -1 : 0;
    }
    case READ_DOUBLE: {
        double value;
        if ((status = read_fixed(cursor, &value, 8)) != 0)
            return status;
        *out = PyFloat_FromDouble(value);
        return *out == NULL ? -1 : 0;
    }
    case READ_STRING:
    case READ_BYTES: {
        if ((status = read_long(cursor, &number)) != 0)
            return status;
        if (number < 0 || number > cursor->size - cursor->pos)
            return DECLINE;
        const char *start = (const char *)cursor->data + cursor->pos;
        cursor->pos += (Py_ssize_t)number;
        if (step->op == READ_BYTES) {
            *out = PyBytes_FromStringAndSize(start, (Py_ssize_t)number);
            return *out == NULL ? -1 : 0;
        }
        /* bytes.decode()'s own decoder: strict UTF-8 (no surrogates, no overlong forms) */
        *out = PyUnicode_DecodeUTF8(start, (Py_ssize_t)number, NULL);
        if (*out != NULL)
            return 0;
        if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
            return -1;
        PyErr_Clear();
        return DECLINE;
    }
    case READ_ENUM:
        if ((status = read_long(cursor, &number)) != 0)
            return status;
        if (number < 0 || number >= step->count)
            return DECLINE;
        *out = Py_NewRef(PyTuple_GET_ITEM(step->symbols, (Py_ssize_t)number));
        return 0;
    case READ_UNION:
        if ((status = read_long(cursor, &number)) != 0)
            return status;
        if (number < 0 || number >= step->count)
            return DECLINE;
        return read_value(cursor, &step->children[number], out);
    case READ_ARRAY:
        return read_array(cursor, step->children, out);
    }
    PyErr_Format(PyExc_SystemError, "avro reader program: unknown opcode %d", step->op);
    return -1;
}

typedef struct {
    PyObject_HEAD
    Field *fields;
    Py_ssize_t field_count;
    Py_ssize_t kept; /* fields the record keeps, for the dict's size */
    PyObject *program;  /* the fields tuple: owns the names and enum symbols the steps point to */
    PyObject *defaults; /* ((name, value, copy), ...): reader fields the writer lacks */
    PyObject *fallback;
    PyObject *deepcopy;
    vectorcallfunc vectorcall;
} Reader;

/* printable ASCII without space (a byte in '!'..'~'), or text of at most `limit` characters */
static int ascii_within(PyObject *value, Py_ssize_t limit) {
    return PyUnicode_CheckExact(value) && PyUnicode_IS_ASCII(value) && PyUnicode_GET_LENGTH(value) <= limit;
}

static int passes_check(const Field *field, PyObject *value) {
    switch (field->check) {
    case CHECK_NONE:
        return 1;
    case CHECK_IDENTIFIER: {
        if (value == Py_None || (PyUnicode_CheckExact(value) && PyUnicode_GET_LENGTH(value) == 0))
            return 1;
        if (!ascii_within(value, field->limit))
            return 0;
        const Py_UCS1 *chars = PyUnicode_1BYTE_DATA(value);
        for (Py_ssize_t i = 0, n = PyUnicode_GET_LENGTH(value); i < n; i++)
            if (chars[i] < 0x21 || chars[i] > 0x7E)
                return 0;
        return 1;
    }
    case CHECK_TEXT:
        return value == Py_None || ascii_within(value, field->limit);
    case CHECK_TEXT_LIST: {
        if (!PyList_CheckExact(value) || PyList_GET_SIZE(value) > field->limit)
            return 0;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(value); i++)
            if (!ascii_within(PyList_GET_ITEM(value, i), field->item_limit))
                return 0;
        return 1;
    }
    case CHECK_HEX_ID: {
        if (value == Py_None)
            return 1;
        if (!ascii_within(value, field->limit) || PyUnicode_GET_LENGTH(value) != field->limit)
            return 0;
        const Py_UCS1 *chars = PyUnicode_1BYTE_DATA(value);
        int nonzero = 0;
        for (Py_ssize_t i = 0; i < field->limit; i++) {
            if (!((chars[i] >= '0' && chars[i] <= '9') || (chars[i] >= 'a' && chars[i] <= 'f')))
                return 0;
            nonzero |= chars[i] != '0';
        }
        return nonzero;
    }
    }
    return 0;
}

/* the record at `cursor` into a new dict, or DECLINE / -1; with `passed`, whether every
   checked field passed its check */
static int read_record(Reader *reader, Cursor *cursor, PyObject **out, int *passed) {
    PyObject *record = _PyDict_NewPresized(reader->kept + PyTuple_GET_SIZE(reader->defaults));
    if (record == NULL)
        return -1;
    int status = 0;
    for (Py_ssize_t i = 0; status == 0 && i < reader->field_count; i++) {
        PyObject *value;
        status = read_value(cursor, &reader->fields[i].step, &value);
        if (status != 0)
            break;
        if (passed != NULL && *passed && !passes_check(&reader->fields[i], value))
            *passed = 0;
        if (reader->fields[i].name != NULL)
            status = PyDict_SetItem(record, reader->fields[i].name, value);
        Py_DECREF(value);
    }
    for (Py_ssize_t i = 0; status == 0 && i < PyTuple_GET_SIZE(reader->defaults); i++) {
        PyObject *entry = PyTuple_GET_ITEM(reader->defaults, i);
        PyObject *value = PyTuple_GET_ITEM(entry, 1);
        if (PyObject_IsTrue(PyTuple_GET_ITEM(entry, 2)))
            value = PyObject_CallOneArg(reader->deepcopy, value); /* each record its own list */
        else
            Py_INCREF(value);
        if (value == NULL) {
            status = -1;
            break;
        }
        status = PyDict_SetItem(record, PyTuple_GET_ITEM(entry, 0), value);
        Py_DECREF(value);
    }
    if (status != 0) {
        Py_DECREF(record);
        return status;
    }
    *out = record;
    return 0;
}

/* `read`'s arguments checked: 1 with the cursor set, 0 where the fallback reads them */
static int reader_cursor(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, Cursor *cursor) {
    if (nargs < 1 || nargs > 2 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0))
        return 0;
    PyObject *data = args[0];
    Py_ssize_t pos = 0;
    if (nargs == 2) {
        if (!PyLong_CheckExact(args[1]))
            return 0;
        pos = PyLong_AsSsize_t(args[1]);
        if (pos == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
    }
    if (!PyBytes_CheckExact(data) || pos < 0)
        return 0;
    cursor->data = (const unsigned char *)PyBytes_AS_STRING(data);
    cursor->pos = pos;
    cursor->size = PyBytes_GET_SIZE(data);
    return 1;
}

/* (record, end) or, with `passed`, (record, end, passed) */
static PyObject *read_result(Reader *reader, PyObject *const *args, size_t nargsf, PyObject *kwnames,
                             int *passed) {
    Cursor cursor;
    PyObject *record;
    int status = DECLINE;
    if (reader_cursor(args, PyVectorcall_NARGS(nargsf), kwnames, &cursor))
        status = read_record(reader, &cursor, &record, passed);
    if (status == DECLINE) {
        PyObject *read = PyObject_Vectorcall(reader->fallback, args, nargsf, kwnames);
        if (read == NULL || passed == NULL || !PyTuple_Check(read) || PyTuple_GET_SIZE(read) != 2)
            return read;
        /* the fallback's record is not checked: the caller applies the rules itself */
        PyObject *result = PyTuple_Pack(3, PyTuple_GET_ITEM(read, 0), PyTuple_GET_ITEM(read, 1), Py_False);
        Py_DECREF(read);
        return result;
    }
    if (status != 0)
        return NULL;
    PyObject *end = PyLong_FromSsize_t(cursor.pos);
    PyObject *result = end == NULL ? NULL : PyTuple_New(passed == NULL ? 2 : 3);
    if (result == NULL) {
        Py_DECREF(record);
        Py_XDECREF(end);
        return NULL;
    }
    PyTuple_SET_ITEM(result, 0, record);
    PyTuple_SET_ITEM(result, 1, end);
    if (passed != NULL)
        PyTuple_SET_ITEM(result, 2, Py_NewRef(*passed ? Py_True : Py_False));
    return result;
}

static PyObject *Reader_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    return read_result((Reader *)self, args, nargsf, kwnames, NULL);
}

static PyObject *Reader_read_checked(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int passed = 1;
    if (((Reader *)self)->vectorcall == NULL) {
        PyErr_SetString(PyExc_TypeError, "Reader was not initialised");
        return NULL;
    }
    return read_result((Reader *)self, args, (size_t)nargs, NULL, &passed);
}

static void Reader_free_fields(Reader *self) {
    for (Py_ssize_t i = 0; self->fields != NULL && i < self->field_count; i++)
        free_step(&self->fields[i].step);
    PyMem_Free(self->fields);
    self->fields = NULL;
    self->field_count = 0;
}

/* a field's check from (kind, limit, item limit) or None; 0, or -1 with ValueError */
static int set_check(Field *field, PyObject *spec) {
    if (spec == Py_None)
        return 0;
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 3 ||
        !PyArg_ParseTuple(spec, "inn", &field->check, &field->limit, &field->item_limit)) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "avro reader program: a check is (kind, limit, item limit) or None");
        return -1;
    }
    if (field->check < CHECK_NONE || field->check > CHECK_HEX_ID) {
        PyErr_Format(PyExc_ValueError, "avro reader program: unknown check %d", field->check);
        return -1;
    }
    return 0;
}

static int Reader_init(Reader *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"fields", "defaults", "fallback", "deepcopy", "checks", NULL};
    PyObject *program, *defaults, *fallback, *deepcopy, *checks = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O!OO|O!:Reader", keywords, &PyTuple_Type, &program,
                                     &PyTuple_Type, &defaults, &fallback, &deepcopy, &PyTuple_Type, &checks))
        return -1;
    if (checks != NULL && PyTuple_GET_SIZE(checks) != PyTuple_GET_SIZE(program)) {
        PyErr_SetString(PyExc_ValueError, "avro reader program: one check per field");
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(defaults); i++) {
        PyObject *entry = PyTuple_GET_ITEM(defaults, i);
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 3 || !PyUnicode_Check(PyTuple_GET_ITEM(entry, 0))) {
            PyErr_SetString(PyExc_ValueError, "avro reader program: a default is (name, value, copy)");
            return -1;
        }
    }
    Reader_free_fields(self);
    Py_ssize_t count = PyTuple_GET_SIZE(program);
    self->fields = PyMem_Calloc(count ? count : 1, sizeof(Field));
    if (self->fields == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->field_count = count;
    self->kept = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *spec = PyTuple_GET_ITEM(program, i);
        if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 2 ||
            (PyTuple_GET_ITEM(spec, 0) != Py_None && !PyUnicode_Check(PyTuple_GET_ITEM(spec, 0)))) {
            PyErr_SetString(PyExc_ValueError, "avro reader program: a field is (name or None, step)");
            Reader_free_fields(self);
            return -1;
        }
        if (build_step(&self->fields[i].step, PyTuple_GET_ITEM(spec, 1)) < 0) {
            Reader_free_fields(self);
            return -1;
        }
        if (PyTuple_GET_ITEM(spec, 0) != Py_None) {
            self->fields[i].name = PyTuple_GET_ITEM(spec, 0);
            self->kept++;
        }
        if (checks != NULL && set_check(&self->fields[i], PyTuple_GET_ITEM(checks, i)) < 0) {
            Reader_free_fields(self);
            return -1;
        }
    }
    Py_INCREF(program);
    Py_INCREF(defaults);
    Py_INCREF(fallback);
    Py_INCREF(deepcopy);
    Py_XSETREF(self->program, program);
    Py_XSETREF(self->defaults, defaults);
    Py_XSETREF(self->fallback, fallback);
    Py_XSETREF(self->deepcopy, deepcopy);
    self->vectorcall = Reader_vectorcall;
    return 0;
}

static int Reader_traverse(Reader *self, visitproc visit, void *arg) {
    Py_VISIT(self->program);
    Py_VISIT(self->defaults);
    Py_VISIT(self->fallback);
    Py_VISIT(self->deepcopy);
    return 0;
}

static int Reader_clear(Reader *self) {
    Reader_free_fields(self);
    Py_CLEAR(self->program);
    Py_CLEAR(self->defaults);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->deepcopy);
    return 0;
}

static void Reader_dealloc(Reader *self) {
    PyObject_GC_UnTrack(self);
    Reader_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Reader_call(PyObject *self, PyObject *args, PyObject *kwargs) {
    Reader *reader = (Reader *)self;
    if (reader->vectorcall == NULL) {
        PyErr_SetString(PyExc_TypeError, "Reader was not initialised");
        return NULL;
    }
    return PyVectorcall_Call(self, args, kwargs);
}

static PyMethodDef Reader_methods[] = {
    {"read_checked", (PyCFunction)(void (*)(void))Reader_read_checked, METH_FASTCALL,
     "read_checked(data, pos=0) -> (record, end, passed): as read, and whether every field with a check "
     "passed it (False where the fallback read the record)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "schemas._avro_native.Reader",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Reader(fields, defaults, fallback, deepcopy): read(data, pos=0) -> (record, end)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Reader_init,
    .tp_dealloc = (destructor)Reader_dealloc,
    .tp_traverse = (traverseproc)Reader_traverse,
    .tp_clear = (inquiry)Reader_clear,
    .tp_call = Reader_call,
    .tp_vectorcall_offset = offsetof(Reader, vectorcall),
    .tp_methods = Reader_methods,
};

/* ---- Avro length prefixes in undecodable bytes (schemas/dlq.py) ----------------------- */

static int is_text_byte(unsigned char byte) {
    return (byte >= 0x20 && byte != 0x7F) || byte == 9 || byte == 10 || byte == 13;
}

/* schemas.dlq.avro_length_bytes_python, byte for byte the same answer (see its docstring;
   tests/test_dlq_native.py): that loop cost ~2 ms per 3 KB DLQ record, a flood of such
   records a stall. */
static PyObject *avro_length_bytes(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *data = view.buf;
    Py_ssize_t size = view.len;
    Py_ssize_t *text_end = PyMem_Malloc((size + 1) * sizeof(Py_ssize_t));
    unsigned char *ends = PyMem_Calloc(size + 1, 1);
    PyObject *found = PyList_New(0);
    if (text_end == NULL || ends == NULL || found == NULL) {
        PyMem_Free(text_end);
        PyMem_Free(ends);
        Py_XDECREF(found);
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    text_end[size] = size;
    ends[size] = 1;
    for (Py_ssize_t at = size - 1; at >= 0; at--) {
        int text = is_text_byte(data[at]);
        text_end[at] = text ? text_end[at + 1] : at;
        ends[at] = !text;
    }
    for (Py_ssize_t at = size - 1; at >= 0; at--) {
        uint64_t value = 0;
        int shift = 0, terminated = 0;
        Py_ssize_t width = 0;
        while (at + width < size && width < 3) {
            unsigned char byte = data[at + width];
            value |= (uint64_t)(byte & 0x7F) << shift;
            shift += 7;
            width++;
            if (!(byte & 0x80)) {
                terminated = 1;
                break;
            }
        }
        if (!terminated || (value & 1) || value < 12)
            continue;
        Py_ssize_t start = at + width, end = start + (Py_ssize_t)(value >> 1);
        int cut_short = end >= size && text_end[start] == size && (at == 0 || !is_text_byte(data[at - 1]));
        if (start < size && (cut_short || (end < size && ends[end] && text_end[start] >= end))) {
            ends[at] = 1;
            PyObject *pair = Py_BuildValue("(nn)", at, start);
            if (pair == NULL || PyList_Append(found, pair) < 0) {
                Py_XDECREF(pair);
                Py_CLEAR(found);
                break;
            }
            Py_DECREF(pair);
        }
    }
    PyMem_Free(text_end);
    PyMem_Free(ends);
    PyBuffer_Release(&view);
    return found;
}

static PyMethodDef module_functions[] = {
    {"avro_length_bytes", avro_length_bytes, METH_O,
     "avro_length_bytes(data) -> [(prefix start, text start)], as schemas.dlq.avro_length_bytes_python"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "schemas._avro_native",
                                    "The Avro writer of schemas/avro_encoder.py and the reader of schemas/avro_reader.py in C.", -1,
                                    module_functions};

PyMODINIT_FUNC PyInit__avro_native(void) {
    if (PyType_Ready(&WriterType) < 0 || PyType_Ready(&ReaderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&WriterType);
    if (PyModule_AddObject(m, "Writer", (PyObject *)&WriterType) < 0) {
        Py_DECREF(&WriterType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&ReaderType);
    if (PyModule_AddObject(m, "Reader", (PyObject *)&ReaderType) < 0) {
        Py_DECREF(&ReaderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
