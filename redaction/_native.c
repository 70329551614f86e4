/* Native half of the fast redaction tier: the gate's scan and match callback, and the window loop.

   `engine.Redactor._hit_sink` (Python) and `HitSink` (here) must give the same windows,
   name positions and status for every text; tests/test_redaction_native.py runs both on the
   corpora and on fuzzed strings. The Python code stays the reference and the fallback: keep
   the two in step when either changes.

   Per text: the gate reports each hit (in end order) to the sink. A detector hit opens the
   window [end - pad_before, last_end + pad_after] of its detector or extends that detector's
   last window; a name-word, cue or weak-cue hit becomes a position for the names tier. Then
   `find` runs each detector's finder (Python) on its merged windows.

   Where setup.py found libhs's header (GATEWATCH_HYPERSCAN), the gate's databases are
   compiled and scanned here too (`compile_database`, `Tables.scan`): hyperscan calls the
   sink's C callback directly. Otherwise the `hyperscan` package scans and calls the sink
   object once per hit. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <structmember.h>
#ifdef GATEWATCH_HYPERSCAN
#include <hs/hs.h>
#endif

enum { KIND_DETECTOR = 0, KIND_WORD = 1, KIND_CUE = 2, KIND_WEAK = 3, KIND_RUN = 4 };

/* ---- A growable array of offsets ------------------------------------------------------- */

typedef struct {
    Py_ssize_t count, capacity;
    Py_ssize_t *items;
} Offsets;

/* Appends n (1 or 2) values; makes no Python object (hyperscan's callback calls it). */
static int offsets_push(Offsets *offsets, Py_ssize_t a, Py_ssize_t b, int n) {
    if (offsets->count + n > offsets->capacity) {
        Py_ssize_t capacity = offsets->capacity ? 2 * offsets->capacity : 8;
        Py_ssize_t *items = PyMem_Realloc(offsets->items, capacity * sizeof(Py_ssize_t));
        if (items == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        offsets->items = items;
        offsets->capacity = capacity;
    }
    offsets->items[offsets->count++] = a;
    if (n == 2)
        offsets->items[offsets->count++] = b;
    return 0;
}

/* ---- Hyperscan databases (compiled with libhs itself) ---------------------------------- */

#ifdef GATEWATCH_HYPERSCAN
typedef struct {
    PyObject_HEAD
    hs_database_t *db;
} Database;

static PyTypeObject DatabaseType;

static void database_dealloc(Database *self) {
    if (self->db != NULL)
        hs_free_database(self->db);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *database_wrap(hs_database_t *db) {
    Database *self = PyObject_New(Database, &DatabaseType);
    if (self == NULL) {
        hs_free_database(db);
        return NULL;
    }
    self->db = db;
    return (PyObject *)self;
}

static PyObject *database_serialize(Database *self, PyObject *Py_UNUSED(ignored)) {
    char *bytes = NULL;
    size_t length = 0;
    if (hs_serialize_database(self->db, &bytes, &length) != HS_SUCCESS) {
        PyErr_SetString(PyExc_RuntimeError, "hyperscan could not serialize the database");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(bytes, (Py_ssize_t)length);
    free(bytes);  /* (hyperscan's default allocator is malloc) */
    return out;
}

static PyMethodDef database_methods[] = {
    {"serialize", (PyCFunction)database_serialize, METH_NOARGS, "the database as bytes (load_database reads them)"},
    {NULL},
};

static PyTypeObject DatabaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "redaction._native.Database",
    .tp_basicsize = sizeof(Database),
    .tp_dealloc = (destructor)database_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A block-mode hyperscan database (compile_database, load_database).",
    .tp_methods = database_methods,
};

/* compile_database(expressions, flags, ids, literal): what the hyperscan package's
   Database.compile makes of the same arguments (hs_compile_multi, or hs_compile_lit_multi for
   literals), block mode, for the host platform. */
static PyObject *compile_database(PyObject *module, PyObject *args) {
    PyObject *expressions_arg, *flags_arg, *ids_arg;
    int literal;
    if (!PyArg_ParseTuple(args, "OOOp", &expressions_arg, &flags_arg, &ids_arg, &literal))
        return NULL;
    PyObject *expressions = PySequence_Fast(expressions_arg, "expressions must be a sequence");
    PyObject *flags_seq = expressions ? PySequence_Fast(flags_arg, "flags must be a sequence") : NULL;
    PyObject *ids_seq = flags_seq ? PySequence_Fast(ids_arg, "ids must be a sequence") : NULL;
    const char **patterns = NULL;
    size_t *lengths = NULL;
    unsigned int *flags = NULL, *ids = NULL;
    PyObject *out = NULL;
    if (ids_seq == NULL)
        goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(expressions);
    if (n == 0 || PySequence_Fast_GET_SIZE(flags_seq) != n || PySequence_Fast_GET_SIZE(ids_seq) != n) {
        PyErr_SetString(PyExc_ValueError, "one flag and one id per expression, at least one expression");
        goto done;
    }
    patterns = PyMem_Calloc(n, sizeof(char *));
    lengths = PyMem_Calloc(n, sizeof(size_t));
    flags = PyMem_Calloc(n, sizeof(unsigned int));
    ids = PyMem_Calloc(n, sizeof(unsigned int));
    if (!patterns || !lengths || !flags || !ids) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *expression = PySequence_Fast_GET_ITEM(expressions, i);
        if (!PyBytes_Check(expression)) {
            PyErr_SetString(PyExc_TypeError, "expressions must be bytes");
            goto done;
        }
        patterns[i] = PyBytes_AS_STRING(expression);  /* (NUL-terminated, as hs_compile_multi wants) */
        lengths[i] = (size_t)PyBytes_GET_SIZE(expression);
        flags[i] = (unsigned int)PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(flags_seq, i));
        ids[i] = (unsigned int)PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(ids_seq, i));
        if (PyErr_Occurred())
            goto done;
    }
    hs_database_t *db = NULL;
    hs_compile_error_t *error = NULL;
    hs_error_t rc;
    Py_BEGIN_ALLOW_THREADS  /* (the names literal set takes seconds; expressions stays referenced) */
    if (literal)
        rc = hs_compile_lit_multi(patterns, flags, ids, lengths, (unsigned int)n, HS_MODE_BLOCK, NULL, &db, &error);
    else
        rc = hs_compile_multi(patterns, flags, ids, (unsigned int)n, HS_MODE_BLOCK, NULL, &db, &error);
    Py_END_ALLOW_THREADS
    if (rc != HS_SUCCESS) {
        PyErr_Format(PyExc_ValueError, "hyperscan could not compile expression %d: %s",
                     error ? error->expression : -1, error ? error->message : "unknown error");
        hs_free_compile_error(error);
        goto done;
    }
    out = database_wrap(db);
done:
    PyMem_Free(patterns);
    PyMem_Free(lengths);
    PyMem_Free(flags);
    PyMem_Free(ids);
    Py_XDECREF(expressions);
    Py_XDECREF(flags_seq);
    Py_XDECREF(ids_seq);
    return out;
}

/* load_database(data): a database from Database.serialize()'s bytes (ValueError if libhs
   cannot read them: another version or platform). */
static PyObject *load_database(PyObject *module, PyObject *arg) {
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "load_database takes bytes");
        return NULL;
    }
    hs_database_t *db = NULL;
    if (hs_deserialize_database(PyBytes_AS_STRING(arg), (size_t)PyBytes_GET_SIZE(arg), &db) != HS_SUCCESS) {
        PyErr_SetString(PyExc_ValueError, "not a hyperscan database of this version and platform");
        return NULL;
    }
    return database_wrap(db);
}
#endif

/* ---- Tables: what each gate pattern id means; built once per Redactor, read-only after. */

typedef struct {
    PyObject_HEAD
    Py_ssize_t patterns;
    unsigned char *kind;
    Py_ssize_t *payload;   /* detector index (detector, run) or literal length (word) */
    PyObject *cues;        /* tuple: the cue phrase of each pattern id (None for others) */
    Py_ssize_t detectors;
    Py_ssize_t *pad_before;
    Py_ssize_t *pad_after;
    Py_ssize_t limit;      /* hits at which the scan stops (Gate.max_hits) */
    PyObject *databases;   /* tuple of Database, scanned in order by Tables.scan (may be empty) */
#ifdef GATEWATCH_HYPERSCAN
    hs_scratch_t *scratch; /* for all the databases; cloned when busy (see scratch_take) */
    int scratch_busy;
#endif
} Tables;

typedef struct {
    PyObject_HEAD
    Tables *tables;
    PyObject *text;
    PyObject *data;
    const unsigned char *buf;
    Py_ssize_t size;
    int ascii_only;
    int surrogates;        /* the bytes hold surrogatepass-encoded surrogates (invalid UTF-8) */
    Py_ssize_t hits;
    Py_ssize_t previous;
    int too_many, out_of_order, any, stopped;
    Offsets *windows;      /* one per detector: lo, hi pairs (byte offsets, before clamping) */
    Py_ssize_t *order;     /* detector indexes in the order of their first hit */
    Py_ssize_t opened;
    /* The names tier's positions as byte offsets; turned into character offsets (Python
       lists) when first read, so that a hit makes no Python object. */
    Offsets given, cues, weak;  /* cues: (byte offset, pattern id) pairs */
    PyObject *given_words, *cue_ends, *weak_starts;
} Sink;

static PyTypeObject TablesType;
static PyTypeObject SinkType;

static void tables_dealloc(Tables *self) {
    PyMem_Free(self->kind);
    PyMem_Free(self->payload);
    PyMem_Free(self->pad_before);
    PyMem_Free(self->pad_after);
    Py_XDECREF(self->cues);
#ifdef GATEWATCH_HYPERSCAN
    if (self->scratch != NULL)
        hs_free_scratch(self->scratch);
#endif
    Py_XDECREF(self->databases);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Tables.databases: Database objects, and a scratch space that fits each of them. */
static int tables_take_databases(Tables *self, PyObject *databases) {
    self->databases = PySequence_Tuple(databases);
    if (self->databases == NULL)
        return -1;
    Py_ssize_t n = PyTuple_GET_SIZE(self->databases);
#ifdef GATEWATCH_HYPERSCAN
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *db = PyTuple_GET_ITEM(self->databases, i);
        if (!PyObject_TypeCheck(db, &DatabaseType)) {
            PyErr_SetString(PyExc_TypeError, "databases must be redaction._native.Database objects");
            return -1;
        }
        if (hs_alloc_scratch(((Database *)db)->db, &self->scratch) != HS_SUCCESS) {
            PyErr_SetString(PyExc_MemoryError, "hyperscan could not allocate scratch space");
            return -1;
        }
    }
#else
    if (n > 0) {
        PyErr_SetString(PyExc_RuntimeError, "this build of redaction._native has no hyperscan");
        return -1;
    }
#endif
    return 0;
}

/* Tables(kinds, pads, limit, databases=()): kinds a sequence of (kind, payload) per gate
   pattern id, with payload the detector index (detector, run), the literal's length in bytes
   (word), the cue phrase (cue) or None (weak cue); pads a sequence of (pad_before, pad_after)
   per detector; databases the gate's compiled databases for Tables.scan, in scan order. */
static PyObject *tables_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *kinds, *pads, *databases = NULL;
    Py_ssize_t limit;
    static char *names[] = {"kinds", "pads", "limit", "databases", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOn|O", names, &kinds, &pads, &limit, &databases))
        return NULL;
    PyObject *kinds_seq = PySequence_Fast(kinds, "kinds must be a sequence");
    if (kinds_seq == NULL)
        return NULL;
    PyObject *pads_seq = PySequence_Fast(pads, "pads must be a sequence");
    if (pads_seq == NULL) {
        Py_DECREF(kinds_seq);
        return NULL;
    }
    Tables *self = (Tables *)type->tp_alloc(type, 0);
    if (self == NULL)
        goto fail;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(kinds_seq);
    Py_ssize_t d = PySequence_Fast_GET_SIZE(pads_seq);
    self->patterns = n;
    self->detectors = d;
    self->limit = limit;
    self->kind = PyMem_Calloc(n ? n : 1, 1);
    self->payload = PyMem_Calloc(n ? n : 1, sizeof(Py_ssize_t));
    self->pad_before = PyMem_Calloc(d ? d : 1, sizeof(Py_ssize_t));
    self->pad_after = PyMem_Calloc(d ? d : 1, sizeof(Py_ssize_t));
    self->cues = PyTuple_New(n);
    if (!self->kind || !self->payload || !self->pad_before || !self->pad_after || !self->cues) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(kinds_seq, i);
        PyObject *kind_obj, *payload;
        if (!PyArg_ParseTuple(item, "OO", &kind_obj, &payload))
            goto fail;
        long kind = PyLong_AsLong(kind_obj);
        if (kind == -1 && PyErr_Occurred())
            goto fail;
        if (kind < KIND_DETECTOR || kind > KIND_RUN) {
            PyErr_Format(PyExc_ValueError, "unknown gate pattern kind %ld", kind);
            goto fail;
        }
        self->kind[i] = (unsigned char)kind;
        PyObject *cue = Py_None;
        if (kind == KIND_CUE) {
            cue = payload;
        } else if (kind != KIND_WEAK) {
            Py_ssize_t value = PyLong_AsSsize_t(payload);
            if (value == -1 && PyErr_Occurred())
                goto fail;
            if (kind != KIND_WORD && (value < 0 || value >= d)) {
                PyErr_SetString(PyExc_ValueError, "detector index out of range");
                goto fail;
            }
            self->payload[i] = value;
        }
        Py_INCREF(cue);
        PyTuple_SET_ITEM(self->cues, i, cue);
    }
    for (Py_ssize_t i = 0; i < d; i++) {
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(pads_seq, i), "nn", &self->pad_before[i], &self->pad_after[i]))
            goto fail;
    }
    PyObject *given = databases == NULL || databases == Py_None ? PyTuple_New(0) : Py_NewRef(databases);
    int taken = given != NULL ? tables_take_databases(self, given) : -1;
    Py_XDECREF(given);
    if (taken < 0)
        goto fail;
    Py_DECREF(kinds_seq);
    Py_DECREF(pads_seq);
    return (PyObject *)self;
fail:
    Py_DECREF(kinds_seq);
    Py_DECREF(pads_seq);
    Py_XDECREF(self);
    return NULL;
}

/* ---- Sink ---------------------------------------------------------------------------- */

