/* Batched WireGuard transport-message sealing and opening (ChaCha20-Poly1305 via OpenSSL libcrypto).
 *
 * Why C: through `cryptography` one 1420-byte packet costs ~2.2 us, of which ~1.5 us is call overhead and
 * the allocation of the result. Here a whole batch (a split GSO monster, a UDP_GRO read) is sealed or opened
 * in one call, in place, into preallocated buffers, with the GIL released. The pure-Python fallback is
 * turbowg/noise/transport.py (same signatures, same bytes).
 *
 * Module turbowg.noise._aead:
 *   Aead(key: 32 bytes)
 *     .seal_batch(src, layout, start, count, dst, dst_off, mtu, receiver, counter, sizes, sizes_idx) -> int
 *     .seal_list(packets, dst, dst_off, mtu, receiver, counter, sizes, sizes_idx) -> int
 *     .open_batch(buf, off, end, stride, receiver, replay, out_layout, out_idx) -> OpenResult
 *     .seal_sendto(fd, src, off, length, mtu, receiver, counter, dst, sockaddr) -> int
 *     .open_write(buf, off, length, receiver, replay, allowed_src, tun_fd, prefix, layout) -> int
 *   recv_one(fd, buf, off, cap, addr) -> int
 *   spin_poll(fd_a, fd_b, usec) -> int
 *   ReplayWindow()  .accept(counter) -> bool, .reset()
 *   OpenResult: named tuple (end, count, auth_fail, replay, expired, keepalive, rx_bytes, authenticated,
 *               max_counter)
 * `layout`, `sizes`, `out_layout` are writable buffers of native int32 (array('i')).
 *
 * Why one file (~800 lines): one CPython extension module; the seal and open loops share the AEAD context,
 * the replay window and the batch layout, and a split would export internal symbols across objects. The
 * lone-packet calls (seal_sendto, open_write, recv_one, spin_poll) are here because the first two are the same
 * seal and open with the system call that follows them, on the same contexts; recv_one is their read and
 * spin_poll the wait for the next one.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <poll.h>
#include <time.h>
#include <openssl/evp.h>

/* MESSAGE_TRANSPORT, HEADER_SIZE and TAG_SIZE repeat turbowg/wire.py (tests/test_constants.py checks). */
#define MESSAGE_TRANSPORT 4u
#define HEADER_SIZE 16
#define TAG_SIZE 16
#define OVERHEAD (HEADER_SIZE + TAG_SIZE)
/* REJECT_AFTER_MESSAGES = 2**64 - 2**13 - 1 (turbowg/wire.py) */
#define REJECT_AFTER_MESSAGES (UINT64_MAX - (1ull << 13))

/* ---- replay window: ring of 129 64-bit blocks, window 8192 (as turbowg/device/replay.py) ---------- */
#define RING_BLOCKS 129
#define WINDOW_SIZE ((RING_BLOCKS - 1) * 64)

typedef struct {
    PyObject_HEAD
    uint64_t last;
    uint64_t blocks[RING_BLOCKS];
} ReplayObject;

static int replay_accept(ReplayObject *r, uint64_t counter) {
    if (counter >= REJECT_AFTER_MESSAGES)
        return 0;
    uint64_t block_index = counter >> 6;
    if (counter > r->last) {
        uint64_t current = r->last >> 6;
        uint64_t skipped = block_index - current;
        if (skipped > RING_BLOCKS)
            skipped = RING_BLOCKS;
        for (uint64_t i = current + 1; i <= current + skipped; i++)
            r->blocks[i % RING_BLOCKS] = 0;
        r->last = counter;
    } else if (r->last - counter > WINDOW_SIZE) {
        return 0;
    }
    uint64_t slot = block_index % RING_BLOCKS;
    uint64_t bit = 1ull << (counter & 63);
    if (r->blocks[slot] & bit)
        return 0;
    r->blocks[slot] |= bit;
    return 1;
}

static PyObject *Replay_accept(ReplayObject *self, PyObject *arg) {
    /* Negative or huge counters are simply not acceptable (the Python reference says the same). */
    if (!PyLong_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "counter must be an int");
        return NULL;
    }
    if (_PyLong_Sign(arg) < 0)
        Py_RETURN_FALSE;
    uint64_t counter = PyLong_AsUnsignedLongLong(arg);
    if (counter == (uint64_t)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        Py_RETURN_FALSE;
    }
    return PyBool_FromLong(replay_accept(self, counter));
}

