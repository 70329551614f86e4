/* The Avro writer of schemas/avro_encoder.py (`compile_writer`) in C, for EventProducer's
   hot path: the generated Python writer was ~17% of an ingestion request's CPU (~7 us/event).

   `Writer(program, prefix, fallback)` is callable as `write(record) -> bytes`: `prefix` (the
   wire-format header), then the Avro body of `record` as the program describes it.
   avro_encoder.native_program builds the program once per schema from the same subset the
   generated writer covers; each step is a tuple whose first item is an opcode below.

   Only exact built-in types take the C path (dict, str, int, float, bool, bytes, list, tuple,
   None). Any other value, a missing key, an int beyond 64 bits or text that is not valid
   UTF-8 sends the whole record to `fallback` (the generated Python writer), so the bytes and
   the exception of every odd record are the Python writer's own (tests/test_avro_native.py). */

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

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "schemas._avro_native",
                                    "The Avro writer of schemas/avro_encoder.py in C.", -1, NULL};

PyMODINIT_FUNC PyInit__avro_native(void) {
    if (PyType_Ready(&WriterType) < 0)
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
    return m;
}