static void sink_dealloc(Sink *self) {
    if (self->windows != NULL) {
        Py_ssize_t detectors = self->tables ? self->tables->detectors : 0;
        for (Py_ssize_t i = 0; i < detectors; i++)
            PyMem_Free(self->windows[i].items);
        PyMem_Free(self->windows);
    }
    PyMem_Free(self->order);
    PyMem_Free(self->given.items);
    PyMem_Free(self->cues.items);
    PyMem_Free(self->weak.items);
    Py_CLEAR(self->tables);
    Py_CLEAR(self->text);
    Py_CLEAR(self->data);
    Py_CLEAR(self->given_words);
    Py_CLEAR(self->cue_ends);
    Py_CLEAR(self->weak_starts);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A new sink for one text; data is text.encode("utf-8", "surrogatepass"). */
static Sink *sink_new(Tables *tables, PyObject *text, PyObject *data) {
    Sink *self = PyObject_New(Sink, &SinkType);
    if (self == NULL)
        return NULL;
    Py_INCREF(tables);
    self->tables = tables;
    Py_INCREF(text);
    self->text = text;
    Py_INCREF(data);
    self->data = data;
    self->buf = (const unsigned char *)PyBytes_AS_STRING(data);
    self->size = PyBytes_GET_SIZE(data);
    self->ascii_only = self->size == PyUnicode_GET_LENGTH(text);
    self->surrogates = 0;
    if (!self->ascii_only) {
        for (Py_ssize_t i = 0; i + 1 < self->size; i++) {
            if (self->buf[i] == 0xED && self->buf[i + 1] >= 0xA0) {
                self->surrogates = 1;
                break;
            }
        }
    }
    self->hits = 0;
    self->previous = 0;
    self->too_many = self->out_of_order = self->any = self->stopped = 0;
    self->opened = 0;
    memset(&self->given, 0, sizeof(Offsets));
    memset(&self->cues, 0, sizeof(Offsets));
    memset(&self->weak, 0, sizeof(Offsets));
    self->given_words = self->cue_ends = self->weak_starts = NULL;
    self->windows = PyMem_Calloc(tables->detectors ? tables->detectors : 1, sizeof(Offsets));
    self->order = PyMem_Calloc(tables->detectors ? tables->detectors : 1, sizeof(Py_ssize_t));
    if (!self->windows || !self->order) {
        Py_DECREF(self);
        PyErr_NoMemory();
        return NULL;
    }
    return self;
}

/* tables.sink(text, data): a new sink for one text, for hyperscan's binding to call per hit. */
static PyObject *tables_sink(Tables *tables, PyObject *args) {
    PyObject *text, *data;
    if (!PyArg_ParseTuple(args, "UO!", &text, &PyBytes_Type, &data))
        return NULL;
    return (PyObject *)sink_new(tables, text, data);
}

/* len(data[:offset].decode("utf-8", "ignore")): the character offset of a byte offset. */
static Py_ssize_t to_char(Sink *self, Py_ssize_t offset) {
    if (self->ascii_only)
        return offset;  /* (as the Python sink: no slicing, so no clamping either) */
    Py_ssize_t size = self->size;
    if (offset < 0) {  /* data[:offset] */
        offset += size;
        if (offset < 0)
            offset = 0;
    }
    if (offset > size)
        offset = size;
    if (self->surrogates) {
        /* Invalid UTF-8 in the bytes: let the decoder itself say what "ignore" keeps. */
        PyObject *decoded = PyUnicode_DecodeUTF8((const char *)self->buf, offset, "ignore");
        if (decoded == NULL)
            return -1;
        Py_ssize_t length = PyUnicode_GET_LENGTH(decoded);
        Py_DECREF(decoded);
        return length;
    }
    /* Valid UTF-8: one character per lead byte, less a last character cut by the offset. */
    const unsigned char *buf = self->buf;
    Py_ssize_t chars = 0, last_lead = -1;
    for (Py_ssize_t i = 0; i < offset; i++) {
        if ((buf[i] & 0xC0) != 0x80) {
            chars++;
            last_lead = i;
        }
    }
    if (last_lead >= 0) {
        unsigned char lead = buf[last_lead];
        Py_ssize_t length = lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4;
        if (last_lead + length > offset)
            chars--;
    }
    return chars;
}

static int word_byte(unsigned char b) {
    return b >= 0x80 || (b >= '0' && b <= '9') || (b >= 'a' && b <= 'z') || (b >= 'A' && b <= 'Z') || b == '_';
}

static int open_window(Sink *self, Py_ssize_t detector, Py_ssize_t lo, Py_ssize_t hi) {
    Offsets *mine = &self->windows[detector];
    if (mine->count > 0) {
        Py_ssize_t *last_hi = &mine->items[mine->count - 1];
        if (lo <= *last_hi) {
            if (hi > *last_hi)
                *last_hi = hi;
            return 0;
        }
    } else {
        self->order[self->opened++] = detector;
    }
    return offsets_push(mine, lo, hi, 2);
}

/* One gate hit (byte offset of its end): 1 to stop the scan, 0 to go on, -1 on an error.
   Makes no Python object: hyperscan's callback calls it. */
static int sink_hit(Sink *self, Py_ssize_t pattern_id, Py_ssize_t end) {
    Tables *tables = self->tables;
    self->hits++;
    if (self->hits >= tables->limit) {
        self->too_many = 1;
        return 1;  /* stop: the caller runs every detector on the whole text */
    }
    if (pattern_id < 0 || pattern_id >= tables->patterns) {
        PyErr_SetString(PyExc_IndexError, "gate pattern id out of range");
        return -1;
    }
    if (end < 0 || end > self->size) {
        PyErr_SetString(PyExc_IndexError, "gate hit outside the text");
        return -1;
    }
    const unsigned char *buf = self->buf;
    int kind = tables->kind[pattern_id];
    Py_ssize_t payload = tables->payload[pattern_id];
    if (kind == KIND_WORD) {
        Py_ssize_t start = end - payload;
        if (start > 0 && word_byte(buf[start - 1]))
            return 0;  /* "Anna" inside "Hanna" */
        if (end < self->size && word_byte(buf[end]))
            return 0;  /* "Ann" in "Announcement" */
        self->any = 1;
        return offsets_push(&self->given, start, 0, 1);
    }
    if (end < self->previous) {
        self->out_of_order = 1;
        return 1;
    }
    self->previous = end;
    self->any = 1;
    if (kind == KIND_DETECTOR || kind == KIND_RUN) {
        Py_ssize_t last_end = end;
        if (kind == KIND_RUN) {  /* the run gate's extension: \d* (ASCII digits: a bytes pattern) */
            while (last_end < self->size && buf[last_end] >= '0' && buf[last_end] <= '9')
                last_end++;
        }
        return open_window(self, payload, end - tables->pad_before[payload], last_end + tables->pad_after[payload]);
    }
    Py_ssize_t last = end - 1 >= 0 ? end - 1 : end - 1 + self->size;
    Py_ssize_t at = buf[last] < 0x80 ? end - 1 : end - 2;
    if (kind == KIND_CUE)
        return offsets_push(&self->cues, at, pattern_id, 2);
    return offsets_push(&self->weak, at, 0, 1);
}

/* One gate hit as hyperscan's binding passes it: (pattern_id, start, end, flags, context).
   Returns True to stop the scan. */
static PyObject *sink_call(Sink *self, PyObject *args, PyObject *kwds) {
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "the sink takes no keyword arguments");
        return NULL;
    }
    if (!PyTuple_Check(args) || PyTuple_GET_SIZE(args) < 3) {
        PyErr_SetString(PyExc_TypeError, "the sink takes (pattern_id, start, end, flags, context)");
        return NULL;
    }
    Py_ssize_t pattern_id = PyLong_AsSsize_t(PyTuple_GET_ITEM(args, 0));
    if (pattern_id == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t end = PyLong_AsSsize_t(PyTuple_GET_ITEM(args, 2));
    if (end == -1 && PyErr_Occurred())
        return NULL;
    int rc = sink_hit(self, pattern_id, end);
    if (rc < 0)
        return NULL;
    return PyBool_FromLong(rc);
}

/* The character offsets of `offsets` (every `stride`-th value), as a new list; with cues,
   (offset, cue phrase of the pattern id that follows each offset) pairs. */
static PyObject *char_positions(Sink *self, const Offsets *offsets, int stride, int cues) {
    PyObject *list = PyList_New(offsets->count / stride);
    if (list == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < offsets->count; i += stride) {
        Py_ssize_t at = to_char(self, offsets->items[i]);
        if (at < 0 && PyErr_Occurred())
            goto fail;
        PyObject *item = cues ? Py_BuildValue("(nO)", at, PyTuple_GET_ITEM(self->tables->cues, offsets->items[i + 1]))
                              : PyLong_FromSsize_t(at);
        if (item == NULL)
            goto fail;
        PyList_SET_ITEM(list, i / stride, item);
    }
    return list;
fail:
    Py_DECREF(list);
    return NULL;
}

static PyObject *sink_given_words(Sink *self, void *Py_UNUSED(closure)) {
    if (self->given_words == NULL && (self->given_words = char_positions(self, &self->given, 1, 0)) == NULL)
        return NULL;
    return Py_NewRef(self->given_words);
}

static PyObject *sink_cue_ends(Sink *self, void *Py_UNUSED(closure)) {
    if (self->cue_ends == NULL && (self->cue_ends = char_positions(self, &self->cues, 2, 1)) == NULL)
        return NULL;
    return Py_NewRef(self->cue_ends);
}

static PyObject *sink_weak_starts(Sink *self, void *Py_UNUSED(closure)) {
    if (self->weak_starts == NULL && (self->weak_starts = char_positions(self, &self->weak, 1, 0)) == NULL)
        return NULL;
    return Py_NewRef(self->weak_starts);
}

#ifdef GATEWATCH_HYPERSCAN
/* The tables' scratch space, or a clone of it while another scan holds it (a scan does not
   give up the GIL, so only a reentrant call could find it busy). */
static hs_scratch_t *scratch_take(Tables *tables) {
    if (!tables->scratch_busy) {
        tables->scratch_busy = 1;
        return tables->scratch;
    }
    hs_scratch_t *clone = NULL;
    if (hs_clone_scratch(tables->scratch, &clone) != HS_SUCCESS) {
        PyErr_SetString(PyExc_MemoryError, "hyperscan could not allocate scratch space");
        return NULL;
    }
    return clone;
}

static void scratch_give_back(Tables *tables, hs_scratch_t *scratch) {
    if (scratch == tables->scratch)
        tables->scratch_busy = 0;
    else
        hs_free_scratch(scratch);
}

typedef struct {
    Sink *sink;     /* Tables.scan: hits go to the sink */
    Offsets *hits;  /* gate_hits: hits are collected (id, start, end) */
    Py_ssize_t limit;
    int failed;
} ScanContext;

static int on_hit(unsigned int id, unsigned long long from, unsigned long long to, unsigned int flags, void *context) {
    ScanContext *scan = context;
    if (scan->sink != NULL) {
        int rc = sink_hit(scan->sink, (Py_ssize_t)id, (Py_ssize_t)to);
        if (rc < 0)
            scan->failed = 1;
        return rc != 0;
    }
    if (offsets_push(scan->hits, (Py_ssize_t)id, (Py_ssize_t)from, 2) < 0 || offsets_push(scan->hits, (Py_ssize_t)to, 0, 1) < 0) {
        scan->failed = 1;
        return 1;
    }
    return scan->hits->count / 3 >= scan->limit;
}

/* Each of the tables' databases over data, in order, until a hit stops the scan: 1 if one
   did, 0 if not, -1 on an error. */
static int scan_databases(Tables *tables, PyObject *data, ScanContext *scan) {
    Py_ssize_t n = PyTuple_GET_SIZE(tables->databases);
    if (n == 0) {
        PyErr_SetString(PyExc_RuntimeError, "these tables have no hyperscan databases");
        return -1;
    }
    if (PyBytes_GET_SIZE(data) > (Py_ssize_t)UINT_MAX) {
        PyErr_SetString(PyExc_ValueError, "text too long for one hyperscan scan");
        return -1;
    }
    hs_scratch_t *scratch = scratch_take(tables);
    if (scratch == NULL)
        return -1;
    int stopped = 0;
    for (Py_ssize_t i = 0; i < n && !stopped; i++) {
        hs_database_t *db = ((Database *)PyTuple_GET_ITEM(tables->databases, i))->db;
        hs_error_t rc = hs_scan(db, PyBytes_AS_STRING(data), (unsigned int)PyBytes_GET_SIZE(data), 0, scratch, on_hit,
                                scan);
        if (scan->failed) {
            scratch_give_back(tables, scratch);
            return -1;
        }
        if (rc == HS_SCAN_TERMINATED) {
            stopped = 1;
        } else if (rc != HS_SUCCESS) {
            scratch_give_back(tables, scratch);
            PyErr_Format(PyExc_RuntimeError, "hyperscan scan failed (error %d)", (int)rc);
            return -1;
        }
    }
    scratch_give_back(tables, scratch);
    return stopped;
}

/* tables.scan(text, data): a sink for the text that has taken every gate hit, straight from
   hyperscan (sink.stopped: a hit stopped the scan, as Gate.feed's result). */
static PyObject *tables_scan(Tables *tables, PyObject *args) {
    PyObject *text, *data;
    if (!PyArg_ParseTuple(args, "UO!", &text, &PyBytes_Type, &data))
        return NULL;
    Sink *sink = sink_new(tables, text, data);
    if (sink == NULL)
        return NULL;
    ScanContext scan = {sink, NULL, 0, 0};
    int stopped = scan_databases(tables, data, &scan);
    if (stopped < 0) {
        Py_DECREF(sink);
        return NULL;
    }
    sink->stopped = stopped;
    return (PyObject *)sink;
}

/* tables.gate_hits(data): Gate.scan's answer from these databases: ([(pattern id, start,
   end), ...] as reported, whether the scan stopped at the tables' hit limit). */
static PyObject *tables_gate_hits(Tables *tables, PyObject *arg) {
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "gate_hits takes bytes");
        return NULL;
    }
    Offsets hits = {0, 0, NULL};
    ScanContext scan = {NULL, &hits, tables->limit, 0};
    int stopped = scan_databases(tables, arg, &scan);
    PyObject *list = stopped < 0 ? NULL : PyList_New(hits.count / 3);
    for (Py_ssize_t i = 0; list != NULL && i < hits.count; i += 3) {
        PyObject *hit = Py_BuildValue("(nnn)", hits.items[i], hits.items[i + 1], hits.items[i + 2]);
        if (hit == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, i / 3, hit);
    }
    PyMem_Free(hits.items);
    if (list == NULL)
        return NULL;
    return Py_BuildValue("(NO)", list, stopped ? Py_True : Py_False);
}
#endif

/* sink.find(detectors, tagged, found): for each detector in the order of its first hit,
   detector.finder(text, lo, hi) on each merged window (character offsets, clamped to the
   text), and found.extend(tagged(spans, detector.name)) for the windows that hold spans.
   Returns found. (The finder is looked up on every call, as the Python loop does.) */
static PyObject *FINDER_NAME, *NAME_NAME;  /* "finder", "name" (interned at import) */

static PyObject *sink_find(Sink *self, PyObject *args) {
    PyObject *detectors, *tagged, *found;
    if (!PyArg_ParseTuple(args, "O!OO!", &PyList_Type, &detectors, &tagged, &PyList_Type, &found))
        return NULL;
    if (PyList_GET_SIZE(detectors) != self->tables->detectors) {
        PyErr_SetString(PyExc_ValueError, "the detectors the tables were built for");
        return NULL;
    }
    Py_ssize_t chars = PyUnicode_GET_LENGTH(self->text);
    for (Py_ssize_t k = 0; k < self->opened; k++) {
        Py_ssize_t index = self->order[k];
        Offsets *mine = &self->windows[index];
        PyObject *detector = PyList_GET_ITEM(detectors, index);
        PyObject *finder = PyObject_GetAttr(detector, FINDER_NAME);
        if (finder == NULL)
            return NULL;
        for (Py_ssize_t w = 0; w < mine->count; w += 2) {
            Py_ssize_t lo = mine->items[w], hi = mine->items[w + 1];
            Py_ssize_t char_lo = to_char(self, lo > 0 ? lo : 0);
            Py_ssize_t char_hi = to_char(self, hi < self->size ? hi : self->size);
            if ((char_lo < 0 || char_hi < 0) && PyErr_Occurred())
                goto fail;
            if (char_hi > chars)
                char_hi = chars;
            PyObject *bounds[3] = {self->text, PyLong_FromSsize_t(char_lo), PyLong_FromSsize_t(char_hi)};
            PyObject *spans = bounds[1] && bounds[2] ? PyObject_Vectorcall(finder, bounds, 3, NULL) : NULL;
            Py_XDECREF(bounds[1]);
            Py_XDECREF(bounds[2]);
            if (spans == NULL)
                goto fail;
            int holds = PyObject_IsTrue(spans);
            PyObject *tagged_spans = NULL, *name = NULL;
            if (holds > 0) {  /* (most windows hold nothing) */
                name = PyObject_GetAttr(detector, NAME_NAME);
                if (name != NULL)
                    tagged_spans = PyObject_CallFunctionObjArgs(tagged, spans, name, NULL);
            }
            Py_DECREF(spans);
            Py_XDECREF(name);
            if (holds < 0 || (holds > 0 && tagged_spans == NULL))
                goto fail;
            if (tagged_spans != NULL) {
                Py_ssize_t at = PyList_GET_SIZE(found);
                int rc = PyList_SetSlice(found, at, at, tagged_spans);
                Py_DECREF(tagged_spans);
                if (rc < 0)
                    goto fail;
            }
        }
        Py_DECREF(finder);
        continue;
    fail:
        Py_DECREF(finder);
        return NULL;
    }
    Py_INCREF(found);
    return found;
}