static PyObject *Replay_reset(ReplayObject *self, PyObject *Py_UNUSED(ignored)) {
    self->last = 0;
    memset(self->blocks, 0, sizeof(self->blocks));
    Py_RETURN_NONE;
}

static int Replay_init(ReplayObject *self, PyObject *args, PyObject *kwds) {
    if (!PyArg_ParseTuple(args, ":ReplayWindow"))
        return -1;
    self->last = 0;
    memset(self->blocks, 0, sizeof(self->blocks));
    return 0;
}

static PyMethodDef Replay_methods[] = {
    {"accept", (PyCFunction)Replay_accept, METH_O, "Record counter; True if fresh, False if replayed/too old."},
    {"reset", (PyCFunction)Replay_reset, METH_NOARGS, "Forget every counter."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ReplayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "turbowg.noise._aead.ReplayWindow",
    .tp_basicsize = sizeof(ReplayObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Sliding replay window over transport counters (8192 wide).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Replay_init,
    .tp_methods = Replay_methods,
};

/* ---- AEAD ---------------------------------------------------------------------------------------- */
typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *enc;
    EVP_CIPHER_CTX *dec;
} AeadObject;

static void Aead_dealloc(AeadObject *self) {
    if (self->enc)
        EVP_CIPHER_CTX_free(self->enc);
    if (self->dec)
        EVP_CIPHER_CTX_free(self->dec);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Aead_init(AeadObject *self, PyObject *args, PyObject *kwds) {
    Py_buffer key;
    if (!PyArg_ParseTuple(args, "y*:Aead", &key))
        return -1;
    if (key.len != 32) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "key must be 32 bytes");
        return -1;
    }
    if (self->enc == NULL)
        self->enc = EVP_CIPHER_CTX_new();
    if (self->dec == NULL)
        self->dec = EVP_CIPHER_CTX_new();
    int ok = self->enc && self->dec
        && EVP_EncryptInit_ex(self->enc, EVP_chacha20_poly1305(), NULL, key.buf, NULL) == 1
        && EVP_DecryptInit_ex(self->dec, EVP_chacha20_poly1305(), NULL, key.buf, NULL) == 1;
    PyBuffer_Release(&key);
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL refused ChaCha20-Poly1305");
        return -1;
    }
    return 0;
}

static inline void put_le32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void put_le64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline uint32_t get_le32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t get_le64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* Padded plaintext length, as wireguard-go's calculatePaddingSize (and Device._encrypt_and_send). */
static inline Py_ssize_t padded_length(Py_ssize_t length, Py_ssize_t mtu) {
    Py_ssize_t last = length > mtu ? length % mtu : length;
    Py_ssize_t padded_last = (last + 15) & ~(Py_ssize_t)15;
    if (padded_last > mtu)
        padded_last = mtu;
    return length + padded_last - last;
}

/* Seal one packet into out (room for OVERHEAD + padded checked by the caller). Returns 0 on failure. */
static int seal_one(EVP_CIPHER_CTX *ctx, const uint8_t *in, Py_ssize_t length, Py_ssize_t padded,
                    uint8_t *out, uint32_t receiver, uint64_t counter) {
    uint8_t nonce[12] = {0};
    put_le64(nonce + 4, counter);
    put_le32(out, MESSAGE_TRANSPORT);
    put_le32(out + 4, receiver);
    put_le64(out + 8, counter);
    uint8_t *body = out + HEADER_SIZE;
    if (length)
        memmove(body, in, (size_t)length);
    memset(body + length, 0, (size_t)(padded - length));
    int n1 = 0, n2 = 0;
    if (EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1)
        return 0;
    if (padded && EVP_EncryptUpdate(ctx, body, &n1, body, (int)padded) != 1)
        return 0;
    if (EVP_EncryptFinal_ex(ctx, body + n1, &n2) != 1)
        return 0;
    return EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG_SIZE, body + padded) == 1;
}

/* Open body[0..plen) + tag in place with the transport nonce for counter. Returns 1 if it authenticated,
   0 if not -- and then the same keystream is XORed again, so no unauthenticated plaintext stays in the
   caller's buffer -- and -1 on an OpenSSL failure. */
