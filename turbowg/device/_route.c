/* Inner-packet checks of the receive path, in C: one call per opened batch, no Python object per packet.
 *
 * The noise layer (turbowg/noise/_aead.c open_batch) authenticates and decrypts; what the plaintexts are
 * and where they may come from is the device's business. This module does the per-packet part of that:
 * parse the inner IP header (version, total length: the padding is cut off), and compare the inner source
 * with the one address last proved to route to the peer. The pure-Python twin is turbowg/device/route.py
 * (same results, same layout).
 *
 * Module turbowg.device._route:
 *   check_inner_sources(buf, layout, start, count, allowed_src) -> InnerCheck(kept, bad_inner, src_mismatch)
 *     layout[2*start : 2*(start+count)] holds (offset, padded plaintext length) pairs (int32, array('i')).
 *     Packets with a malformed inner header are dropped (counted in bad_inner); the others are compacted
 *     in place to layout[2*start : 2*(start+kept)] as (offset, inner length). src_mismatch counts kept
 *     packets whose source differs from allowed_src (4 or 16 bytes): the caller looks those up.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { I_KEPT, I_BAD_INNER, I_SRC_MISMATCH, I_FIELDS };

static PyStructSequence_Field inner_check_fields[] = {
    {"kept", "packets with a well-formed inner IP header, compacted from layout[2*start]"},
    {"bad_inner", "packets dropped: not IPv4/IPv6 or a length that does not fit"},
    {"src_mismatch", "kept packets whose source is not allowed_src"},
    {NULL, NULL},
};

static PyStructSequence_Desc inner_check_desc = {
    "turbowg.device._route.InnerCheck", "What one check_inner_sources call did.", inner_check_fields,
    I_FIELDS,
};

static PyTypeObject InnerCheckType;

static PyObject *check_inner_sources(PyObject *module, PyObject *args) {
    Py_buffer buf, layout_b, allowed;
    Py_ssize_t start, count;
    if (!PyArg_ParseTuple(args, "y*w*nny*:check_inner_sources", &buf, &layout_b, &start, &count, &allowed))
        return NULL;
    PyObject *result = NULL;
    if (layout_b.len % 4) {
        PyErr_SetString(PyExc_TypeError, "layout must be an int32 buffer");
        goto done;
    }
    int32_t *layout = layout_b.buf;
    if (start < 0 || count < 0 || start + count > layout_b.len / 8) {
        PyErr_SetString(PyExc_BufferError, "check_inner_sources: index out of range");
        goto done;
    }
    /* Check every packet's bounds before touching anything. */
    for (Py_ssize_t k = start; k < start + count; k++) {
        Py_ssize_t off = layout[2 * k], len = layout[2 * k + 1];
        if (off < 0 || len < 0 || off + len > buf.len) {
            PyErr_SetString(PyExc_BufferError, "check_inner_sources: packet outside the buffer");
            goto done;
        }
    }
    const uint8_t *base = buf.buf;
    const uint8_t *src_ok = allowed.buf;
    Py_ssize_t src_ok_len = allowed.len;
    Py_ssize_t kept = start, bad_inner = 0, mismatch = 0;
    for (Py_ssize_t k = start; k < start + count; k++) {
        Py_ssize_t off = layout[2 * k], plen = layout[2 * k + 1];
        const uint8_t *p = base + off;
        unsigned version = plen ? p[0] >> 4 : 0;
        Py_ssize_t inner, minimum, source_len;
        const uint8_t *source;
        if (version == 4 && plen >= 20) {
            inner = ((Py_ssize_t)p[2] << 8) | p[3];
            minimum = 20;
            source = p + 12;
            source_len = 4;
        } else if (version == 6 && plen >= 40) {
            inner = 40 + (((Py_ssize_t)p[4] << 8) | p[5]);
            minimum = 40;
            source = p + 8;
            source_len = 16;
        } else {
            bad_inner++;
            continue;
        }
        if (inner < minimum || inner > plen) {
            bad_inner++;
            continue;
        }
        if (source_len != src_ok_len || memcmp(source, src_ok, (size_t)source_len) != 0)
            mismatch++;
        layout[2 * kept] = (int32_t)off;
        layout[2 * kept + 1] = (int32_t)inner;
        kept++;
    }
    result = PyStructSequence_New(&InnerCheckType);
    if (result == NULL)
        goto done;
    Py_ssize_t values[I_FIELDS] = {kept - start, bad_inner, mismatch};
    for (int i = 0; i < I_FIELDS; i++) {
        PyObject *v = PyLong_FromSsize_t(values[i]);
        if (v == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyStructSequence_SET_ITEM(result, i, v);
    }
done:
    PyBuffer_Release(&buf);
    PyBuffer_Release(&layout_b);
    PyBuffer_Release(&allowed);
    return result;
}

static PyMethodDef route_methods[] = {
    {"check_inner_sources", check_inner_sources, METH_VARARGS,
     "Parse inner IP headers of opened packets, drop malformed ones, count sources other than allowed_src."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef route_module = {
    PyModuleDef_HEAD_INIT, "turbowg.device._route", "Inner-packet checks of the WireGuard receive path (C).",
    -1, route_methods,
};

PyMODINIT_FUNC PyInit__route(void) {
    if (InnerCheckType.tp_name == NULL && PyStructSequence_InitType2(&InnerCheckType, &inner_check_desc) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&route_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&InnerCheckType);
    if (PyModule_AddObject(m, "InnerCheck", (PyObject *)&InnerCheckType) < 0) {
        Py_DECREF(&InnerCheckType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