/* The merged windows as the Python sink builds them: {detector index: [[lo, hi], ...]} in the
   order of each detector's first hit (for tests and the sorted-hits path). */
static PyObject *sink_windows(Sink *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *out = PyDict_New();
    if (out == NULL)
        return NULL;
    for (Py_ssize_t k = 0; k < self->opened; k++) {
        Py_ssize_t detector = self->order[k];
        Offsets *mine = &self->windows[detector];
        PyObject *list = PyList_New(mine->count / 2);
        if (list == NULL)
            goto fail;
        for (Py_ssize_t w = 0; w < mine->count; w += 2) {
            PyObject *pair = Py_BuildValue("[nn]", mine->items[w], mine->items[w + 1]);
            if (pair == NULL) {
                Py_DECREF(list);
                goto fail;
            }
            PyList_SET_ITEM(list, w / 2, pair);
        }
        PyObject *key = PyLong_FromSsize_t(detector);
        if (key == NULL || PyDict_SetItem(out, key, list) < 0) {
            Py_XDECREF(key);
            Py_DECREF(list);
            goto fail;
        }
        Py_DECREF(key);
        Py_DECREF(list);
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static PyObject *sink_status(Sink *self, PyObject *Py_UNUSED(ignored)) {
    return Py_BuildValue("[OOO]", self->too_many ? Py_True : Py_False, self->out_of_order ? Py_True : Py_False,
                         self->any ? Py_True : Py_False);
}

static PyObject *sink_to_char(Sink *self, PyObject *arg) {
    Py_ssize_t offset = PyLong_AsSsize_t(arg);
    if (offset == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t chars = to_char(self, offset);
    return chars < 0 && PyErr_Occurred() ? NULL : PyLong_FromSsize_t(chars);
}

static PyMemberDef sink_members[] = {
    {"too_many", T_INT, offsetof(Sink, too_many), READONLY, "the scan stopped at the hit limit"},
    {"out_of_order", T_INT, offsetof(Sink, out_of_order), READONLY, "a detector hit came before the previous one's end"},
    {"any", T_INT, offsetof(Sink, any), READONLY, "any hit kept"},
    {"stopped", T_INT, offsetof(Sink, stopped), READONLY, "Tables.scan: a hit stopped the scan"},
    {NULL},
};

static PyGetSetDef sink_getset[] = {
    {"given_words", (getter)sink_given_words, NULL, "character offsets of given-name hits", NULL},
    {"cue_ends", (getter)sink_cue_ends, NULL, "(character offset, cue) of cue hits", NULL},
    {"weak_starts", (getter)sink_weak_starts, NULL, "character offsets of weak-cue hits", NULL},
    {NULL},
};

static PyMethodDef sink_methods[] = {
    {"find", (PyCFunction)sink_find, METH_VARARGS, "run the finders on the merged windows"},
    {"windows", (PyCFunction)sink_windows, METH_NOARGS, "the merged windows per detector"},
    {"status", (PyCFunction)sink_status, METH_NOARGS, "[too many hits, out of order, any hit]"},
    {"to_char", (PyCFunction)sink_to_char, METH_O, "character offset of a byte offset"},
    {NULL},
};

static PyTypeObject SinkType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "redaction._native.Sink",
    .tp_basicsize = sizeof(Sink),
    .tp_dealloc = (destructor)sink_dealloc,
    .tp_call = (ternaryfunc)sink_call,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The gate's match callback for one text (see Tables.sink and Tables.scan).",
    .tp_methods = sink_methods,
    .tp_members = sink_members,
    .tp_getset = sink_getset,
};

static PyMethodDef tables_methods[] = {
    {"sink", (PyCFunction)tables_sink, METH_VARARGS, "sink(text, data): the match callback for one text"},
#ifdef GATEWATCH_HYPERSCAN
    {"scan", (PyCFunction)tables_scan, METH_VARARGS, "scan(text, data): a sink that has taken the text's gate hits"},
    {"gate_hits", (PyCFunction)tables_gate_hits, METH_O, "gate_hits(data): (hits, stopped) as Gate.scan returns them"},
#endif
    {NULL},
};

static PyTypeObject TablesType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "redaction._native.Tables",
    .tp_basicsize = sizeof(Tables),
    .tp_dealloc = (destructor)tables_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Tables(kinds, pads, limit, databases=()): what each gate pattern id means.",
    .tp_methods = tables_methods,
    .tp_new = tables_new,
};


/* ---- The phone candidate scan: PHONE_RE (redaction/patterns.py) as re matches it ----------

   PHONE_RE, for reference (keep the two in step; tests compare them on the corpora and on
   fuzzed strings):
     (?=[(+\d])(?:(?<![\w+])(?:\(\+\d{1,3}\)[ \u00a0]?|\+)|(?<![\w.\-/+#])(?=[(\d]))
     \(?\d{1,14}\)?(?:(?:[ \u00a0.\-/]{1,2}|(?<=\))|(?=\())\(?\d{1,12}\)?){0,7}
     (?P<ext>[ \u00a0]?(?:x|ext\.?|extension|#)[ \u00a0]?\d{1,6})?(?![\w]|-[0-9A-Za-z])
   Every choice is tried in re's order (greedy counts from the most down, an optional part
   with before without, alternatives left to right), so the first path that matches is re's
   match. \d and \w are re's Unicode classes; lookbehinds see the text before the window,
   lookaheads stop at its end (re's pos and endpos). */


/* re's own clamping of pos and endpos for (text, lo, hi); returns len(text). */
static Py_ssize_t clamp_window(PyObject *text, Py_ssize_t *lo, Py_ssize_t *hi) {
    Py_ssize_t length = PyUnicode_GET_LENGTH(text);
    if (*lo < 0)
        *lo = 0;
    if (*hi > length)
        *hi = length;
    if (*hi < 0)
        *hi = 0;
    return length;
}

/* list.append(item), taking the reference to item (which may be NULL: an error already set). */
static int append_stolen(PyObject *list, PyObject *item) {
    if (item == NULL)
        return -1;
    int rc = PyList_Append(list, item);
    Py_DECREF(item);
    return rc;
}

typedef struct {
    int kind;
    const void *data;
    Py_ssize_t hi;         /* endpos */
    Py_ssize_t ext_start;  /* of the successful path, -1 without an extension */
} Scan;

#define CH(s, i) PyUnicode_READ((s)->kind, (s)->data, (i))

/* re's \d and \w (Unicode); ASCII answered here (libpython's tables cost a call or four). */
static int is_digit(Py_UCS4 c) { return c < 128 ? c >= '0' && c <= '9' : Py_UNICODE_ISDECIMAL(c); }
static int is_word(Py_UCS4 c) {
    if (c < 128)
        return (c >= '0' && c <= '9') || ((c | 32) >= 'a' && (c | 32) <= 'z') || c == '_';
    return Py_UNICODE_ISALNUM(c);
}
static int is_space(Py_UCS4 c) { return c == ' ' || c == 0xA0; }
static int is_separator(Py_UCS4 c) { return c == ' ' || c == 0xA0 || c == '.' || c == '-' || c == '/'; }
static int is_ascii_alnum(Py_UCS4 c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

static Py_ssize_t digit_run(Scan *s, Py_ssize_t at, Py_ssize_t most) {
    Py_ssize_t n = 0;
    while (n < most && at + n < s->hi && is_digit(CH(s, at + n)))
        n++;
    return n;
}

/* (?![\w]|-[0-9A-Za-z]) at pos: the match ends here. */
static Py_ssize_t phone_tail(Scan *s, Py_ssize_t pos) {
    if (pos < s->hi) {
        Py_UCS4 c = CH(s, pos);
        if (is_word(c))
            return -1;
        if (c == '-' && pos + 1 < s->hi && is_ascii_alnum(CH(s, pos + 1)))
            return -1;
    }
    return pos;
}

/* [ \u00a0]?\d{1,6} then the tail: the rest of the extension after its word. */
static Py_ssize_t phone_ext_digits(Scan *s, Py_ssize_t pos) {
    for (int space = 1; space >= 0; space--) {
        Py_ssize_t at = pos;
        if (space) {
            if (at >= s->hi || !is_space(CH(s, at)))
                continue;
            at++;
        }
        for (Py_ssize_t k = digit_run(s, at, 6); k >= 1; k--) {
            Py_ssize_t end = phone_tail(s, at + k);
            if (end >= 0)
                return end;
        }
    }
    return -1;
}

static int text_at(Scan *s, Py_ssize_t pos, const char *word) {
    for (Py_ssize_t i = 0; word[i]; i++) {
        if (pos + i >= s->hi || CH(s, pos + i) != (Py_UCS4)(unsigned char)word[i])
            return 0;
    }
    return 1;
}

/* (?P<ext>...)? then the tail. */
static Py_ssize_t phone_ext(Scan *s, Py_ssize_t pos) {
    for (int space = 1; space >= 0; space--) {
        Py_ssize_t at = pos;
        if (space) {
            if (at >= s->hi || !is_space(CH(s, at)))
                continue;
            at++;
        }
        Py_ssize_t end;
        if (text_at(s, at, "x") && (end = phone_ext_digits(s, at + 1)) >= 0)
            goto found;
        if (text_at(s, at, "ext")) {
            if (text_at(s, at + 3, ".") && (end = phone_ext_digits(s, at + 4)) >= 0)
                goto found;
            if ((end = phone_ext_digits(s, at + 3)) >= 0)
                goto found;
        }
        if (text_at(s, at, "extension") && (end = phone_ext_digits(s, at + 9)) >= 0)
            goto found;
        if (text_at(s, at, "#") && (end = phone_ext_digits(s, at + 1)) >= 0)
            goto found;
        continue;
    found:
        s->ext_start = pos;
        return end;
    }
    s->ext_start = -1;
    return phone_tail(s, pos);
}

static Py_ssize_t phone_groups(Scan *s, Py_ssize_t pos, int done);

/* \(?\d{1,most}\)? at pos, then the next group (or the end). */
static Py_ssize_t phone_group(Scan *s, Py_ssize_t pos, Py_ssize_t most, int done) {
    for (int open = 1; open >= 0; open--) {
        Py_ssize_t at = pos;
        if (open) {
            if (at >= s->hi || CH(s, at) != '(')
                continue;
            at++;
        }
        for (Py_ssize_t k = digit_run(s, at, most); k >= 1; k--) {
            Py_ssize_t after = at + k;
            for (int close = 1; close >= 0; close--) {
                Py_ssize_t next = after;
                if (close) {
                    if (next >= s->hi || CH(s, next) != ')')
                        continue;
                    next++;
                }
                Py_ssize_t end = phone_groups(s, next, done);
                if (end >= 0)
                    return end;
            }
        }
    }
    return -1;
}

/* (?:(?:[ \u00a0.\-/]{1,2}|(?<=\))|(?=\())\(?\d{1,12}\)?){0,7} after `done` groups, then the
   extension and the tail. */
static Py_ssize_t phone_groups(Scan *s, Py_ssize_t pos, int done) {
    if (done < 7) {
        Py_ssize_t end;
        if (pos < s->hi && is_separator(CH(s, pos))) {
            if (pos + 1 < s->hi && is_separator(CH(s, pos + 1)) && (end = phone_group(s, pos + 2, 12, done + 1)) >= 0)
                return end;
            if ((end = phone_group(s, pos + 1, 12, done + 1)) >= 0)
                return end;
        }
        if (pos > 0 && CH(s, pos - 1) == ')' && (end = phone_group(s, pos, 12, done + 1)) >= 0)
            return end;
        if (pos < s->hi && CH(s, pos) == '(' && (end = phone_group(s, pos, 12, done + 1)) >= 0)
            return end;
    }
    return phone_ext(s, pos);
}

/* The end of PHONE_RE's match at pos, or -1. */
static Py_ssize_t phone_match(Scan *s, Py_ssize_t pos) {
    Py_UCS4 c = CH(s, pos);
    if (!(c == '(' || c == '+' || is_digit(c)))
        return -1;
    Py_UCS4 before = pos > 0 ? CH(s, pos - 1) : 0;
    Py_ssize_t end;
    if (pos == 0 || !(is_word(before) || before == '+')) {
        /* \(\+\d{1,3}\)[ \u00a0]? */
        if (c == '(' && pos + 1 < s->hi && CH(s, pos + 1) == '+') {
            Py_ssize_t run = digit_run(s, pos + 2, 3);
            for (Py_ssize_t k = run; k >= 1; k--) {
                Py_ssize_t close = pos + 2 + k;
                if (close >= s->hi || CH(s, close) != ')')
                    continue;
                if (close + 1 < s->hi && is_space(CH(s, close + 1)) && (end = phone_group(s, close + 2, 14, 0)) >= 0)
                    return end;
                if ((end = phone_group(s, close + 1, 14, 0)) >= 0)
                    return end;
            }
        }
        if (c == '+' && (end = phone_group(s, pos + 1, 14, 0)) >= 0)
            return end;
    }
    if ((pos == 0 || !(is_word(before) || before == '.' || before == '-' || before == '/' || before == '+' || before == '#'))
        && (c == '(' || is_digit(c)) && (end = phone_group(s, pos, 14, 0)) >= 0)
        return end;
    return -1;
}


/* ---- phone_score's first test (patterns.phone_shape_rejected), on a candidate's characters.

   Rejected: fewer than 7 or more than 15 characters left after removing "(0)" and the phone
   punctuation "()+ \u00a0.-/", or _NOT_PHONE matches at the start:
     ^(?:\d{4}[-/.]\d{1,2}[-/.]\d{1,2}(?:\D|$)|\d{1,2}[-/.]\d{1,2}[-/.](?:\d{4}|\d\d)(?:[ T]|$)|
         \d{1,2}:\d{2}(?::\d{2})?$|\d{1,3}(?:\.\d{1,3}){1,2}$|\d{3}([ .\-])\d\d\1\d{4}$)
   or it is a dotted quad _is_ipv4 accepts. Only whether some path matches counts here, so
   each alternative is tried over all its digit counts. */

typedef struct {
    int kind;
    const void *data;
    Py_ssize_t start, end;  /* the candidate: text[start:end] */
} Span;

/* The span of str text from its start to end: what the scans read text through. */
static inline Span text_span(PyObject *text, Py_ssize_t end) {
    Span span = {PyUnicode_KIND(text), PyUnicode_DATA(text), 0, end};
    return span;
}

#define AT(c, i) PyUnicode_READ((c)->kind, (c)->data, (c)->start + (i))

static Py_ssize_t span_length(const Span *c) { return c->end - c->start; }

/* Exactly n digits at i. */
static int digits_at(const Span *c, Py_ssize_t i, Py_ssize_t n) {
    if (i + n > span_length(c))
        return 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        if (!is_digit(AT(c, i + k)))
            return 0;
    }
    return 1;
}

/* re's $ at i (no MULTILINE): the end, or a last "\n". */
static int end_at(const Span *c, Py_ssize_t i) {
    Py_ssize_t n = span_length(c);
    return i == n || (i == n - 1 && AT(c, i) == '\n');
}

static int date_separator_at(const Span *c, Py_ssize_t i) {
    if (i >= span_length(c))
        return 0;
    Py_UCS4 ch = AT(c, i);
    return ch == '-' || ch == '/' || ch == '.';
}

static int not_phone_match(const Span *c) {
    Py_ssize_t n = span_length(c);
    /* \d{4}[-/.]\d{1,2}[-/.]\d{1,2}(?:\D|$) */
    if (digits_at(c, 0, 4) && date_separator_at(c, 4)) {
        for (Py_ssize_t a = 1; a <= 2; a++) {
            if (!digits_at(c, 5, a) || !date_separator_at(c, 5 + a))
                continue;
            for (Py_ssize_t b = 1; b <= 2; b++) {
                Py_ssize_t i = 6 + a;
                if (!digits_at(c, i, b))
                    continue;
                i += b;
                if ((i < n && !is_digit(AT(c, i))) || end_at(c, i))
                    return 1;
            }
        }
    }
    /* \d{1,2}[-/.]\d{1,2}[-/.](?:\d{4}|\d\d)(?:[ T]|$) */
    for (Py_ssize_t a = 1; a <= 2; a++) {
        if (!digits_at(c, 0, a) || !date_separator_at(c, a))
            continue;
        for (Py_ssize_t b = 1; b <= 2; b++) {
            Py_ssize_t i = a + 1;
            if (!digits_at(c, i, b) || !date_separator_at(c, i + b))
                continue;
            i += b + 1;
            for (Py_ssize_t y = 4; y >= 2; y -= 2) {
                if (!digits_at(c, i, y))
                    continue;
                Py_ssize_t j = i + y;
                if ((j < n && (AT(c, j) == ' ' || AT(c, j) == 'T')) || end_at(c, j))
                    return 1;
            }
        }
    }
    /* \d{1,2}:\d{2}(?::\d{2})?$ */
    for (Py_ssize_t a = 1; a <= 2; a++) {
        if (!digits_at(c, 0, a) || a >= n || AT(c, a) != ':' || !digits_at(c, a + 1, 2))
            continue;
        Py_ssize_t i = a + 3;
        if (end_at(c, i) || (i < n && AT(c, i) == ':' && digits_at(c, i + 1, 2) && end_at(c, i + 3)))
            return 1;
    }
    /* \d{1,3}(?:\.\d{1,3}){1,2}$: two or three dot-separated groups of 1-3 digits, to the end */
    {
        Py_ssize_t i = 0, groups = 0, stop = n;
        if (n > 0 && AT(c, n - 1) == '\n')
            stop = n - 1;  /* $ before a last newline */
        int shaped = 1;
        while (i < stop && shaped) {
            Py_ssize_t run = 0;
            while (i + run < stop && is_digit(AT(c, i + run)))
                run++;
            if (run < 1 || run > 3)
                shaped = 0;
            groups++;
            i += run;
            if (shaped && i < stop) {
                if (AT(c, i) != '.')
                    shaped = 0;
                else if (++i == stop)
                    shaped = 0;  /* a trailing dot */
            }
        }
        if (shaped && stop > 0 && groups >= 2 && groups <= 3)
            return 1;
    }
    /* \d{3}([ .\-])\d\d\1\d{4}$ */
    if (digits_at(c, 0, 3) && n > 3) {
        Py_UCS4 sep = AT(c, 3);
        if ((sep == ' ' || sep == '.' || sep == '-') && digits_at(c, 4, 2) && n > 6 && AT(c, 6) == sep
                && digits_at(c, 7, 4) && end_at(c, 11))
            return 1;
    }
    return 0;
}

/* _is_ipv4: four ASCII decimal octets up to 255, no leading zeros. */
static int is_ipv4_span(const Span *c) {
    Py_ssize_t n = span_length(c), i = 0;
    for (int octet = 0; octet < 4; octet++) {
        Py_ssize_t run = 0;
        int value = 0;
        while (i + run < n && AT(c, i + run) != '.') {
            Py_UCS4 ch = AT(c, i + run);
            if (ch < '0' || ch > '9' || run >= 3)
                return 0;
            value = value * 10 + (int)(ch - '0');
            run++;
        }
        if (run == 0 || (run > 1 && AT(c, i) == '0') || value > 255)
            return 0;
        i += run;
        if (octet < 3) {
            if (i >= n)
                return 0;
            i++;  /* the dot */
        }
    }
    return i == n;
}

static int phone_punctuation(Py_UCS4 ch) {
    return ch == '(' || ch == ')' || ch == '+' || ch == ' ' || ch == 0xA0 || ch == '.' || ch == '-' || ch == '/';
}

static int shape_rejected(const Span *c) {
    Py_ssize_t n = span_length(c), kept = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i + 2 < n && AT(c, i) == '(' && AT(c, i + 1) == '0' && AT(c, i + 2) == ')') {
            i += 2;  /* "(0)", the trunk prefix, is not counted */
            continue;
        }
        if (!phone_punctuation(AT(c, i)))
            kept++;
    }
    return kept < 7 || kept > 15 || not_phone_match(c) || is_ipv4_span(c);
}