static int open_one(EVP_CIPHER_CTX *ctx, uint8_t *body, Py_ssize_t plen, uint64_t counter) {
    uint8_t nonce[12] = {0};
    put_le64(nonce + 4, counter);
    int n1 = 0, n2 = 0;
    if (EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1)
        return -1;
    int ok = (plen == 0 || EVP_DecryptUpdate(ctx, body, &n1, body, (int)plen) == 1)
        && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAG_SIZE, body + plen) == 1
        && EVP_DecryptFinal_ex(ctx, body + n1, &n2) == 1;
    if (ok)
        return 1;
    if (plen && (EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1
                 || EVP_DecryptUpdate(ctx, body, &n1, body, (int)plen) != 1))
        return -1;
    return 0;
}

static int get_int32_buffer(PyObject *obj, Py_buffer *view, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE) < 0)
        return -1;
    if (view->len % 4) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_TypeError, "%s must be an int32 buffer", what);
        return -1;
    }
    return 0;
}

/* seal_batch(src, layout, start, count, dst, dst_off, mtu, receiver, counter, sizes, sizes_idx) -> bytes written */
static PyObject *Aead_seal_batch(AeadObject *self, PyObject *args) {
    Py_buffer src, dst, layout_b, sizes_b;
    PyObject *layout_o, *sizes_o;
    Py_ssize_t start, count, dst_off, mtu, sizes_idx;
    unsigned int receiver;
    unsigned long long counter;
    if (!PyArg_ParseTuple(args, "y*Onnw*nnIKOn:seal_batch", &src, &layout_o, &start, &count, &dst, &dst_off,
                          &mtu, &receiver, &counter, &sizes_o, &sizes_idx))
        return NULL;
    PyObject *result = NULL;
    int have_layout = 0, have_sizes = 0;
    if (get_int32_buffer(layout_o, &layout_b, "layout") < 0)
        goto done;
    have_layout = 1;
    if (get_int32_buffer(sizes_o, &sizes_b, "sizes") < 0)
        goto done;
    have_sizes = 1;
    const int32_t *layout = layout_b.buf;
    int32_t *sizes = sizes_b.buf;
    Py_ssize_t layout_n = layout_b.len / 8, sizes_n = sizes_b.len / 4;
    if (start < 0 || count < 0 || start + count > layout_n || sizes_idx < 0 || sizes_idx + count > sizes_n
        || dst_off < 0 || dst_off > dst.len || mtu <= 0) {
        PyErr_SetString(PyExc_BufferError, "seal_batch: index out of range");
        goto done;
    }
    /* Check every packet's bounds and the output room before touching anything. */
    Py_ssize_t need = dst_off;
    for (Py_ssize_t k = start; k < start + count; k++) {
        Py_ssize_t off = layout[2 * k], len = layout[2 * k + 1];
        if (off < 0 || len < 0 || off + len > src.len) {
            PyErr_SetString(PyExc_BufferError, "seal_batch: packet outside the source buffer");
            goto done;
        }
        need += OVERHEAD + padded_length(len, mtu);
    }
    if (need > dst.len) {
        PyErr_SetString(PyExc_BufferError, "seal_batch: no room in the destination buffer");
        goto done;
    }
    int ok = 1;
    Py_ssize_t cur = dst_off;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = 0; k < count && ok; k++) {
        Py_ssize_t off = layout[2 * (start + k)], len = layout[2 * (start + k) + 1];
        Py_ssize_t padded = padded_length(len, mtu);
        ok = seal_one(self->enc, (const uint8_t *)src.buf + off, len, padded, (uint8_t *)dst.buf + cur,
                      receiver, counter + (uint64_t)k);
        sizes[sizes_idx + k] = (int32_t)(OVERHEAD + padded);
        cur += OVERHEAD + padded;
    }
    Py_END_ALLOW_THREADS
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL seal failed");
        goto done;
    }
    result = PyLong_FromSsize_t(cur - dst_off);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    if (have_layout)
        PyBuffer_Release(&layout_b);
    if (have_sizes)
        PyBuffer_Release(&sizes_b);
    return result;
}