static PyObject *phone_shape_rejected(PyObject *module, PyObject *arg) {
    if (!PyUnicode_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "phone_shape_rejected takes a str");
        return NULL;
    }
    Span candidate = text_span(arg, PyUnicode_GET_LENGTH(arg));
    return PyBool_FromLong(shape_rejected(&candidate));
}

/* phone_candidates(text, lo, hi, shortest, screen): (start, extension start or -1, end,
   candidate end) of each match of PHONE_RE.finditer(text, lo, hi) at least `shortest`
   characters long; the candidate is the match before its extension without trailing
   " .-/\u00a0". With screen, candidates phone_shape_rejected refuses are left out. */
static PyObject *phone_candidates(PyObject *module, PyObject *args) {
    PyObject *text;
    Py_ssize_t lo, hi, shortest;
    int screen;
    if (!PyArg_ParseTuple(args, "Unnnp", &text, &lo, &hi, &shortest, &screen))
        return NULL;
    clamp_window(text, &lo, &hi);
    Scan scan = {PyUnicode_KIND(text), PyUnicode_DATA(text), hi, -1};
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    Py_ssize_t pos = lo;
    while (pos < hi) {
        Py_ssize_t end = phone_match(&scan, pos);
        if (end < 0) {
            pos++;
            continue;
        }
        Span candidate = {scan.kind, scan.data, pos, scan.ext_start >= 0 ? scan.ext_start : end};
        while (candidate.end > pos) {
            Py_UCS4 last = PyUnicode_READ(scan.kind, scan.data, candidate.end - 1);
            if (!(last == ' ' || last == '.' || last == '-' || last == '/' || last == 0xA0))
                break;
            candidate.end--;
        }
        if (end - pos >= shortest && !(screen && shape_rejected(&candidate))) {
            if (append_stolen(out, Py_BuildValue("(nnnn)", pos, scan.ext_start, end, candidate.end)) < 0) {
                Py_DECREF(out);
                return NULL;
            }
        }
        pos = end;  /* (a match is never empty) */
    }
    return out;
}


/* ---- The card scan: CARD_RE's matches and the card number inside each (patterns.card_runs).

   CARD_RE = (?<![\w\-./])\d(?:[ \-]?\d){11,22}(?![\d]). A separator is taken only with the
   digit after it, so the greedy path through the repeat is unique; re then gives back whole
   iterations until the lookahead holds. In each match, runs of whole groups (split at the
   separators), longest first, then leftmost: the first of 12-19 digits that passes Luhn and
   has a card brand (patterns.luhn and card_brand, including what they do with non-ASCII
   decimal digits: Luhn on ord(ch) - 48, int() on their decimal values). */

static int luhn_span(const Span *c, const Py_ssize_t *at, Py_ssize_t n) {
    long long total = 0;
    Py_ssize_t parity = n % 2;
    for (Py_ssize_t i = 0; i < n; i++) {
        long long d = (long long)AT(c, at[i]) - 48;
        if (i % 2 == parity) {
            d *= 2;
            if (d > 9)
                d -= 9;
        }
        total += d;
    }
    return total % 10 == 0;
}

/* int(digits[:width]) */
static long prefix_value(const Span *c, const Py_ssize_t *at, Py_ssize_t width) {
    long value = 0;
    for (Py_ssize_t i = 0; i < width; i++)
        value = value * 10 + Py_UNICODE_TODECIMAL(AT(c, at[i]));
    return value;
}

static int has_card_brand(const Span *c, const Py_ssize_t *at, Py_ssize_t n) {
    long p2 = prefix_value(c, at, 2), p3 = prefix_value(c, at, 3), p4 = prefix_value(c, at, 4);
    long p6 = prefix_value(c, at, 6);
    if (AT(c, at[0]) == '4')
        return n == 13 || n == 16 || n == 19;
    if ((51 <= p2 && p2 <= 55) || (2221 <= p4 && p4 <= 2720))
        return n == 16;
    if (p2 == 34 || p2 == 37)
        return n == 15;
    if (2200 <= p4 && p4 <= 2204)
        return 16 <= n && n <= 19;
    if (p4 == 6011 || (644 <= p3 && p3 <= 649) || p2 == 65 || (622126 <= p6 && p6 <= 622925))
        return 16 <= n && n <= 19;
    if (p2 == 35)
        return 16 <= n && n <= 19;
    if (p4 == 2131 || p4 == 1800)
        return n == 15;
    if ((300 <= p3 && p3 <= 305) || p2 == 36 || p2 == 38 || p2 == 39 || p4 == 3095)
        return 14 <= n && n <= 19;
    if (p2 == 62 || p2 == 81)
        return 16 <= n && n <= 19;
    if (p2 == 50 || (56 <= p2 && p2 <= 69) || p4 == 604)
        return 12 <= n && n <= 19;
    return 0;
}

/* card_runs(text, lo, hi): (match start, card start, card end, printed as cards are: groups
   4-4-4-4, 4-4-4-4-3, 4-6-5 or 4-6-4) for each match of CARD_RE.finditer(text, lo, hi) that
   holds a card number. */
static PyObject *card_runs(PyObject *module, PyObject *args) {
    PyObject *text;
    Py_ssize_t lo, hi;
    if (!PyArg_ParseTuple(args, "Unn", &text, &lo, &hi))
        return NULL;
    Py_ssize_t length = clamp_window(text, &lo, &hi);
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    Span whole = {kind, data, 0, length};
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    Py_ssize_t ends[23];          /* end of the match after 0..22 iterations */
    Py_ssize_t digit_at[23];      /* each digit's position */
    Py_ssize_t pos = lo;
    while (pos < hi) {
        Py_UCS4 c = PyUnicode_READ(kind, data, pos);
        if (!is_digit(c)) {
            pos++;
            continue;
        }
        if (pos > 0) {
            Py_UCS4 before = PyUnicode_READ(kind, data, pos - 1);
            if (is_word(before) || before == '-' || before == '.' || before == '/') {
                pos++;
                continue;
            }
        }
        Py_ssize_t taken = 0, at = pos + 1;
        digit_at[0] = pos;
        ends[0] = at;
        while (taken < 22 && at < hi) {
            Py_UCS4 next = PyUnicode_READ(kind, data, at);
            if ((next == ' ' || next == '-') && at + 1 < hi && is_digit(PyUnicode_READ(kind, data, at + 1))) {
                digit_at[taken + 1] = at + 1;
                at += 2;
            } else if (is_digit(next)) {
                digit_at[taken + 1] = at;
                at += 1;
            } else {
                break;
            }
            ends[++taken] = at;
        }
        Py_ssize_t iterations = -1;
        for (Py_ssize_t k = taken; k >= 11; k--) {
            if (ends[k] >= hi || !is_digit(PyUnicode_READ(kind, data, ends[k]))) {
                iterations = k;
                break;
            }
        }
        if (iterations < 0) {
            pos++;
            continue;
        }
        Py_ssize_t digits = iterations + 1, end = ends[iterations];
        /* groups: [first digit index, digit count] */
        Py_ssize_t group_first[23], group_size[23], groups = 0;
        for (Py_ssize_t i = 0; i < digits; i++) {
            if (i == 0 || digit_at[i] != digit_at[i - 1] + 1) {
                group_first[groups] = i;
                group_size[groups++] = 0;
            }
            group_size[groups - 1]++;
        }
        Py_ssize_t best_first = -1, best_size = 0;
        for (Py_ssize_t size = groups; size >= 1 && best_first < 0; size--) {
            for (Py_ssize_t first = 0; first + size <= groups; first++) {
                if (size > 1) {
                    int short_group = group_size[first] < 4;
                    for (Py_ssize_t g = first + 1; g < first + size - 1 && !short_group; g++)
                        short_group = group_size[g] < 3;
                    if (short_group)
                        continue;  /* written cards come in groups of 4 (4-6-5, ...) */
                }
                Py_ssize_t n = 0;
                for (Py_ssize_t g = first; g < first + size; g++)
                    n += group_size[g];
                const Py_ssize_t *run = &digit_at[group_first[first]];
                if (12 <= n && n <= 19 && luhn_span(&whole, run, n) && has_card_brand(&whole, run, n)) {
                    best_first = first;
                    best_size = size;
                    break;
                }
            }
        }
        if (best_first >= 0) {
            Py_ssize_t last = best_first + best_size - 1;
            Py_ssize_t card_start = digit_at[group_first[best_first]];
            Py_ssize_t card_end = digit_at[group_first[last]] + group_size[last];
            int shaped = 0;
            if (best_size == 5 || best_size == 4) {
                shaped = group_size[best_first] == 4 && group_size[best_first + 1] == 4 && group_size[best_first + 2] == 4
                         && group_size[best_first + 3] == 4 && (best_size == 4 || group_size[best_first + 4] == 3);
            } else if (best_size == 3) {
                shaped = group_size[best_first] == 4 && group_size[best_first + 1] == 6
                         && (group_size[best_first + 2] == 5 || group_size[best_first + 2] == 4);
            }
            if (append_stolen(out, Py_BuildValue("(nnnO)", pos, card_start, card_end, shaped ? Py_True : Py_False)) < 0) {
                Py_DECREF(out);
                return NULL;
            }
        }
        pos = end;
    }
    return out;
}


/* ---- The IPv4 scan (patterns.ipv4_candidates).

   IPV4_RE = (?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?:/\d{1,2})?(?![\w]|\.\d): each group of digits
   is a whole run of 1-3 (a longer run leaves a digit where a dot or the end must be), so only
   the optional prefix length has choices (2 digits, 1, none). A match after a product token
   (_PRODUCT_TOKEN, "Chrome/") is dropped; one without a prefix length is checked here as
   _is_ipv4 and _private_v4 do; one with a prefix length is left to ipaddress. */

/* _PRODUCT_TOKEN.search(text, bound, slash + 1) with the "/" at slash: an ASCII letter, then
   word characters or "-", up to the slash. */
static int product_token_before(const Span *c, Py_ssize_t bound, Py_ssize_t slash) {
    if (slash - 1 < bound || AT(c, slash) != '/')
        return 0;
    for (Py_ssize_t k = slash - 1; k >= bound; k--) {
        Py_UCS4 ch = AT(c, k);
        if (!(is_word(ch) || ch == '-'))
            return 0;
        if ((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z'))
            return 1;
    }
    return 0;
}

static Py_ssize_t ipv4_tail(const Span *c, Py_ssize_t pos, Py_ssize_t hi) {
    if (pos < hi) {
        Py_UCS4 ch = AT(c, pos);
        if (is_word(ch) || (ch == '.' && pos + 1 < hi && is_digit(AT(c, pos + 1))))
            return -1;
    }
    return pos;
}

/* The end of IPV4_RE's match at pos, or -1; octets[] gets the four groups' digit runs. */
static Py_ssize_t ipv4_match(const Span *c, Py_ssize_t pos, Py_ssize_t hi, Py_ssize_t *octet_at, Py_ssize_t *octet_len,
                             int *prefixed) {
    if (pos > 0) {
        Py_UCS4 before = AT(c, pos - 1);
        if (is_word(before) || before == '.')
            return -1;
    }
    Py_ssize_t at = pos;
    for (int group = 0; group < 4; group++) {
        Py_ssize_t run = 0;
        while (at + run < hi && is_digit(AT(c, at + run)))
            run++;
        if (run < 1 || run > 3)
            return -1;
        octet_at[group] = at;
        octet_len[group] = run;
        at += run;
        if (group < 3) {
            if (at >= hi || AT(c, at) != '.')
                return -1;
            at++;
        }
    }
    if (at < hi && AT(c, at) == '/') {
        Py_ssize_t run = 0;
        while (run < 2 && at + 1 + run < hi && is_digit(AT(c, at + 1 + run)))
            run++;
        for (Py_ssize_t k = run; k >= 1; k--) {
            Py_ssize_t end = ipv4_tail(c, at + 1 + k, hi);
            if (end >= 0) {
                *prefixed = 1;
                return end;
            }
        }
    }
    *prefixed = 0;
    return ipv4_tail(c, at, hi);
}

/* ipv4_candidates(text, lo, hi, not_personal): (start, end, checked) of each match of
   IPV4_RE.finditer(text, lo, hi) not after a product token; without a prefix length only the
   valid addresses outside not_personal's (first, last) ranges (None: no ranges), checked. */
static PyObject *ipv4_candidates(PyObject *module, PyObject *args) {
    PyObject *text, *ranges;
    Py_ssize_t lo, hi;
    if (!PyArg_ParseTuple(args, "UnnO", &text, &lo, &hi, &ranges))
        return NULL;
    unsigned long long range_first[16], range_last[16];
    Py_ssize_t range_count = 0;
    if (ranges != Py_None) {
        PyObject *seq = PySequence_Fast(ranges, "not_personal must be a sequence of (first, last)");
        if (seq == NULL)
            return NULL;
        range_count = PySequence_Fast_GET_SIZE(seq);
        if (range_count > 16) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "at most 16 ranges");
            return NULL;
        }
        for (Py_ssize_t i = 0; i < range_count; i++) {
            if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KK", &range_first[i], &range_last[i])) {
                Py_DECREF(seq);
                return NULL;
            }
        }
        Py_DECREF(seq);
    }
    Py_ssize_t length = clamp_window(text, &lo, &hi);
    Span whole = text_span(text, length);
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    Py_ssize_t octet_at[4], octet_len[4];
    for (Py_ssize_t pos = lo; pos < hi;) {
        int prefixed = 0;
        Py_ssize_t end = is_digit(AT(&whole, pos)) ? ipv4_match(&whole, pos, hi, octet_at, octet_len, &prefixed) : -1;
        if (end < 0) {
            pos++;
            continue;
        }
        Py_ssize_t start = pos;
        pos = end;
        Py_ssize_t bound = start - 32 > 0 ? start - 32 : 0;
        if (product_token_before(&whole, bound, start - 1)
                || (start >= 1 && AT(&whole, start - 1) == '\n' && product_token_before(&whole, bound, start - 2)))
            continue;  /* "Chrome/121.0.0.0" ($ matches before a last newline too) */
        if (!prefixed) {
            unsigned long long number = 0;
            int valid = 1;
            for (int group = 0; group < 4 && valid; group++) {
                unsigned value = 0;
                for (Py_ssize_t k = 0; k < octet_len[group]; k++) {
                    Py_UCS4 ch = AT(&whole, octet_at[group] + k);
                    if (ch < '0' || ch > '9') {
                        valid = 0;  /* a non-ASCII decimal digit */
                        break;
                    }
                    value = value * 10 + (ch - '0');
                }
                if (octet_len[group] > 1 && AT(&whole, octet_at[group]) == '0')
                    valid = 0;
                if (value > 255)
                    valid = 0;
                number = (number << 8) | value;
            }
            if (!valid)
                continue;
            int private_range = 0;
            for (Py_ssize_t i = 0; i < range_count && !private_range; i++)
                private_range = range_first[i] <= number && number <= range_last[i];
            if (private_range)
                continue;
        }
        if (append_stolen(out, Py_BuildValue("(nnO)", start, end, prefixed ? Py_False : Py_True)) < 0) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}


/* ---- The SSN scan (patterns.ssn_candidates).

   SSN_RE = (?<![\d\-.])(\d{3})([ .\-]?)(\d{2})\2(\d{4})(?![\d\-]): after three digits either a
   separator (then only "ddd s dd s dddd" can match) or a digit (then only nine digits in a
   row), so each position has one path. Then Presidio's invalidation rules as find_ssn applies
   them: the comparisons are with ASCII strings ("000", "9"), and "one digit repeated" is one
   character nine times. */

static int ascii_run(const Span *c, Py_ssize_t at, const char *want) {
    for (Py_ssize_t i = 0; want[i]; i++) {
        if (AT(c, at + i) != (Py_UCS4)(unsigned char)want[i])
            return 0;
    }
    return 1;
}

/* ssn_candidates(text, lo, hi): (start, end, separator) of each match of
   SSN_RE.finditer(text, lo, hi) that the invalidation rules keep. */
static PyObject *ssn_candidates(PyObject *module, PyObject *args) {
    PyObject *text;
    Py_ssize_t lo, hi;
    if (!PyArg_ParseTuple(args, "Unn", &text, &lo, &hi))
        return NULL;
    Py_ssize_t length = clamp_window(text, &lo, &hi);
    Span whole = text_span(text, length);
    Span window = text_span(text, hi);  /* endpos: nothing after hi */
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t pos = lo; pos + 9 <= hi;) {
        if (pos > 0) {
            Py_UCS4 before = AT(&whole, pos - 1);
            if (is_digit(before) || before == '-' || before == '.') {
                pos++;
                continue;
            }
        }
        if (!digits_at(&window, pos, 3)) {
            pos++;
            continue;
        }
        Py_UCS4 sep = AT(&window, pos + 3);
        Py_ssize_t group_at, serial_at, end;
        int separated = sep == ' ' || sep == '.' || sep == '-';
        if (separated) {
            group_at = pos + 4;
            serial_at = pos + 7;
            end = pos + 11;
            if (!digits_at(&window, group_at, 2) || end > hi || AT(&window, pos + 6) != sep
                    || !digits_at(&window, serial_at, 4)) {
                pos++;
                continue;
            }
        } else {
            group_at = pos + 3;
            serial_at = pos + 5;
            end = pos + 9;
            if (!digits_at(&window, group_at, 6)) {
                pos++;
                continue;
            }
        }
        if (end < hi && (is_digit(AT(&window, end)) || AT(&window, end) == '-')) {
            pos++;
            continue;
        }
        Py_ssize_t start = pos;
        pos = end;
        if (ascii_run(&window, start, "000") || ascii_run(&window, start, "666") || AT(&window, start) == '9'
                || ascii_run(&window, group_at, "00") || ascii_run(&window, serial_at, "0000"))
            continue;
        Py_UCS4 digit[9];
        for (int i = 0; i < 3; i++)
            digit[i] = AT(&window, start + i);
        for (int i = 0; i < 2; i++)
            digit[3 + i] = AT(&window, group_at + i);
        for (int i = 0; i < 4; i++)
            digit[5 + i] = AT(&window, serial_at + i);
        static const char *samples[] = {"123456789", "987654320", "078051120"};
        int rejected = 0, same = 1;
        for (int k = 0; k < 3 && !rejected; k++) {
            int equal = 1;
            for (int i = 0; i < 9 && equal; i++)
                equal = digit[i] == (Py_UCS4)samples[k][i];
            rejected = equal;
        }
        for (int i = 1; i < 9; i++)
            same = same && digit[i] == digit[0];
        if (rejected || same)
            continue;
        if (append_stolen(out, separated ? Py_BuildValue("(nnN)", start, end, PyUnicode_FromOrdinal(sep))
                                    : Py_BuildValue("(nns)", start, end, "")) < 0) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}


/* ---- IBAN checksums (patterns.iban_checksum_cuts).

   For a match of IBAN_RE (letters, digits, single spaces or dashes), the lengths of its compact,
   upper-cased form from min(34, all) down to 15 that end a group (the next character of the
   match is not alphanumeric) and pass ISO 13616's mod 97: the first four characters moved to
   the end, each letter its number (A=10 ... Z=35), the whole a decimal number, remainder 1.
   Digits count by their decimal value, as int() reads them. */

static PyObject *iban_checksum_cuts(PyObject *module, PyObject *arg) {
    if (!PyUnicode_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "iban_checksum_cuts takes a str");
        return NULL;
    }
    Span raw = text_span(arg, PyUnicode_GET_LENGTH(arg));
    Py_ssize_t n = span_length(&raw);
    Py_ssize_t *positions = PyMem_Malloc((n ? n : 1) * sizeof(Py_ssize_t));
    if (positions == NULL)
        return PyErr_NoMemory();
    Py_ssize_t count = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 ch = AT(&raw, i);
        if (ch != ' ' && ch != '-')
            positions[count++] = i;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        PyMem_Free(positions);
        return NULL;
    }
    for (Py_ssize_t length = count < 34 ? count : 34; length > 14; length--) {
        Py_ssize_t end = positions[length - 1] + 1;
        if (end < n && Py_UNICODE_ISALNUM(AT(&raw, end)))
            continue;  /* would cut a group in half */
        long remainder = 0;
        int decimal = 1;
        for (Py_ssize_t k = 0; k < length && decimal; k++) {
            Py_UCS4 ch = AT(&raw, positions[(k + 4) % length]);
            if (ch >= 'a' && ch <= 'z')
                ch -= 'a' - 'A';
            if (ch >= 'A' && ch <= 'Z') {
                remainder = (remainder * 100 + (long)(ch - 'A' + 10)) % 97;
            } else if (Py_UNICODE_ISDECIMAL(ch)) {
                remainder = (remainder * 10 + Py_UNICODE_TODECIMAL(ch)) % 97;
            } else {
                decimal = 0;
            }
        }
        if (decimal && remainder == 1 && append_stolen(out, Py_BuildValue("(nn)", length, end)) < 0) {
            Py_DECREF(out);
            PyMem_Free(positions);
            return NULL;
        }
    }
    PyMem_Free(positions);
    return out;
}


/* ---- A phone word before a candidate: PHONE_CONTEXT (redaction/patterns.py) ---------------

   phone_word_before(text, start) is PHONE_CONTEXT.search(text, max(0, start - 48), start)
   is not None, for reference (keep the two in step; tests compare them on fuzzed strings):
     (?i)(?=[cdfhmnoprstw])(?:\b(?:phone|tel|...|tel[ée]fono)\b|\b[MmTtFf][ \t]?:
         |(?i:sms|phone|mobile|whatsapp|fax)(?=[\W_]))
   The lookahead only repeats the alternatives' first letters. Case folding is re's for these
   letters (measured over every code point): ASCII either case, and also U+0130 and U+0131
   for i, U+017F for s, U+00C9 for é; [MmTtFf] is ASCII only. \b sees the text before the
   window (re's pos) but not after its end (endpos). */

#define E_ACUTE_CLASS '\x01'  /* [ée] in a word below */

static const char *const PHONE_WORDS[] = {
    "phone", "tel", "telephone", "call", "calls", "mobile", "cell", "whatsapp", "signal", "number", "contact",
    "reach", "fax", "sms", "text me", "ring", "dial", "dial-in", "mob", "ph", "oncall", "on-call", "telefon",
    "t\x01l\x01phone", "handy", "cellulare", "celular", "tel\x01" "fono", NULL,
};
static const char *const PHONE_WORDS_UNBOUNDED[] = {"sms", "phone", "mobile", "whatsapp", "fax", NULL};

/* The character as the words here spell it: re's case-insensitive equivalents of their
   letters (measured over every code point for each letter of PHONE_WORDS and IDENTIFIER_WORDS). */
static Py_UCS4 fold_word_letter(Py_UCS4 ch) {
    if (ch < 128)
        return (ch >= 'A' && ch <= 'Z') ? ch + 32 : ch;
    if (ch == 0x130 || ch == 0x131)
        return 'i';
    if (ch == 0x17F)
        return 's';
    if (ch == 0x212A)
        return 'k';
    if (ch == 0xC9)
        return 0xE9;
    return ch;
}

/* End of `word` matched case-insensitively at pos (before hi), or -1; first: the folded
   character at pos. */
static Py_ssize_t word_at(const Span *c, Py_ssize_t pos, Py_ssize_t hi, const char *word, Py_UCS4 first) {
    if (first != (Py_UCS4)(unsigned char)*word)
        return -1;
    for (word++, pos++; *word; word++, pos++) {
        if (pos >= hi)
            return -1;
        Py_UCS4 ch = fold_word_letter(AT(c, pos));
        if (*word == E_ACUTE_CLASS ? !(ch == 'e' || ch == 0xE9) : ch != (Py_UCS4)(unsigned char)*word)
            return -1;
    }
    return pos;
}

static int phone_word_at(const Span *c, Py_ssize_t pos, Py_ssize_t hi) {
    Py_UCS4 first = fold_word_letter(AT(c, pos));
    if (first == 0 || first >= 128 || !strchr("cdfhmnoprstw", (int)first))
        return 0;  /* the regex's leading lookahead */
    for (const char *const *word = PHONE_WORDS_UNBOUNDED; *word; word++) {
        Py_ssize_t end = word_at(c, pos, hi, *word, first);
        if (end >= 0 && end < hi && (!is_word(AT(c, end)) || AT(c, end) == '_'))
            return 1;  /* (?=[\W_]) */
    }
    if (pos > 0 && is_word(AT(c, pos - 1)))
        return 0;  /* no \b before (the text's next character is a letter in every alternative left) */
    for (const char *const *word = PHONE_WORDS; *word; word++) {
        Py_ssize_t end = word_at(c, pos, hi, *word, first);
        if (end >= 0 && (end == hi || !is_word(AT(c, end))))
            return 1;
    }
    Py_UCS4 ch = AT(c, pos);
    if (ch == 'M' || ch == 'm' || ch == 'T' || ch == 't' || ch == 'F' || ch == 'f') {
        Py_ssize_t next = pos + 1;
        if (next < hi && (AT(c, next) == ' ' || AT(c, next) == '\t') && next + 1 < hi && AT(c, next + 1) == ':')
            return 1;
        if (next < hi && AT(c, next) == ':')
            return 1;
    }
    return 0;
}