/* seal_list(packets, dst, dst_off, mtu, receiver, counter, sizes, sizes_idx) -> bytes written */
static PyObject *Aead_seal_list(AeadObject *self, PyObject *args) {
    PyObject *packets, *sizes_o;
    Py_buffer dst, sizes_b;
    Py_ssize_t dst_off, mtu, sizes_idx;
    unsigned int receiver;
    unsigned long long counter;
    if (!PyArg_ParseTuple(args, "O!w*nnIKOn:seal_list", &PyList_Type, &packets, &dst, &dst_off, &mtu,
                          &receiver, &counter, &sizes_o, &sizes_idx))
        return NULL;
    PyObject *result = NULL;
    int have_sizes = 0;
    if (get_int32_buffer(sizes_o, &sizes_b, "sizes") < 0)
        goto done;
    have_sizes = 1;
    Py_ssize_t count = PyList_GET_SIZE(packets);
    if (sizes_idx < 0 || sizes_idx + count > sizes_b.len / 4 || dst_off < 0 || dst_off > dst.len || mtu <= 0) {
        PyErr_SetString(PyExc_BufferError, "seal_list: index out of range");
        goto done;
    }
    int32_t *sizes = sizes_b.buf;
    Py_ssize_t cur = dst_off;
    for (Py_ssize_t k = 0; k < count; k++) {
        Py_buffer pkt;
        if (PyObject_GetBuffer(PyList_GET_ITEM(packets, k), &pkt, PyBUF_SIMPLE) < 0)
            goto done;
        Py_ssize_t padded = padded_length(pkt.len, mtu);
        if (cur + OVERHEAD + padded > dst.len) {
            PyBuffer_Release(&pkt);
            PyErr_SetString(PyExc_BufferError, "seal_list: no room in the destination buffer");
            goto done;
        }
        int ok = seal_one(self->enc, pkt.buf, pkt.len, padded, (uint8_t *)dst.buf + cur, receiver,
                          counter + (uint64_t)k);
        PyBuffer_Release(&pkt);
        if (!ok) {
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL seal failed");
            goto done;
        }
        sizes[sizes_idx + k] = (int32_t)(OVERHEAD + padded);
        cur += OVERHEAD + padded;
    }
    result = PyLong_FromSsize_t(cur - dst_off);
done:
    PyBuffer_Release(&dst);
    if (have_sizes)
        PyBuffer_Release(&sizes_b);
    return result;
}

/* The result of open_batch: a C-level named tuple (PyStructSequence), built once per batch. The pure-Python
 * twin is transport.OpenResult (a NamedTuple with the same fields in the same order). */
enum {
    R_END, R_COUNT, R_AUTH_FAIL, R_REPLAY, R_EXPIRED, R_KEEPALIVE, R_RX_BYTES, R_AUTHENTICATED, R_MAX_COUNTER,
    R_FIELDS
};

static PyStructSequence_Field open_result_fields[] = {
    {"end", "offset where opening stopped (the first datagram not opened, or the end)"},
    {"count", "plaintexts recorded in out_layout"},
    {"auth_fail", "messages whose tag did not verify (left as they were)"},
    {"replay", "authentic messages refused by the replay window"},
    {"expired", "messages with a counter past REJECT_AFTER_MESSAGES"},
    {"keepalive", "authentic empty messages"},
    {"rx_bytes", "bytes of the authentic messages, headers included"},
    {"authenticated", "messages that verified and passed the replay window"},
    {"max_counter", "highest counter among the authenticated messages"},
    {NULL, NULL},
};

static PyStructSequence_Desc open_result_desc = {
    "turbowg.noise._aead.OpenResult", "What one open_batch call did.", open_result_fields, R_FIELDS,
};

static PyTypeObject OpenResultType;

/* open_batch(buf, off, end, stride, receiver, replay, out_layout, out_idx) -> OpenResult
 *
 * Datagrams lie at off, off+stride, ... up to end (the last may be shorter): one UDP_GRO read, or one
 * datagram with stride >= its length. Each type-4 message for `receiver` is authenticated and decrypted in
 * place (plaintext at datagram+16) and checked against the replay window; each authentic non-empty plaintext
 * (padding included) is recorded in out_layout as (offset, length). Routing the plaintexts (inner IP header,
 * allowed source) is the device's job (turbowg/device/route.py). Stops before the first datagram that is not
 * a transport message for `receiver` (the caller handles it and calls again after it).
 *
 * A message whose tag does not verify is left exactly as it came: OpenSSL decrypts before it checks the
 * tag, so the keystream is applied once more to turn the unauthenticated plaintext back into ciphertext
 * (only forgeries pay for it). An authentic message refused by the replay window keeps its plaintext, as in
 * the Python version.
 */