static PyObject *phone_word_before(PyObject *module, PyObject *args) {
    PyObject *text;
    Py_ssize_t start;
    if (!PyArg_ParseTuple(args, "Un:phone_word_before", &text, &start))
        return NULL;
    Py_ssize_t lo = start - 48, hi = start;
    clamp_window(text, &lo, &hi);
    Span c = text_span(text, PyUnicode_GET_LENGTH(text));
    for (Py_ssize_t pos = lo; pos < hi; pos++) {
        if (phone_word_at(&c, pos, hi))
            Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}


/* ---- An identifier word right before a candidate: NOT_PHONE_CONTEXT (redaction/patterns.py)

   identifier_word_before(text, start) is NOT_PHONE_CONTEXT.search(text, max(0, start - 24),
   start) is not None, for reference (tests compare them on fuzzed strings):
     (?i)(?=[abdegioprstuv])\b(?:isbn(?:-1[03])?|ean|...|acct)\b[\s:#=\"'\-]*
         (?:(?:no|nr|number|num)\.?\s*)?$
   $ is the window's end (or before a last "\n", which \s covers). */

static const char *const IDENTIFIER_WORDS[] = {
    "isbn", "isbn-10", "isbn-13", "ean", "gtin", "upc", "sku", "po", "order", "invoice", "tracking", "parcel",
    "shipment", "ref", "reference", "build", "version", "ver", "v", "release", "sha", "id", "epoch", "ts",
    "timestamp", "driver", "account", "acct", NULL,
};
static const char *const NUMBER_ABBREVIATIONS[] = {"no", "nr", "number", "num", NULL};

static int identifier_separator(Py_UCS4 ch) {
    return Py_UNICODE_ISSPACE(ch) || ch == ':' || ch == '#' || ch == '=' || ch == '"' || ch == '\'' || ch == '-';
}

static int only_space_from(const Span *c, Py_ssize_t pos, Py_ssize_t hi) {
    for (; pos < hi; pos++) {
        if (!Py_UNICODE_ISSPACE(AT(c, pos)))
            return 0;
    }
    return 1;
}

/* After the word's \b at end: separators, then an optional "no."/"nr"/"number"/"num" and
   spaces, to the window's end. */
static int identifier_tail(const Span *c, Py_ssize_t end, Py_ssize_t hi) {
    Py_ssize_t run = end;
    while (run < hi && identifier_separator(AT(c, run)))
        run++;
    if (run == hi)
        return 1;
    for (Py_ssize_t at = end; at <= run; at++) {
        Py_UCS4 first = fold_word_letter(AT(c, at));
        for (const char *const *word = NUMBER_ABBREVIATIONS; *word; word++) {
            Py_ssize_t after = word_at(c, at, hi, *word, first);
            if (after < 0)
                continue;
            if (only_space_from(c, after, hi) || (after < hi && AT(c, after) == '.' && only_space_from(c, after + 1, hi)))
                return 1;
        }
    }
    return 0;
}

static PyObject *identifier_word_before(PyObject *module, PyObject *args) {
    PyObject *text;
    Py_ssize_t start;
    if (!PyArg_ParseTuple(args, "Un:identifier_word_before", &text, &start))
        return NULL;
    Py_ssize_t lo = start - 24, hi = start;
    clamp_window(text, &lo, &hi);
    Span c = text_span(text, PyUnicode_GET_LENGTH(text));
    for (Py_ssize_t pos = lo; pos < hi; pos++) {
        Py_UCS4 first = fold_word_letter(AT(&c, pos));
        if (first == 0 || first >= 128 || !strchr("abdegioprstuv", (int)first) || (pos > 0 && is_word(AT(&c, pos - 1))))
            continue;  /* the leading lookahead and \b */
        for (const char *const *word = IDENTIFIER_WORDS; *word; word++) {
            Py_ssize_t end = word_at(&c, pos, hi, *word, first);
            if (end >= 0 && (end == hi || !is_word(AT(&c, end))) && identifier_tail(&c, end, hi))
                Py_RETURN_TRUE;
        }
    }
    Py_RETURN_FALSE;
}


/* ---- A unit right after a candidate: UNIT_AFTER (redaction/patterns.py) ------------------

   unit_after(text, end) is UNIT_AFTER.match(text, end) is not None, for reference (tests
   compare them on fuzzed strings):
     (?i)[ \u00a0]?(?:ms|s|sec|secs|seconds|min|bytes|[kmgt]i?b|%|tokens|rows|items|km|kg|eur|usd|€|\$)\b
   \b after "%", "€" or "$" wants a word character next. */

static const char *const UNITS[] = {
    "ms", "s", "sec", "secs", "seconds", "min", "bytes", "kb", "kib", "mb", "mib", "gb", "gib", "tb", "tib", "%",
    "tokens", "rows", "items", "km", "kg", "eur", "usd", "$", NULL,
};

static int word_boundary_at(const Span *c, Py_ssize_t at) {
    int before = at > 0 && is_word(AT(c, at - 1));
    int after = at < span_length(c) && is_word(AT(c, at));
    return before != after;
}

static PyObject *unit_after(PyObject *module, PyObject *args) {
    PyObject *text;
    Py_ssize_t end;
    if (!PyArg_ParseTuple(args, "Un:unit_after", &text, &end))
        return NULL;
    Py_ssize_t length = PyUnicode_GET_LENGTH(text);
    Span c = text_span(text, length);
    if (end < 0)
        end = 0;
    Py_ssize_t tries[2] = {-1, end};  /* after a space first, as re tries [ \u00a0]? */
    if (end < length && is_space(AT(&c, end)))
        tries[0] = end + 1;
    for (int t = 0; t < 2; t++) {
        Py_ssize_t at = tries[t];
        if (at < 0 || at >= length)
            continue;
        Py_UCS4 first = fold_word_letter(AT(&c, at));
        if (first == 0x20AC && word_boundary_at(&c, at + 1))
            Py_RETURN_TRUE;
        for (const char *const *unit = UNITS; *unit; unit++) {
            Py_ssize_t after = word_at(&c, at, length, *unit, first);
            if (after >= 0 && word_boundary_at(&c, after))
                Py_RETURN_TRUE;
        }
    }
    Py_RETURN_FALSE;
}


/* ---- column_header (redaction/patterns.py): the header cell of a CSV or markdown column ---

   Same walk as the Python reference (tests compare them on fuzzed tables): the line holding
   start, its separator ("|" with two or more, else "," with one or more), then up over the
   lines with as many separators; the first of them is the header, unless it is this line. */

static Py_ssize_t count_char(const Span *c, Py_UCS4 ch, Py_ssize_t from, Py_ssize_t to) {
    Py_ssize_t n = 0;
    for (Py_ssize_t i = from; i < to; i++)
        n += AT(c, i) == ch;
    return n;
}

/* Start of the line ending before `before` (text.rfind("\n", 0, before) + 1). */
static Py_ssize_t line_start_before(const Span *c, Py_ssize_t before) {
    for (Py_ssize_t i = before - 1; i >= 0; i--) {
        if (AT(c, i) == '\n')
            return i + 1;
    }
    return 0;
}

static PyObject *column_header(PyObject *module, PyObject *args) {
    PyObject *text;
    Py_ssize_t start;
    if (!PyArg_ParseTuple(args, "Un:column_header", &text, &start))
        return NULL;
    Py_ssize_t length = PyUnicode_GET_LENGTH(text);
    if (start < 0 || start > length) {
        PyErr_SetString(PyExc_ValueError, "column_header: start outside the text");
        return NULL;
    }
    Span c = text_span(text, length);
    Py_ssize_t line_start = line_start_before(&c, start);
    Py_ssize_t line_end = start;
    while (line_end < length && AT(&c, line_end) != '\n')
        line_end++;
    Py_UCS4 sep = count_char(&c, '|', line_start, line_end) >= 2 ? '|' : (count_char(&c, ',', line_start, line_end) >= 1 ? ',' : 0);
    if (sep == 0 || line_start == 0)
        Py_RETURN_NONE;
    Py_ssize_t column = count_char(&c, sep, line_start, start);
    Py_ssize_t cells = count_char(&c, sep, line_start, line_end);
    Py_ssize_t header_start = -1, pos = line_start;
    for (int row = 0; row < 50 && pos != 0; row++) {
        Py_ssize_t prev_start = line_start_before(&c, pos - 1);
        if (count_char(&c, sep, prev_start, pos - 1) != cells)
            break;
        header_start = pos = prev_start;
    }
    if (header_start < 0)
        Py_RETURN_NONE;
    Py_ssize_t header_end = header_start;  /* the header line ends at its "\n" (pos - 1 of the row below it) */
    while (AT(&c, header_end) != '\n')
        header_end++;
    Py_ssize_t cell_start = header_start, seen = 0;
    for (Py_ssize_t i = header_start; i < header_end && seen < column; i++) {
        if (AT(&c, i) == sep) {
            seen++;
            cell_start = i + 1;
        }
    }
    if (seen < column)
        Py_RETURN_NONE;
    Py_ssize_t cell_end = cell_start;
    while (cell_end < header_end && AT(&c, cell_end) != sep)
        cell_end++;
    return PyUnicode_Substring(text, cell_start, cell_end);
}

/* The 32-bit value of an ASCII dotted quad as ipaddress.IPv4Address reads it (four octets of
   1-3 digits, no leading zero, at most 255); 0 if it is none. */
static int parse_dotted_quad(const char *s, Py_ssize_t n, unsigned long *value) {
    unsigned long result = 0;
    int octets = 0;
    Py_ssize_t i = 0;
    while (1) {
        Py_ssize_t start = i;
        unsigned long octet = 0;
        while (i < n && s[i] != '.') {
            if (s[i] < '0' || s[i] > '9' || i - start >= 3)
                return 0;
            octet = octet * 10 + (unsigned long)(s[i] - '0');
            i++;
        }
        if (i == start || (s[start] == '0' && i - start > 1) || octet > 255 || ++octets > 4)
            return 0;
        result = (result << 8) | octet;
        if (i == n)
            break;
        i++; /* the '.' */
    }
    if (octets != 4)
        return 0;
    *value = result;
    return 1;
}

/* An IPv4 address (also one mapped into IPv6) _not_personal calls personal-free: 0/8, 10/8,
   127/8, 169.254/16, 172.16/12, 192.168/16, 224/4, 240/4 (patterns._NOT_PERSONAL_V4; the fuzz
   test compares the two). */
static int v4_not_personal(unsigned long a) {
    unsigned long first = a >> 24;
    return first == 0 || first == 10 || first == 127 || first >= 224 || (a >> 16) == 0xA9FE ||
           (a >> 20) == 0xAC1 || (a >> 16) == 0xC0A8;
}

/* Whether an ASCII hextet of 1-4 hex digits; its value in *value. */
static int parse_hextet(const char *s, Py_ssize_t n, unsigned *value) {
    if (n < 1 || n > 4)
        return 0;
    unsigned result = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        char ch = s[i];
        unsigned digit;
        if (ch >= '0' && ch <= '9')
            digit = (unsigned)(ch - '0');
        else if (ch >= 'a' && ch <= 'f')
            digit = (unsigned)(ch - 'a' + 10);
        else if (ch >= 'A' && ch <= 'F')
            digit = (unsigned)(ch - 'A' + 10);
        else
            return 0;
        result = (result << 4) | digit;
    }
    *value = result;
    return 1;
}

/* The eight hextets of an ASCII IPv6 address without zone id, by the rules of ipaddress's
   IPv6Address._ip_int_from_string ("::" once, leading/trailing ':' only as part of it, an
   IPv4 tail); 0 if it is none. */
static int parse_ipv6(const char *s, Py_ssize_t n, unsigned hextets[8]) {
    enum { MOST_PARTS = 9 };
    Py_ssize_t part_start[MOST_PARTS + 1], part_len[MOST_PARTS + 1];
    unsigned preset[MOST_PARTS + 1];
    int is_preset[MOST_PARTS + 1];
    int parts = 0;
    Py_ssize_t start = 0;
    for (Py_ssize_t i = 0; i <= n; i++) {
        if (i == n || s[i] == ':') {
            if (parts == MOST_PARTS + 1)
                return 0; /* more than 9 parts even before an IPv4 tail is split in two */
            part_start[parts] = start;
            part_len[parts] = i - start;
            is_preset[parts] = 0;
            parts++;
            start = i + 1;
        }
    }
    if (parts < 3)
        return 0;
    Py_ssize_t last_start = part_start[parts - 1], last_len = part_len[parts - 1];
    if (memchr(s + last_start, '.', (size_t)last_len) != NULL) {
        unsigned long v4;
        if (!parse_dotted_quad(s + last_start, last_len, &v4) || parts + 1 > MOST_PARTS + 1)
            return 0;
        is_preset[parts - 1] = 1;
        preset[parts - 1] = (unsigned)(v4 >> 16);
        is_preset[parts] = 1;
        preset[parts] = (unsigned)(v4 & 0xFFFF);
        part_len[parts - 1] = part_len[parts] = 1;
        parts++;
    }
    if (parts > MOST_PARTS)
        return 0;
    int skip = -1;
    for (int i = 1; i < parts - 1; i++) {
        if (part_len[i] == 0) {
            if (skip >= 0)
                return 0;
            skip = i;
        }
    }
    int high, low;
    if (skip >= 0) {
        high = skip;
        low = parts - skip - 1;
        if (part_len[0] == 0 && --high)
            return 0;
        if (part_len[parts - 1] == 0 && --low)
            return 0;
        if (8 - (high + low) < 1)
            return 0;
    } else {
        if (parts != 8 || part_len[0] == 0 || part_len[parts - 1] == 0)
            return 0;
        high = parts;
        low = 0;
    }
    for (int i = 0; i < 8; i++)
        hextets[i] = 0;
    for (int i = 0; i < high + low; i++) {
        int part = i < high ? i : parts - (high + low) + i;
        int slot = i < high ? i : 8 - (high + low) + i;
        if (is_preset[part])
            hextets[slot] = preset[part];
        else if (!parse_hextet(s + part_start[part], part_len[part], &hextets[slot]))
            return 0;
    }
    return 1;
}

/* ipv6_verdict(value): what patterns.ipv6_verdict says of an IPv6 candidate without zone id:
   0 no address (ip_address, or ip_interface with a "/nn", raises ValueError), 1 an address,
   2 an address _not_personal is true of; -1 for a value with non-ASCII characters, which the
   Python reference decides. */
static PyObject *ipv6_verdict(PyObject *module, PyObject *arg) {
    if (!PyUnicode_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "ipv6_verdict takes a str");
        return NULL;
    }
    if (!PyUnicode_IS_ASCII(arg))
        return PyLong_FromLong(-1);
    const char *s = (const char *)PyUnicode_1BYTE_DATA(arg);
    Py_ssize_t n = PyUnicode_GET_LENGTH(arg);
    const char *slash = memchr(s, '/', (size_t)n);
    Py_ssize_t address_len = n;
    if (slash != NULL) {
        /* IPv6Interface: one '/', then 1+ ASCII digits up to 128 (leading zeros allowed) */
        address_len = slash - s;
        Py_ssize_t digits = n - address_len - 1;
        if (digits < 1 || memchr(slash + 1, '/', (size_t)digits) != NULL)
            return PyLong_FromLong(0);
        unsigned long prefix = 0;
        for (Py_ssize_t i = 0; i < digits; i++) {
            char ch = slash[1 + i];
            if (ch < '0' || ch > '9')
                return PyLong_FromLong(0);
            if (prefix <= 128)
                prefix = prefix * 10 + (unsigned long)(ch - '0');
        }
        if (prefix > 128)
            return PyLong_FromLong(0);
    }
    unsigned h[8];
    if (!parse_ipv6(s, address_len, h))
        return PyLong_FromLong(0);
    int high_zero = h[0] == 0 && h[1] == 0 && h[2] == 0 && h[3] == 0 && h[4] == 0;
    int not_personal;
    if (high_zero && h[5] == 0xFFFF)
        not_personal = v4_not_personal(((unsigned long)h[6] << 16) | h[7]);
    else
        not_personal = (high_zero && h[5] == 0 && h[6] == 0 && h[7] <= 1) /* unspecified, loopback */
                       || (h[0] >> 8) == 0xFF                                /* multicast */
                       || (h[0] & 0xFE00) == 0xFC00;                         /* fc00::/7 */
    return PyLong_FromLong(not_personal ? 2 : 1);
}

/* ---- The key=value secret scan: KV_RE (redaction/patterns.py) as re matches it ------------

   KV_RE's key alternation, written out in re's order of trying (alternatives left to right,
   an optional part with before without, "(?:php|j)?" as php, j, nothing): the first key
   whose rest of the match succeeds is re's. '~' stands for [_\-]; letters match as re's
   IGNORECASE does (fold_word_letter). What follows the key depends only on where it ends:
   an optional quote, [ \t]*, ":" or "=" (then "=>"), or \bis\b, [ \t]*, then a value:
   "..." or '...' of 4-200 characters without that quote or a line break, or 4-200
   characters that are not \s nor "',;<>`()[]{}. */

static const char *const KV_KEYS[] = {
    "password", "passwd", "passwort", "pwd", "pass", "passphrase", "secret", "client~secret", "clientsecret",
    "secret~key", "secretkey", "api~key", "apikey", "apikey", "api~token", "apitoken", "access~token", "accesstoken",
    "access~key", "accesskey", "auth~token", "authtoken", "refresh~token", "refreshtoken", "private~key", "privatekey",
    "aws_secret_access_key", "token", "key", "auth", "credentials", "credential",
    "phpsession~id", "phpsession~token", "phpsession~key", "phpsession~", "phpsessionid", "phpsessiontoken",
    "phpsessionkey", "phpsession",
    "jsession~id", "jsession~token", "jsession~key", "jsession~", "jsessionid", "jsessiontoken", "jsessionkey", "jsession",
    "session~id", "session~token", "session~key", "session~", "sessionid", "sessiontoken", "sessionkey", "session",
    "sessid", "csrf~token", "csrftoken", "xsrf~token", "xsrftoken", NULL,
};

/* End of `key` at pos (before hi), or -1. */
static Py_ssize_t kv_key_at(const Span *c, Py_ssize_t pos, Py_ssize_t hi, const char *key) {
    for (; *key; key++, pos++) {
        if (pos >= hi)
            return -1;
        Py_UCS4 ch = AT(c, pos);
        if (*key == '~' ? !(ch == '_' || ch == '-') : fold_word_letter(ch) != (Py_UCS4)(unsigned char)*key)
            return -1;
    }
    return pos;
}

static Py_ssize_t skip_blanks(const Span *c, Py_ssize_t pos, Py_ssize_t hi) {
    while (pos < hi && (AT(c, pos) == ' ' || AT(c, pos) == '\t'))
        pos++;
    return pos;
}

static int kv_bare_value_char(Py_UCS4 ch) {
    return !(Py_UNICODE_ISSPACE(ch) || (ch < 128 && strchr("\"',;<>`()[]{}", (int)ch)));
}