static PyObject *Aead_open_batch(AeadObject *self, PyObject *args) {
    Py_buffer buf, out_b;
    Py_ssize_t off, end, stride, out_idx;
    unsigned int receiver;
    PyObject *replay_o, *out_o;
    if (!PyArg_ParseTuple(args, "w*nnnIO!On:open_batch", &buf, &off, &end, &stride, &receiver, &ReplayType,
                          &replay_o, &out_o, &out_idx))
        return NULL;
    PyObject *result = NULL;
    int have_out = 0;
    if (get_int32_buffer(out_o, &out_b, "out_layout") < 0)
        goto done;
    have_out = 1;
    if (off < 0 || end > buf.len || off > end || stride <= 0 || out_idx < 0) {
        PyErr_SetString(PyExc_BufferError, "open_batch: range out of the buffer");
        goto done;
    }
    int32_t *out = out_b.buf;
    Py_ssize_t out_cap = out_b.len / 8;
    ReplayObject *replay = (ReplayObject *)replay_o;
    uint8_t *base = buf.buf;
    uint64_t r[R_FIELDS] = {0};
    Py_ssize_t n_out = 0, pos = off;
    int crypto_error = 0;
    EVP_CIPHER_CTX *ctx = self->dec;
    Py_BEGIN_ALLOW_THREADS
    for (; pos < end; pos += stride) {
        Py_ssize_t len = end - pos < stride ? end - pos : stride;
        uint8_t *d = base + pos;
        if (len < OVERHEAD || get_le32(d) != MESSAGE_TRANSPORT || get_le32(d + 4) != receiver)
            break;
        if (out_idx + n_out >= out_cap)
            break; /* caller's layout is full: it resumes here */
        uint64_t counter = get_le64(d + 8);
        if (counter >= REJECT_AFTER_MESSAGES) {
            r[R_EXPIRED]++;
            continue;
        }
        Py_ssize_t plen = len - OVERHEAD;
        uint8_t *body = d + HEADER_SIZE;
        int opened = open_one(ctx, body, plen, counter);
        if (opened < 0) {
            crypto_error = 1;
            break;
        }
        if (!opened) {
            r[R_AUTH_FAIL]++;
            continue;
        }
        if (!replay_accept(replay, counter)) {
            r[R_REPLAY]++;
            continue;
        }
        r[R_AUTHENTICATED]++;
        r[R_RX_BYTES] += (uint64_t)len;
        if (counter > r[R_MAX_COUNTER])
            r[R_MAX_COUNTER] = counter;
        if (plen == 0) {
            r[R_KEEPALIVE]++;
            continue;
        }
        out[2 * (out_idx + n_out)] = (int32_t)(pos + HEADER_SIZE);
        out[2 * (out_idx + n_out) + 1] = (int32_t)plen;
        n_out++;
    }
    Py_END_ALLOW_THREADS
    if (crypto_error) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL open failed");
        goto done;
    }
    r[R_END] = (uint64_t)(pos < end ? pos : end);
    r[R_COUNT] = (uint64_t)n_out;
    result = PyStructSequence_New(&OpenResultType);
    if (result == NULL)
        goto done;
    for (int i = 0; i < R_FIELDS; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(r[i]);
        if (v == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyStructSequence_SET_ITEM(result, i, v);
    }
done:
    PyBuffer_Release(&buf);
    if (have_out)
        PyBuffer_Release(&out_b);
    return result;
}

/* seal_sendto(fd, src, off, length, mtu, receiver, counter, dst, sockaddr) -> int
 *
 * The lone-packet send path (turbowg/device/send.py send_lone): seal src[off:off+length] under `counter`
 * into dst[0:] and sendto(fd) the message to `sockaddr` (a packed struct sockaddr) in the same call, so one
 * packet costs one Python->C crossing. Returns the message size when sent, or -errno when sendto failed (the
 * message is sealed in dst either way: the counter is used, as on the batch path).
 */