/* [ \t]* and the value from pos: its group's span in value[], whether quoted; 0 if none. */
static int kv_value(const Span *c, Py_ssize_t pos, Py_ssize_t hi, Py_ssize_t value[2], int *quoted) {
    pos = skip_blanks(c, pos, hi);
    if (pos >= hi)
        return 0;
    Py_UCS4 first = AT(c, pos);
    Py_ssize_t run = 0;
    if (first == '"' || first == '\'') {
        while (run < 200 && pos + 1 + run < hi && AT(c, pos + 1 + run) != first && AT(c, pos + 1 + run) != '\n')
            run++;
        if (run < 4 || pos + 1 + run >= hi || AT(c, pos + 1 + run) != first)
            return 0;
        value[0] = pos + 1;
        *quoted = 1;
    } else {
        while (run < 200 && pos + run < hi && kv_bare_value_char(AT(c, pos + run)))
            run++;
        if (run < 4)
            return 0;
        value[0] = pos;
        *quoted = 0;
    }
    value[1] = value[0] + run;
    return 1;
}

/* The rest of KV_RE after a key ending at key_end: 1 with the value's span, or 0. */
static int kv_rest(const Span *c, Py_ssize_t key_end, Py_ssize_t hi, int *key_quoted, Py_ssize_t value[2], int *quoted) {
    Py_ssize_t pos = key_end;
    *key_quoted = pos < hi && (AT(c, pos) == '"' || AT(c, pos) == '\'');
    pos = skip_blanks(c, pos + *key_quoted, hi);
    if (pos >= hi)
        return 0;
    Py_UCS4 ch = AT(c, pos);
    if (ch == ':' || ch == '=') {
        if (kv_value(c, pos + 1, hi, value, quoted))
            return 1;
        return ch == '=' && pos + 1 < hi && AT(c, pos + 1) == '>' && kv_value(c, pos + 2, hi, value, quoted);
    }
    /* \bis\b: the "i" is a word character, so the first \b wants none before it. */
    if (fold_word_letter(ch) != 'i' || (pos > 0 && is_word(AT(c, pos - 1))) || pos + 1 >= hi
        || fold_word_letter(AT(c, pos + 1)) != 's' || (pos + 2 < hi && is_word(AT(c, pos + 2))))
        return 0;
    return kv_value(c, pos + 2, hi, value, quoted);
}

/* kv_candidates(text, lo, hi): (key start, key end, quote after the key, value start, value
   end, quoted value) of each match of KV_RE.finditer(text, lo, hi). */
static PyObject *kv_candidates(PyObject *module, PyObject *args) {
    PyObject *text;
    Py_ssize_t lo, hi;
    if (!PyArg_ParseTuple(args, "Unn", &text, &lo, &hi))
        return NULL;
    clamp_window(text, &lo, &hi);
    Span c = text_span(text, hi);
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    Py_ssize_t pos = lo;
    while (pos < hi) {
        Py_UCS4 first = fold_word_letter(AT(&c, pos));
        Py_UCS4 before = pos > 0 ? fold_word_letter(AT(&c, pos - 1)) : 0;
        if (first >= 128 || !strchr("acjkprstx", (int)first) || first == 0
            || (before < 128 && ((before >= 'a' && before <= 'z') || (before >= '0' && before <= '9')))) {
            pos++;
            continue;
        }
        Py_ssize_t value[2] = {0, 0};
        int key_quoted = 0, quoted = 0;
        Py_ssize_t key_end = -1;
        for (const char *const *key = KV_KEYS; *key; key++) {
            if ((Py_UCS4)(unsigned char)**key != first)
                continue;
            key_end = kv_key_at(&c, pos, hi, *key);
            if (key_end >= 0 && kv_rest(&c, key_end, hi, &key_quoted, value, &quoted))
                break;
            key_end = -1;
        }
        if (key_end < 0) {
            pos++;
            continue;
        }
        if (append_stolen(out, Py_BuildValue("(nnOnnO)", pos, key_end, key_quoted ? Py_True : Py_False, value[0], value[1],
                                             quoted ? Py_True : Py_False)) < 0) {
            Py_DECREF(out);
            return NULL;
        }
        pos = value[1] + quoted;  /* the match ends after the closing quote */
    }
    return out;
}

/* ---- The e-mail scan: EMAIL_RE (redaction/patterns.py) as re matches it --------------------

   (?<![\w.+\-%'])[\w.+\-%']{1,64}@(?:[^\W_](?:[\w\-]{0,62}[^\W_])?\.)+[^\W\d_]{2,24}(?![\w\-])
   No choice here changes a match: the local part is the run of its characters up to the "@"
   (the run cannot hold an "@", so fewer characters never reach one); a label runs to the
   next "." (its characters cannot be one); the greedy "+" takes every label that is followed
   by a ".", then gives them back one by one until the top-level domain after the last one
   kept fits (2-24 letters, no [\w\-] after: fewer letters would leave a letter after). */

static int email_local_char(Py_UCS4 ch) {
    return is_word(ch) || ch == '.' || ch == '+' || ch == '-' || ch == '%' || ch == '\'';
}

/* The end of a label starting at pos, at its "." (before hi), or -1. */
static Py_ssize_t email_label(const Span *c, Py_ssize_t pos, Py_ssize_t hi) {
    Py_ssize_t end = pos;
    while (end < hi && (is_word(AT(c, end)) || AT(c, end) == '-'))
        end++;
    if (end == pos || end - pos > 64 || end >= hi || AT(c, end) != '.')
        return -1;
    Py_UCS4 first = AT(c, pos), last = AT(c, end - 1);
    if (!Py_UNICODE_ISALNUM(first) || !Py_UNICODE_ISALNUM(last))
        return -1;
    return end;
}

/* The end of a top-level domain at pos, or -1. */
static Py_ssize_t email_tld(const Span *c, Py_ssize_t pos, Py_ssize_t hi) {
    Py_ssize_t end = pos;
    while (end < hi && end - pos < 24 && Py_UNICODE_ISALNUM(AT(c, end)) && !Py_UNICODE_ISDECIMAL(AT(c, end)))
        end++;
    if (end - pos < 2 || (end < hi && (is_word(AT(c, end)) || AT(c, end) == '-')))
        return -1;
    return end;
}

/* email_candidates(text, lo, hi): (start, end) of each match of EMAIL_RE.finditer(text, lo, hi). */
static PyObject *email_candidates(PyObject *module, PyObject *args) {
    PyObject *text;
    Py_ssize_t lo, hi;
    if (!PyArg_ParseTuple(args, "Unn", &text, &lo, &hi))
        return NULL;
    clamp_window(text, &lo, &hi);
    Span c = text_span(text, hi);
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    Offsets dots = {0, 0, NULL};
    Py_ssize_t pos = lo;
    while (pos < hi) {
        if (!email_local_char(AT(&c, pos)) || (pos > 0 && email_local_char(AT(&c, pos - 1)))) {
            pos++;
            continue;
        }
        Py_ssize_t at = pos;
        while (at < hi && email_local_char(AT(&c, at)))
            at++;
        Py_ssize_t end = -1;
        if (at < hi && AT(&c, at) == '@' && at - pos <= 64) {
            /* Label ends (each a "."), as many as follow one another; then the top-level
               domain after the last one that lets it fit. */
            Py_ssize_t next = at + 1, dot;
            dots.count = 0;
            while ((dot = email_label(&c, next, hi)) >= 0) {
                if (offsets_push(&dots, dot, 0, 1) < 0) {
                    PyMem_Free(dots.items);
                    Py_DECREF(out);
                    return NULL;
                }
                next = dot + 1;
            }
            for (Py_ssize_t k = dots.count; k >= 1 && end < 0; k--)
                end = email_tld(&c, dots.items[k - 1] + 1, hi);
        }
        if (end < 0) {
            pos++;
            continue;
        }
        if (append_stolen(out, Py_BuildValue("(nn)", pos, end)) < 0) {
            PyMem_Free(dots.items);
            Py_DECREF(out);
            return NULL;
        }
        pos = end;
    }
    PyMem_Free(dots.items);
    return out;
}

/* ---- The rest of the phone score (patterns.shaped_phone_score) -----------------------------

   The same rules in the same order, with the context tests above; the header's word tests
   and _PHONE_SHAPE stay the Python regexes (passed in), the numbering-plan test stays
   Python (None back: "0.7 if _valid_phone(candidate) else 0.0"). */

/* Calls a context test above on (text, position): 1, 0, or -1 on an error. */
static int context_test(PyCFunction test, PyObject *module, PyObject *text, Py_ssize_t position) {
    PyObject *args = Py_BuildValue("(On)", text, position);
    if (args == NULL)
        return -1;
    PyObject *result = test(module, args);
    Py_DECREF(args);
    if (result == NULL)
        return -1;
    int truth = PyObject_IsTrue(result);
    Py_DECREF(result);
    return truth;
}

/* Whether regex_method(header) (a bound search or match) finds something: 1, 0, -1. */
static int regex_finds(PyObject *regex_method, PyObject *header) {
    PyObject *found = PyObject_CallOneArg(regex_method, header);
    if (found == NULL)
        return -1;
    int truth = found != Py_None;
    Py_DECREF(found);
    return truth;
}

static PyObject *score_value(double score) { return PyFloat_FromDouble(score); }

/* phone_score(text, start, candidate_end, extension, not_phone_header, phone_context,
   phone_shape): shaped_phone_score(text, start, text[start:candidate_end], regions,
   extension) given NOT_PHONE_HEADER.search, PHONE_CONTEXT.search and _PHONE_SHAPE.match; None
   where the numbering plan decides; NotImplemented for a candidate outside PHONE_RE's
   characters (the Python function then scores it). */
static PyObject *phone_score(PyObject *module, PyObject *args) {
    PyObject *text, *not_phone_header, *phone_context, *phone_shape;
    Py_ssize_t start, candidate_end;
    int extension;
    if (!PyArg_ParseTuple(args, "UnnpOOO:phone_score", &text, &start, &candidate_end, &extension, &not_phone_header,
                          &phone_context, &phone_shape))
        return NULL;
    Py_ssize_t length = PyUnicode_GET_LENGTH(text);
    if (start < 0 || candidate_end > length || candidate_end - start < 2)
        Py_RETURN_NOTIMPLEMENTED;
    Span c = text_span(text, length);
    c.start = start;
    c.end = candidate_end;
    Py_ssize_t n = span_length(&c);
    /* compact: the characters left after removing "(0)" (re.sub: left to right, no
       overlaps) and the phone punctuation; kept by position. */
    Py_ssize_t compact[16], digits = 0;
    int trunk = 0, all_digits = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 ch = AT(&c, i);
        if (!Py_UNICODE_ISDIGIT(ch))
            all_digits = 0;
        if (ch == '(' && i + 2 < n && AT(&c, i + 1) == '0' && AT(&c, i + 2) == ')') {
            trunk = 1;
            i += 2;
            continue;
        }
        if (phone_punctuation(ch))
            continue;
        if (!Py_UNICODE_ISDECIMAL(ch) || digits == 16)
            Py_RETURN_NOTIMPLEMENTED;  /* (never from phone_candidates: \d digits, at most 15) */
        compact[digits++] = i;
    }
    if (digits == 0)
        Py_RETURN_NOTIMPLEMENTED;
    Py_UCS4 first = AT(&c, 0);
    int international = first == '+' || (first == '(' && AT(&c, 1) == '+');
    PyObject *header = NULL;  /* (NULL: not looked up yet) */
    PyObject *result = NULL;
    int found;
    if (!international) {
        if ((found = context_test(unit_after, module, text, candidate_end)) != 0)
            return found < 0 ? NULL : score_value(0.0);  /* "8751007310 ms", "1 234 567 tokens" */
        if ((found = context_test(identifier_word_before, module, text, start)) != 0)
            return found < 0 ? NULL : score_value(0.0);
        PyObject *position_args = Py_BuildValue("(On)", text, start);
        header = position_args ? column_header(module, position_args) : NULL;
        Py_XDECREF(position_args);
        if (header == NULL)
            return NULL;
        if (header != Py_None && (found = regex_finds(not_phone_header, header)) != 0) {
            result = found < 0 ? NULL : score_value(0.0);
            goto done;
        }
    }
    int context = context_test(phone_word_before, module, text, start);
    if (context < 0)
        goto done;
    if (!context) {
        if (header == NULL) {
            PyObject *position_args = Py_BuildValue("(On)", text, start);
            header = position_args ? column_header(module, position_args) : NULL;
            Py_XDECREF(position_args);
            if (header == NULL)
                goto done;
        }
        if (header != Py_None && (context = regex_finds(phone_context, header)) < 0)
            goto done;
    }
    /* DECIMAL: ^\+?[1-9]\d*[.,]\d+$ (no "," or line break in a candidate) */
    Py_ssize_t i = first == '+' ? 1 : 0;
    int decimal = i < n && AT(&c, i) >= '1' && AT(&c, i) <= '9';
    if (decimal) {
        for (i++; i < n && Py_UNICODE_ISDECIMAL(AT(&c, i)); i++)
            ;
        Py_ssize_t point = i;
        decimal = point < n && (AT(&c, point) == '.' || AT(&c, point) == ',');
        for (i = point + 1; decimal && i < n; i++)
            decimal = Py_UNICODE_ISDECIMAL(AT(&c, i));
        decimal = decimal && n > point + 1;
    }
    int rest_digits = n > 1;  /* candidate[1:].isdigit() */
    for (i = 1; i < n && rest_digits; i++)
        rest_digits = Py_UNICODE_ISDIGIT(AT(&c, i));
    if ((decimal && !context) || (international && AT(&c, compact[0]) == '0' && rest_digits)) {
        result = score_value(0.0);  /* "+3.140000", "+000000120": numbers, not phones */
        goto done;
    }
    if (digits >= 12 && !international && luhn_span(&c, compact, digits) && has_card_brand(&c, compact, digits)) {
        result = score_value(0.0);  /* a card number */
        goto done;
    }
    if (international) {
        result = score_value(context ? 0.95 : 0.8);
        goto done;
    }
    int separated = !all_digits;
    if (separated && !context) {
        Py_ssize_t zero_groups = 0;  /* _LEADING_ZERO_GROUP: "0" after one of " .-/)" */
        for (i = 1; i < n; i++) {
            Py_UCS4 before = AT(&c, i - 1);
            zero_groups += AT(&c, i) == '0' && (before == ' ' || before == '.' || before == '-' || before == '/' || before == ')');
        }
        if (zero_groups >= 2) {
            result = score_value(0.0);  /* "01 012 0123 01234" */
            goto done;
        }
    }
    int shaped = extension || (separated && trunk);
    if (!shaped && separated) {
        PyObject *candidate = PyUnicode_Substring(text, start, candidate_end);
        shaped = candidate ? regex_finds(phone_shape, candidate) : -1;
        Py_XDECREF(candidate);
        if (shaped < 0)
            goto done;
    }
    if (shaped) {
        result = score_value(context ? 0.95 : 0.75);
        goto done;
    }
    Py_UCS4 lead = AT(&c, compact[0]);
    if (!separated && !context) {
        if (digits < 10) {
            result = score_value(0.0);
            goto done;
        }
        long ean = 0;
        for (i = 0; i < digits; i++)
            ean += Py_UNICODE_TODECIMAL(AT(&c, compact[i])) * (i % 2 ? 3 : 1);
        if ((digits == 13 && ean % 10 == 0) || (digits == 13 && lead == '1')) {
            result = score_value(0.0);  /* a barcode or an epoch in milliseconds */
            goto done;
        }
    }
    if (context && (separated || lead == '0' || lead == '+' || digits >= 8)) {
        result = score_value(0.9);
        goto done;
    }
    result = Py_NewRef(Py_None);  /* the numbering plan decides */
done:
    Py_XDECREF(header);
    return result;
}

/* ---- The names tier's token walk (names.NameFinder._follow) --------------------------------

   TOKEN = [^\W\d_]+(?:['’\-][^\W\d_]+)*: a letter is a \w character that is neither a \d digit
   nor "_"; the separated parts need a letter after their separator, so the walk never backs
   up. Words are lowercased by str.lower and looked up in the gazetteer's sets (passed in). */

static int name_letter(Py_UCS4 c) { return c != '_' && is_word(c) && !is_digit(c); }

/* The end of TOKEN's match at pos, or -1. */
static Py_ssize_t name_token(const Span *c, Py_ssize_t pos, Py_ssize_t size) {
    if (pos >= size || !name_letter(AT(c, pos)))
        return -1;
    Py_ssize_t end = pos + 1;
    for (;;) {
        while (end < size && name_letter(AT(c, end)))
            end++;
        if (end + 1 < size && (AT(c, end) == '\'' || AT(c, end) == 0x2019 || AT(c, end) == '-')
            && name_letter(AT(c, end + 1)))
            end += 2;
        else
            return end;
    }
}

static Py_ssize_t skip_gap(const Span *c, Py_ssize_t pos, Py_ssize_t size) {  /* [ \t]*; _GAP wants one */
    while (pos < size && (AT(c, pos) == ' ' || AT(c, pos) == '\t'))
        pos++;
    return pos;
}

static PyObject *LOWER_NAME;  /* "lower" (interned at import) */

/* text[start:end].lower() */
static PyObject *lowered(PyObject *text, Py_ssize_t start, Py_ssize_t end) {
    PyObject *word = PyUnicode_Substring(text, start, end);
    if (word == NULL)
        return NULL;
    PyObject *low = PyObject_CallMethodNoArgs(word, LOWER_NAME);
    Py_DECREF(word);
    return low;
}

/* Whether text[start:end].lower() is in `set`: 1, 0, -1. */
static int lowered_in(PyObject *text, Py_ssize_t start, Py_ssize_t end, PyObject *set) {
    PyObject *low = lowered(text, start, end);
    if (low == NULL)
        return -1;
    int in = PySequence_Contains(set, low);
    Py_DECREF(low);
    return in;
}

/* follow_tokens(text, pos, max_tokens, any_case, any_first, surname_at, unknown_ok, sets):
   NameFinder._follow's tokens; sets: (common, surnames, given, names, particles, stop words). */
static PyObject *follow_tokens(PyObject *module, PyObject *args) {
    PyObject *text, *common, *surnames, *given, *names, *particles, *stop_words;
    Py_ssize_t pos, max_tokens, surname_at;
    int any_case, any_first, unknown_ok;
    if (!PyArg_ParseTuple(args, "Unnppnp(OOOOOO):follow_tokens", &text, &pos, &max_tokens, &any_case, &any_first,
                          &surname_at, &unknown_ok, &common, &surnames, &given, &names, &particles, &stop_words))
        return NULL;
    Py_ssize_t size = PyUnicode_GET_LENGTH(text);
    Span c = text_span(text, size);
    PyObject *tokens = PyList_New(0);
    if (tokens == NULL)
        return NULL;
    PyObject *low = NULL;
    if (pos < 0)
        pos = 0;  /* (TOKEN.match's own clamping) */
    while (PyList_GET_SIZE(tokens) < max_tokens) {
        Py_ssize_t start = pos, end = name_token(&c, pos, size);
        if (end < 0)
            break;
        if (end - start >= 2 && AT(&c, end - 1) == 's' && (AT(&c, end - 2) == '\'' || AT(&c, end - 2) == 0x2019))
            end -= 2;  /* the possessive "'s" */
        low = lowered(text, start, end);
        if (low == NULL)
            goto fail;
        int capital = Py_UNICODE_ISUPPER(AT(&c, start));
        int in;
        if (!capital && (in = PySequence_Contains(particles, low)) != 0) {
            if (in < 0)
                goto fail;
            /* "van der", "de la": skipped up to the capitalised word after them */
            Py_ssize_t probe = end, next_start = -1;
            for (;;) {
                Py_ssize_t gap_end = skip_gap(&c, probe, size);
                Py_ssize_t next_end = gap_end > probe ? name_token(&c, gap_end, size) : -1;
                if (next_end < 0)
                    break;
                if (Py_UNICODE_ISUPPER(AT(&c, gap_end))) {
                    next_start = gap_end;
                    break;
                }
                if ((in = lowered_in(text, gap_end, next_end, particles)) <= 0) {
                    if (in < 0)
                        goto fail;
                    break;
                }
                probe = next_end;
            }
            Py_CLEAR(low);
            if (next_start < 0)
                break;
            pos = next_start;
            continue;
        }
        int ok;
        if (capital) {
            ok = any_first && PyList_GET_SIZE(tokens) == 0;
            if (!ok && (in = PySequence_Contains(common, low)) <= 0)
                ok = in < 0 ? -1 : 1;
            if (!ok && (in = PySequence_Contains(surnames, low)) != 0)
                ok = in;
            if (!ok && (in = PySequence_Contains(given, low)) != 0)
                ok = in;
            if (!ok && PyList_GET_SIZE(tokens) == surname_at && (in = PySequence_Contains(stop_words, low)) <= 0)
                ok = in < 0 ? -1 : 1;
        } else {
            ok = 0;
            if (any_case) {
                ok = unknown_ok;
                if (!ok && (in = PySequence_Contains(names, low)) != 0)
                    ok = in;
                if (ok > 0 && (in = PySequence_Contains(common, low)) != 0)
                    ok = in < 0 ? -1 : 0;
            }
        }
        Py_CLEAR(low);
        if (ok < 0)
            goto fail;
        if (!ok || (end < size && (Py_UNICODE_ISDIGIT(AT(&c, end)) || AT(&c, end) == '_' || AT(&c, end) == '@')))
            break;
        if (append_stolen(tokens, Py_BuildValue("(nn)", start, end)) < 0)
            goto fail;
        Py_ssize_t gap_end = skip_gap(&c, end, size);
        if (gap_end == end)
            break;
        pos = gap_end;
    }
    return tokens;
fail:
    Py_XDECREF(low);
    Py_DECREF(tokens);
    return NULL;
}

/* ---- Overlapping spans (engine.Redactor._resolve) -------------------------------------------

   The spans kept (non-empty, score at least the type's minimum, a type asked for), sorted by
   (-score, -priority, -length, start) with ties in their order (as list.sort), each taken
   unless it overlaps one taken before, in the end sorted by start. A span that overlaps a
   taken one and reaches past it is merged with it: that, and anything this walk cannot
   mirror exactly (scores that are not floats, NaN, more than RESOLVE_MOST spans), is left
   to the Python code (None back). */

#define RESOLVE_MOST 48

typedef struct {
    PyObject *entity;
    double score;
    long priority;
    Py_ssize_t start, end;
} Resolving;

static int resolve_before(const Resolving *a, const Resolving *b) {  /* a's sort key < b's */
    if (a->score != b->score)
        return a->score > b->score;
    if (a->priority != b->priority)
        return a->priority > b->priority;
    if (a->end - a->start != b->end - b->start)
        return a->end - a->start > b->end - b->start;
    return a->start < b->start;
}

/* Reads an entity's fields; 1 if it is kept, 0 if not, -1 on an error, -2 if the walk here
   cannot mirror it. */
static int resolve_read(PyObject *entity, PyObject *score_for, PyObject *entities, PyObject *priorities, Resolving *out) {
    static PyObject *names[4];
    if (names[0] == NULL) {
        const char *fields[4] = {"type", "start", "end", "score"};
        for (int i = 0; i < 4; i++)
            if ((names[i] = PyUnicode_InternFromString(fields[i])) == NULL)
                return -1;
    }
    PyObject *values[4] = {NULL, NULL, NULL, NULL};
    int kept = -2;
    for (int i = 0; i < 4; i++)
        if ((values[i] = PyObject_GetAttr(entity, names[i])) == NULL) {
            kept = -1;
            goto done;
        }
    if (!PyLong_CheckExact(values[1]) || !PyLong_CheckExact(values[2]) || !PyFloat_CheckExact(values[3]))
        goto done;
    out->entity = entity;
    out->start = PyLong_AsSsize_t(values[1]);
    out->end = PyLong_AsSsize_t(values[2]);
    out->score = PyFloat_AS_DOUBLE(values[3]);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        goto done;  /* (offsets past Py_ssize_t) */
    }
    if (out->score != out->score)
        goto done;  /* NaN */
    if (out->end <= out->start) {
        kept = 0;
        goto done;
    }
    PyObject *minimum = PyObject_CallOneArg(score_for, values[0]);
    if (minimum == NULL) {
        kept = -1;
        goto done;
    }
    int enough = PyObject_RichCompareBool(values[3], minimum, Py_GE);
    Py_DECREF(minimum);
    int wanted = enough > 0 ? PySequence_Contains(entities, values[0]) : enough;
    if (wanted <= 0) {
        kept = wanted < 0 ? -1 : 0;
        goto done;
    }
    PyObject *priority = PyDict_GetItemWithError(priorities, values[0]);
    if (priority == NULL && PyErr_Occurred()) {
        kept = -1;
        goto done;
    }
    out->priority = priority == NULL ? 0 : PyLong_AsLong(priority);
    if (out->priority == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        goto done;
    }
    kept = 1;
done:
    for (int i = 0; i < 4; i++)
        Py_XDECREF(values[i]);
    return kept;
}

/* resolve_spans(found, score_for, entities, priorities): _resolve's result, or None. */
static PyObject *resolve_spans(PyObject *module, PyObject *args) {
    PyObject *found, *score_for, *entities, *priorities;
    if (!PyArg_ParseTuple(args, "O!OOO!:resolve_spans", &PyList_Type, &found, &score_for, &entities, &PyDict_Type,
                          &priorities))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(found);
    if (n > RESOLVE_MOST)
        Py_RETURN_NONE;
    Resolving kept[RESOLVE_MOST];
    Py_ssize_t count = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int rc = resolve_read(PyList_GET_ITEM(found, i), score_for, entities, priorities, &kept[count]);
        if (rc == -1)
            return NULL;
        if (rc == -2)
            Py_RETURN_NONE;
        count += rc;
    }
    /* the stable sort by key (insertion), then the walk */
    for (Py_ssize_t i = 1; i < count; i++) {
        Resolving item = kept[i];
        Py_ssize_t j = i;
        for (; j > 0 && resolve_before(&item, &kept[j - 1]); j--)
            kept[j] = kept[j - 1];
        kept[j] = item;
    }
    Resolving accepted[RESOLVE_MOST];
    Py_ssize_t taken = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        const Resolving *e = &kept[i];
        int overlaps = 0, inside_all = 1;
        for (Py_ssize_t k = 0; k < taken; k++) {
            const Resolving *a = &accepted[k];
            if (e->start < a->end && a->start < e->end) {
                overlaps = 1;
                inside_all = inside_all && a->start <= e->start && e->end <= a->end;
            }
        }
        if (!overlaps)
            accepted[taken++] = *e;
        else if (!inside_all)
            Py_RETURN_NONE;  /* a merge */
    }
    if (count > 1) {  /* (one span or none: in the order found, as _resolve returns them) */
        for (Py_ssize_t i = 1; i < taken; i++) {
            Resolving item = accepted[i];
            Py_ssize_t j = i;
            for (; j > 0 && item.start < accepted[j - 1].start; j--)
                accepted[j] = accepted[j - 1];
            accepted[j] = item;
        }
    }
    PyObject *out = PyList_New(taken);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < taken; i++)
        PyList_SET_ITEM(out, i, Py_NewRef(accepted[i].entity));
    return out;
}

static PyMethodDef module_methods[] = {
    {"phone_candidates", phone_candidates, METH_VARARGS,
     "phone_candidates(text, lo, hi, shortest, screen): PHONE_RE's matches in text[lo:hi] of at least shortest "
     "characters, as (start, extension start or -1, end, candidate end)"},
    {"phone_word_before", phone_word_before, METH_VARARGS,
     "phone_word_before(text, start): PHONE_CONTEXT finds a phone word in the 48 characters before start"},
    {"identifier_word_before", identifier_word_before, METH_VARARGS,
     "identifier_word_before(text, start): NOT_PHONE_CONTEXT finds an identifier word (ISBN, order, ...) right before start"},
    {"unit_after", unit_after, METH_VARARGS,
     "unit_after(text, end): UNIT_AFTER matches at end (a unit: ms, tokens, MiB, %, ...)"},
    {"column_header", column_header, METH_VARARGS,
     "column_header(text, start): the header cell of the CSV or markdown-table column holding start, or None"},
    {"phone_shape_rejected", phone_shape_rejected, METH_O,
     "phone_shape_rejected(candidate): phone_score's first test says it is no phone"},
    {"card_runs", card_runs, METH_VARARGS,
     "card_runs(text, lo, hi): (match start, card start, card end, card-shaped) per CARD_RE match holding a card"},
    {"ipv4_candidates", ipv4_candidates, METH_VARARGS,
     "ipv4_candidates(text, lo, hi, not_personal): (start, end, checked) per IPV4_RE match kept"},
    {"ssn_candidates", ssn_candidates, METH_VARARGS,
     "ssn_candidates(text, lo, hi): (start, end, separator) per SSN_RE match the invalidation rules keep"},
    {"iban_checksum_cuts", iban_checksum_cuts, METH_O,
     "iban_checksum_cuts(raw): (length, end in raw) of each cut of an IBAN_RE match that passes mod 97"},
    {"ipv6_verdict", ipv6_verdict, METH_O,
     "ipv6_verdict(value): 0 no IPv6 address, 1 an address, 2 one _not_personal is true of, -1 non-ASCII (ask Python)"},
    {"resolve_spans", resolve_spans, METH_VARARGS,
     "resolve_spans(found, score_for, entities, priorities): Redactor._resolve's spans, None where it merges spans"},
    {"follow_tokens", follow_tokens, METH_VARARGS,
     "follow_tokens(text, pos, max_tokens, any_case, any_first, surname_at, unknown_ok, sets): NameFinder._follow's "
     "(start, end) tokens; sets: (common, surnames, given, names, particles, stop words)"},
    {"phone_score", phone_score, METH_VARARGS,
     "phone_score(text, start, candidate_end, extension, not_phone_header, phone_context, phone_shape): "
     "shaped_phone_score's result, None where the numbering plan decides, NotImplemented outside PHONE_RE's characters"},
    {"email_candidates", email_candidates, METH_VARARGS,
     "email_candidates(text, lo, hi): (start, end) of each EMAIL_RE match"},
    {"kv_candidates", kv_candidates, METH_VARARGS,
     "kv_candidates(text, lo, hi): (key start, key end, quote after key, value start, value end, quoted) per KV_RE match"},
#ifdef GATEWATCH_HYPERSCAN
    {"compile_database", compile_database, METH_VARARGS,
     "compile_database(expressions, flags, ids, literal): a block-mode hyperscan database (libhs)"},
    {"load_database", load_database, METH_O, "load_database(data): a database from Database.serialize()"},
#endif
    {NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "redaction._native",
    "Native gate-hit handling and window loop of the fast redaction tier.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&TablesType) < 0 || PyType_Ready(&SinkType) < 0)
        return NULL;
#ifdef GATEWATCH_HYPERSCAN
    if (PyType_Ready(&DatabaseType) < 0)
        return NULL;
#endif
    FINDER_NAME = PyUnicode_InternFromString("finder");
    NAME_NAME = PyUnicode_InternFromString("name");
    LOWER_NAME = PyUnicode_InternFromString("lower");
    if (FINDER_NAME == NULL || NAME_NAME == NULL || LOWER_NAME == NULL)
        return NULL;
    PyObject *module = PyModule_Create(&native_module);
    if (module == NULL)
        return NULL;
    /* HYPERSCAN_VERSION: libhs's version where the gate scans here, else None (built without
       libhs, or a CPU libhs does not run on). */
    PyObject *version = Py_None;
#ifdef GATEWATCH_HYPERSCAN
    if (hs_valid_platform() == HS_SUCCESS)
        version = PyUnicode_FromString(hs_version());
    else
        Py_INCREF(version);
#else
    Py_INCREF(version);
#endif
    if (version == NULL || PyModule_AddObjectRef(module, "HYPERSCAN_VERSION", version) < 0
        || PyModule_AddObjectRef(module, "Tables", (PyObject *)&TablesType) < 0) {
        Py_XDECREF(version);
        Py_DECREF(module);
        return NULL;
    }
    Py_DECREF(version);
    return module;
}