static PyObject *Aead_seal_sendto(AeadObject *self, PyObject *args) {
    Py_buffer src, dst, addr;
    int fd;
    Py_ssize_t off, length, mtu;
    unsigned int receiver;
    unsigned long long counter;
    if (!PyArg_ParseTuple(args, "iy*nnnIKw*y*:seal_sendto", &fd, &src, &off, &length, &mtu, &receiver, &counter,
                          &dst, &addr))
        return NULL;
    PyObject *result = NULL;
    if (off < 0 || length < 0 || off + length > src.len || mtu <= 0) {
        PyErr_SetString(PyExc_BufferError, "seal_sendto: packet outside the source buffer");
        goto done;
    }
    Py_ssize_t padded = padded_length(length, mtu);
    if (OVERHEAD + padded > dst.len) {
        PyErr_SetString(PyExc_BufferError, "seal_sendto: no room in the destination buffer");
        goto done;
    }
    if (addr.len <= 0 || addr.len > (Py_ssize_t)sizeof(struct sockaddr_storage)) {
        PyErr_SetString(PyExc_ValueError, "seal_sendto: bad sockaddr");
        goto done;
    }
    if (!seal_one(self->enc, (const uint8_t *)src.buf + off, length, padded, dst.buf, receiver, counter)) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL seal failed");
        goto done;
    }
    /* Not worth releasing the GIL for one non-blocking send (nothing else runs in the daemon's process). */
    ssize_t sent;
    do {
        sent = sendto(fd, dst.buf, (size_t)(OVERHEAD + padded), 0, (const struct sockaddr *)addr.buf,
                      (socklen_t)addr.len);
    } while (sent < 0 && errno == EINTR);
    result = PyLong_FromSsize_t(sent < 0 ? -(Py_ssize_t)errno : (Py_ssize_t)(OVERHEAD + padded));
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    PyBuffer_Release(&addr);
    return result;
}

/* What open_write did (its return value; a failed TUN write is -errno instead). */
enum { OW_WRITTEN, OW_KEEPALIVE, OW_AUTH_FAIL, OW_REPLAY, OW_EXPIRED, OW_BAD_INNER, OW_MISMATCH, OW_NOT_MINE };

/* open_write(buf, off, length, receiver, replay, allowed_src, tun_fd, prefix, layout) -> int
 *
 * The lone-datagram receive path (turbowg/device/receive.py receive_lone): the one transport message at
 * buf[off:off+length] is opened in place, checked against `replay`, its inner IP header checked and its
 * source compared with `allowed_src` (what check_inner_sources does), and when all pass, written to the TUN
 * as one writev(tun_fd, [prefix, packet]) (prefix: the zero virtio header, or empty). layout[0:2] gets
 * (offset, inner length) of every kept packet (OW_WRITTEN, OW_MISMATCH, a failed write), so the caller can
 * write it the ordinary way. Returns an OW_ code, or -errno when the TUN write failed.
 */
static PyObject *Aead_open_write(AeadObject *self, PyObject *args) {
    Py_buffer buf, src_b, prefix, layout_b;
    Py_ssize_t off, length;
    unsigned int receiver;
    PyObject *replay_o, *layout_o;
    int tun_fd;
    if (!PyArg_ParseTuple(args, "w*nnIO!y*iy*O:open_write", &buf, &off, &length, &receiver, &ReplayType,
                          &replay_o, &src_b, &tun_fd, &prefix, &layout_o))
        return NULL;
    PyObject *result = NULL;
    int have_layout = 0;
    long code;
    if (get_int32_buffer(layout_o, &layout_b, "layout") < 0)
        goto done;
    have_layout = 1;
    if (off < 0 || length < 0 || off + length > buf.len || layout_b.len < 8) {
        PyErr_SetString(PyExc_BufferError, "open_write: range out of the buffer");
        goto done;
    }
    uint8_t *d = (uint8_t *)buf.buf + off;
    if (length < OVERHEAD || get_le32(d) != MESSAGE_TRANSPORT || get_le32(d + 4) != receiver) {
        code = OW_NOT_MINE;
        goto finish;
    }
    uint64_t counter = get_le64(d + 8);
    if (counter >= REJECT_AFTER_MESSAGES) {
        code = OW_EXPIRED;
        goto finish;
    }
    Py_ssize_t plen = length - OVERHEAD;
    uint8_t *body = d + HEADER_SIZE;
    int opened = open_one(self->dec, body, plen, counter);
    if (opened < 0) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL open failed");
        goto done;
    }
    if (!opened) {
        code = OW_AUTH_FAIL;
        goto finish;
    }
    if (!replay_accept((ReplayObject *)replay_o, counter)) {
        code = OW_REPLAY;
        goto finish;
    }
    if (plen == 0) {
        code = OW_KEEPALIVE;
        goto finish;
    }
    /* The inner header, as turbowg/device/route.py check_inner_sources. */
    unsigned version = body[0] >> 4;
    Py_ssize_t inner, minimum;
    const uint8_t *source;
    Py_ssize_t source_len;
    if (version == 4 && plen >= 20) {
        inner = ((Py_ssize_t)body[2] << 8) | body[3];
        minimum = 20;
        source = body + 12;
        source_len = 4;
    } else if (version == 6 && plen >= 40) {
        inner = 40 + (((Py_ssize_t)body[4] << 8) | body[5]);
        minimum = 40;
        source = body + 8;
        source_len = 16;
    } else {
        code = OW_BAD_INNER;
        goto finish;
    }
    if (inner < minimum || inner > plen) {
        code = OW_BAD_INNER;
        goto finish;
    }
    int32_t *layout = layout_b.buf;
    layout[0] = (int32_t)(off + HEADER_SIZE);
    layout[1] = (int32_t)inner;
    if (src_b.len != source_len || memcmp(src_b.buf, source, (size_t)source_len) != 0) {
        code = OW_MISMATCH;
        goto finish;
    }
    struct iovec iov[2] = {{prefix.buf, (size_t)prefix.len}, {body, (size_t)inner}};
    ssize_t written;
    do {
        written = prefix.len ? writev(tun_fd, iov, 2) : writev(tun_fd, iov + 1, 1);
    } while (written < 0 && errno == EINTR);
    code = written < 0 ? -(long)errno : OW_WRITTEN;
finish:
    result = PyLong_FromLong(code);
done:
    PyBuffer_Release(&buf);
    PyBuffer_Release(&src_b);
    PyBuffer_Release(&prefix);
    if (have_layout)
        PyBuffer_Release(&layout_b);
    return result;
}

static PyMethodDef Aead_methods[] = {
    {"seal_batch", (PyCFunction)Aead_seal_batch, METH_VARARGS, "Seal layout-described packets into dst."},
    {"seal_list", (PyCFunction)Aead_seal_list, METH_VARARGS, "Seal a list of packets into dst."},
    {"open_batch", (PyCFunction)Aead_open_batch, METH_VARARGS, "Open transport messages in place."},
    {"seal_sendto", (PyCFunction)Aead_seal_sendto, METH_VARARGS, "Seal one packet and send it (lone path)."},
    {"open_write", (PyCFunction)Aead_open_write, METH_VARARGS, "Open one message and write it to the TUN."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject AeadType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "turbowg.noise._aead.Aead",
    .tp_basicsize = sizeof(AeadObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "ChaCha20-Poly1305 transport keys of one direction pair (send and receive key may differ: "
              "use one Aead per key).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Aead_init,
    .tp_dealloc = (destructor)Aead_dealloc,
    .tp_methods = Aead_methods,
};

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif

/* recv_one(fd, buf, off, cap, addr) -> int
 *
 * The lone-datagram read (turbowg/daemon/runtime.py): one recvmsg(fd) into buf[off:off+cap], the sender's
 * sockaddr into `addr` (a writable buffer, zero-filled past what the kernel gave). Returns the datagram's
 * length n, or -errno (EAGAIN: nothing there). When the read was a UDP_GRO batch of segments of s < n bytes,
 * returns n | s << 32 (the caller then takes the batch path). Python's recvmsg_into does the same read with
 * a tuple, a list, an address string and an ancillary-data list per call.
 */
static PyObject *aead_recv_one(PyObject *Py_UNUSED(module), PyObject *args) {
    int fd;
    Py_buffer buf, addr;
    Py_ssize_t off, cap;
    if (!PyArg_ParseTuple(args, "iw*nnw*:recv_one", &fd, &buf, &off, &cap, &addr))
        return NULL;
    PyObject *result = NULL;
    if (off < 0 || cap <= 0 || off + cap > buf.len) {
        PyErr_SetString(PyExc_BufferError, "recv_one: range out of the buffer");
        goto done;
    }
    struct sockaddr_storage from;
    struct iovec iov = {(uint8_t *)buf.buf + off, (size_t)cap};
    union {
        char space[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    struct msghdr msg = {0};
    msg.msg_name = &from;
    msg.msg_namelen = sizeof(from);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.space;
    msg.msg_controllen = sizeof(control.space);
    ssize_t n;
    do {
        n = recvmsg(fd, &msg, 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        result = PyLong_FromLong(-(long)errno);
        goto done;
    }
    long long segment = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO && c->cmsg_len >= CMSG_LEN(sizeof(uint16_t))) {
            int value = 0;
            if (c->cmsg_len >= CMSG_LEN(sizeof(int)))
                memcpy(&value, CMSG_DATA(c), sizeof(int));
            else {
                uint16_t v16;
                memcpy(&v16, CMSG_DATA(c), sizeof(v16));
                value = v16;
            }
            if (value > 0 && value < n)
                segment = value;
        }
    }
    size_t namelen = msg.msg_namelen < (socklen_t)sizeof(from) ? msg.msg_namelen : sizeof(from);
    if ((size_t)addr.len < namelen)
        namelen = (size_t)addr.len;
    memcpy(addr.buf, &from, namelen);
    memset((uint8_t *)addr.buf + namelen, 0, (size_t)addr.len - namelen);
    result = PyLong_FromLongLong((long long)n | (segment << 32));
done:
    PyBuffer_Release(&buf);
    PyBuffer_Release(&addr);
    return result;
}

/* spin_poll(fd_a, fd_b, usec) -> int
 *
 * The bounded busy poll after a lone crossing (turbowg/daemon/runtime.py): poll() both fds with a zero
 * timeout in a tight loop for up to `usec` microseconds, GIL released. Returns the first fd found readable
 * (fd_a when both are), -1 when none became readable in time, -errno when poll failed. A negative fd is
 * skipped (as poll does). Why C: a Python loop of poll(0) calls takes ~1.5 us per turn and holds the GIL;
 * here a turn is one system call (~0.3 us), so an answer is seen within a fraction of a microsecond of its
 * arrival, without the wakeup (IPI, idle exit, epoll return, loop dispatch) a sleeping loop pays.
 */
static PyObject *aead_spin_poll(PyObject *Py_UNUSED(module), PyObject *args) {
    int fd_a, fd_b;
    long long usec;
    if (!PyArg_ParseTuple(args, "iiL:spin_poll", &fd_a, &fd_b, &usec))
        return NULL;
    struct pollfd fds[2] = {{fd_a, POLLIN, 0}, {fd_b, POLLIN, 0}};
    long result = -1;
    Py_BEGIN_ALLOW_THREADS
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long long deadline = (long long)now.tv_sec * 1000000000LL + now.tv_nsec + (usec > 0 ? usec : 0) * 1000LL;
    for (;;) {
        int ready = poll(fds, 2, 0);
        if (ready > 0) {
            if (fds[0].revents & (POLLIN | POLLERR | POLLHUP))
                result = fd_a;
            else if (fds[1].revents & (POLLIN | POLLERR | POLLHUP))
                result = fd_b;
            else if ((fds[0].revents | fds[1].revents) & POLLNVAL)
                result = -EBADF;
            if (result != -1)
                break;
        } else if (ready < 0 && errno != EINTR) {
            result = -(long)errno;
            break;
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
        if ((long long)now.tv_sec * 1000000000LL + now.tv_nsec >= deadline)
            break;
    }
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(result);
}

static PyMethodDef aead_functions[] = {
    {"recv_one", aead_recv_one, METH_VARARGS, "One recvmsg: datagram length (| GRO segment << 32) or -errno."},
    {"spin_poll", aead_spin_poll, METH_VARARGS, "Busy-poll two fds for up to usec: the readable fd, or -1."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef aead_module = {
    PyModuleDef_HEAD_INIT, "turbowg.noise._aead", "Batched WireGuard transport AEAD (C).", -1, aead_functions,
};

PyMODINIT_FUNC PyInit__aead(void) {
    if (PyType_Ready(&AeadType) < 0 || PyType_Ready(&ReplayType) < 0)
        return NULL;
    if (OpenResultType.tp_name == NULL && PyStructSequence_InitType2(&OpenResultType, &open_result_desc) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&aead_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&AeadType);
    Py_INCREF(&ReplayType);
    Py_INCREF(&OpenResultType);
    if (PyModule_AddObject(m, "Aead", (PyObject *)&AeadType) < 0
        || PyModule_AddObject(m, "ReplayWindow", (PyObject *)&ReplayType) < 0
        || PyModule_AddObject(m, "OpenResult", (PyObject *)&OpenResultType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
